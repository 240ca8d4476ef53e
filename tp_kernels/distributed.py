"""TPGroup: the explicit tensor-parallel group that layers and ops take, and the all-reduce backend chain.

There is no module-level parallel state: a TPGroup is made by the caller (`TPGroup.init()` in a script,
`TPGroup.from_group(pg)` inside a job that already has process groups, `TPGroup.single()` for one rank)
and handed to every layer. Ops receive the group's *name* (a str, so torch.compile can trace the call) and
resolve it here; the only table kept is name -> TPGroup, filled when a group is made.

All-reduce goes through a chain of communicators, the first whose predicate accepts the tensor doing the
work: world size 1 -> identity; then the fast paths of tp_kernels.comm (shared memory on CPU, CUDA IPC on
GPU); then torch.distributed (gloo on CPU, NCCL on GPU), which always applies. Making a TPGroup over a
multi-rank process group is collective: the fast paths exchange hostnames and buffer names over it.
"""
from __future__ import annotations

import abc
import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_GROUPS: Dict[str, "TPGroup"] = {}
SINGLE_GROUP_NAME = "tp_kernels.single"


class Communicator(abc.ABC):
    """One backend of the all-reduce chain. `applies` says whether it can reduce this tensor (device,
    size, dtype); `all_reduce` returns the sum over the group as a new tensor."""

    name = "base"

    @abc.abstractmethod
    def applies(self, x: torch.Tensor) -> bool:
        """Whether this backend can reduce x."""

    @abc.abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group, as a new tensor."""

    def allreduce_residual_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   eps: float):
        """add_rmsnorm(all_reduce(x), residual, weight, eps) -> (normed, new_residual). Backends that can
        fuse the residual add and the norm into the reduction override this."""
        return torch.ops.tp_kernels.add_rmsnorm(self.all_reduce(x), residual, weight, eps)

    def close(self) -> None:
        """Release what the backend holds (shared memory, IPC buffers). Idempotent."""


class IdentityCommunicator(Communicator):
    """World size 1: the sum over one rank is the tensor itself (copied: the op is out of place)."""

    name = "identity"

    def __init__(self, world_size: int):
        self.world_size = world_size

    def applies(self, x: torch.Tensor) -> bool:
        return self.world_size == 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class TorchCommunicator(Communicator):
    """torch.distributed.all_reduce on the group (gloo for CPU tensors, NCCL for CUDA): always applies.
    Half-precision inputs are reduced in float32 so that the result matches the other backends (fp32
    accumulation) and is the same on every rank."""

    name = "torch"

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group

    def applies(self, x: torch.Tensor) -> bool:
        return self.group is not None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        accumulate = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.clone()
        dist.all_reduce(accumulate, group=self.group)
        return accumulate.to(x.dtype)

    def all_gather(self, x: torch.Tensor, world_size: int, dim: int) -> torch.Tensor:
        out = torch.empty((world_size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        with torch.no_grad():  # gloo fills out through views; with grad mode on (x requiring grad) that raised
            dist.all_gather_single(out, x.contiguous(), group=self.group)
        if dim == 0:
            return out
        # (world_size * d0, ...) -> cat along dim: move each rank's block next to the others along dim
        return torch.cat(out.chunk(world_size, dim=0), dim=dim)


@dataclass(eq=False)
class TPGroup:
    """A tensor-parallel group: `rank` and `world_size` of this process in it, the `name` ops use to find
    it, the torch.distributed `process_group` (None for a single rank), and the all-reduce chain."""

    rank: int
    world_size: int
    name: str
    process_group: Optional[dist.ProcessGroup] = None
    communicators: List[Communicator] = field(default_factory=list)

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if not self.communicators:
            fast_paths = []
            if self.process_group is not None and self.world_size > 1:
                from tp_kernels.comm import fast_path_communicators  # imports this module: import here

                fast_paths = fast_path_communicators(self)  # collective over the group's ranks
            self.communicators = [IdentityCommunicator(self.world_size), *fast_paths,
                                  TorchCommunicator(self.process_group)]
        _GROUPS[self.name] = self
        self._register_native_cpu_path()

    def _register_native_cpu_path(self) -> None:
        """Hand the C++ CPU kernels of all_reduce / allreduce_residual_rmsnorm (csrc/cpu/shm_ops.cpp) this
        group's shm communicator when the chain picks it for every CPU dtype it reduces, so that those op
        calls skip Python; otherwise drop whatever an earlier group of this name registered."""
        from tp_kernels._extension import _C  # imported here: tp_kernels.comm imports this module

        if _C is None:
            return
        from tp_kernels.comm.shm import SUPPORTED_DTYPES, ShmCommunicator

        def first_applicable(x: torch.Tensor) -> Optional[Communicator]:
            return next((c for c in self.communicators if c.applies(x)), None)

        shm = next((c for c in self.communicators if isinstance(c, ShmCommunicator)), None)
        chosen = shm is not None and all(first_applicable(torch.empty(0, dtype=d)) is shm for d in SUPPORTED_DTYPES)
        _C.register_shm_group(self.name, shm._native if chosen else None)

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def single(cls) -> "TPGroup":
        """One rank, no torch.distributed needed: every collective is the identity."""
        return _GROUPS.get(SINGLE_GROUP_NAME) or cls(rank=0, world_size=1, name=SINGLE_GROUP_NAME)

    @classmethod
    def from_group(cls, pg: Optional[dist.ProcessGroup] = None) -> "TPGroup":
        """The TPGroup over an existing process group (default: the world group). One TPGroup per
        process group: asking twice returns the same object."""
        if not dist.is_initialized():
            raise RuntimeError("TPGroup.from_group needs torch.distributed initialized "
                               "(call TPGroup.init() or torch.distributed.init_process_group first)")
        pg = pg if pg is not None else dist.group.WORLD
        name = pg.group_name
        if name in _GROUPS:
            return _GROUPS[name]
        return cls(rank=dist.get_rank(pg), world_size=dist.get_world_size(pg), name=name, process_group=pg)

    @classmethod
    def init(cls, rank: Optional[int] = None, world_size: Optional[int] = None, backend: Optional[str] = None,
             init_method: Optional[str] = None, timeout_s: float = 300.0) -> "TPGroup":
        """Initialize torch.distributed for a script and return the world TPGroup.

        Explicit arguments win; otherwise torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT). With world size 1 and nothing initialized, no process group is made.
        backend defaults to "cpu:gloo,cuda:nccl" when CUDA is available, else "gloo".
        """
        if dist.is_initialized():
            return cls.from_group()
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if world_size == 1 and init_method is None and "MASTER_ADDR" not in os.environ:
            return cls.single()
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if backend.endswith("nccl") and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(backend=backend, init_method=init_method or "env://", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        return cls.from_group()

    # -- collectives -------------------------------------------------------------------------------------
    def communicator_for(self, x: torch.Tensor, algo: str = "auto") -> Communicator:
        """The backend that reduces x: the first of the chain that applies, or the one named by algo."""
        if algo == "auto":
            for comm in self.communicators:
                if comm.applies(x):
                    return comm
            raise RuntimeError(f"no all-reduce backend of group {self.name!r} applies to a {x.dtype} "
                               f"{x.device.type} tensor of shape {tuple(x.shape)}")
        names = [c.name for c in self.communicators]
        for comm in self.communicators:
            if comm.name == algo:
                if not comm.applies(x):
                    raise ValueError(f"algo={algo!r} does not apply to a {x.dtype} {x.device.type} tensor of "
                                     f"{x.numel()} elements in group {self.name!r} (world size {self.world_size})")
                return comm
        raise ValueError(f"algo must be 'auto' or one of {names} for group {self.name!r}, got {algo!r}")

    def all_reduce(self, x: torch.Tensor, algo: str = "auto") -> torch.Tensor:
        return self.communicator_for(x, algo).all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.world_size == 1:
            return x.clone()
        return TorchCommunicator(self.process_group).all_gather(x, self.world_size, dim)

    def close(self) -> None:
        """Release the communicators' resources and forget the name. The process group is the caller's."""
        for comm in self.communicators:
            comm.close()
        if _GROUPS.get(self.name) is self:
            _GROUPS.pop(self.name)
            from tp_kernels._extension import _C

            if _C is not None:
                _C.register_shm_group(self.name, None)


def resolve(name: str) -> TPGroup:
    """The TPGroup registered under name (what ops receive as their `group` argument)."""
    try:
        return _GROUPS[name]
    except KeyError:
        raise ValueError(f"group {name!r} is not a known TPGroup in this process (known: {sorted(_GROUPS)}); "
                         "make one with TPGroup.init(), TPGroup.from_group(pg) or TPGroup.single()") from None
