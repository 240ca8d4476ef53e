"""The communicator interface of a TPGroup's backend chain, the two backends that need nothing compiled
(identity for one rank, torch.distributed for everything else), and the collective timeout.

A communicator is one backend: `applies(x)` says whether it can serve a collective of x (device, dtype,
size), the collectives do it. tp_kernels.distributed builds a group's chain from these and from the fast
paths of tp_kernels.comm (shared memory, CUDA IPC), and is the only caller: every collective of a group
goes through `TPGroup.all_reduce` / `all_gather` / `allreduce_residual_rmsnorm`, which pick the backend.
This module imports nothing of tp_kernels, so that every backend module can import it.
"""
from __future__ import annotations

import abc
import math
import os
from typing import Mapping, Optional, Tuple

import torch
import torch.distributed as dist

TIMEOUT_ENV = "TP_KERNELS_COMM_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
# The CUDA IPC kernels wait for their peers on the GPU, and a kernel that gives up must trap, which leaves
# the process's CUDA context unusable: so their wait is as long as NCCL's watchdog (10 minutes in torch),
# long enough for a peer that compiles Triton kernels or reads a checkpoint, and it has its own variable.
IPC_KERNEL_TIMEOUT_ENV = "TP_KERNELS_IPC_TIMEOUT"
DEFAULT_IPC_KERNEL_TIMEOUT_S = 600.0


def _seconds_from_env(name: str, default: float, allow_zero: bool,
                      environ: Optional[Mapping[str, str]]) -> float:
    """A finite number of seconds from environ[name] (> 0, or >= 0 with allow_zero), else default."""
    environ = os.environ if environ is None else environ
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    expected = "a finite number of seconds " + (">= 0 (0: wait forever)" if allow_zero else "> 0")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be {expected}, got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {expected}, got {raw!r}")
    return value


def comm_timeout_s(environ: Optional[Mapping[str, str]] = None) -> float:
    """The seconds a collective may wait for a peer before it raises naming the missing rank:
    TP_KERNELS_COMM_TIMEOUT if set (to a positive, finite number), else 60. Every host-side wait reads it."""
    return _seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, False, environ)


def ipc_kernel_timeout_s(environ: Optional[Mapping[str, str]] = None) -> float:
    """The seconds a CUDA IPC kernel waits at a barrier for a peer before it records the missing rank and
    traps: TP_KERNELS_IPC_TIMEOUT if set (0 waits forever and never traps), else 600."""
    return _seconds_from_env(IPC_KERNEL_TIMEOUT_ENV, DEFAULT_IPC_KERNEL_TIMEOUT_S, True, environ)


# torch 2.14 deprecates all_gather_into_tensor (a warning per call per rank) in favour of
# all_gather_single, which torch 2.11 (the GPU machine's) does not have yet: take whichever exists.
def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


class Communicator(abc.ABC):
    """One backend of the chain. `applies` says whether it can serve a collective of this tensor (device,
    size, dtype); `all_reduce` returns the sum over the group as a new tensor."""

    name = "base"

    @abc.abstractmethod
    def applies(self, x: torch.Tensor) -> bool:
        """Whether this backend can serve a collective of x."""

    @abc.abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group, as a new tensor."""

    def all_reduce_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group written into out (x's shape and dtype; out may be x itself).
        Backends that reduce in place override this to skip the copy."""
        return out.copy_(self.all_reduce(x))

    def all_gather(self, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        """Every rank's x stacked: (world_size, *x.shape), rank 0's first. This default sums a zero buffer
        in which each rank wrote its own block: exact (adding zeros rounds nothing, also in fp16/bf16 with
        fp32 accumulation) at world_size times an all-gather's bytes. Backends with a gather override it."""
        stacked = x.new_zeros((world_size,) + tuple(x.shape))  # (world_size, *x.shape)
        stacked[rank] = x
        return self.all_reduce_into(stacked, stacked)

    def allreduce_residual_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """add_rmsnorm(all_reduce(x), residual, weight, eps) -> (normed, new_residual). Backends that can
        fuse the residual add and the norm into the reduction override this."""
        return torch.ops.tp_kernels.add_rmsnorm(self.all_reduce(x), residual, weight, eps)

    def bind_thread(self, thread: int) -> None:
        """Serve collectives from `thread` (threading.get_ident()) from now on. Backends that check which
        thread calls them (the shm communicator, whose C++ kernels are called without Python) override
        this and allow_helper_thread; TPGroup checks the others."""

    def allow_helper_thread(self, thread: int) -> None:
        """Also serve collectives from `thread`, the group's communication thread (tp_kernels.comm.thread)."""

    @property
    def native_cpu_communicator(self):
        """The compiled communicator that the C++ CPU kernels of the collective ops may call without Python
        (csrc/cpu/shm_ops.cpp), or None. Only the shared-memory backend has one."""
        return None

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

    def all_reduce_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out if out is x else out.copy_(x)

    def all_gather(self, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        return x.unsqueeze(0).clone()  # (1, *x.shape)


class TorchCommunicator(Communicator):
    """torch.distributed on the group (gloo for CPU tensors, NCCL for CUDA): applies whenever the group has a
    process group. Half-precision inputs are reduced in float32 so that the result matches the other
    backends (fp32 accumulation) and is the same on every rank."""

    name = "torch"

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group

    def applies(self, x: torch.Tensor) -> bool:
        return self.group is not None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        accumulate = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.clone()
        dist.all_reduce(accumulate, group=self.group)
        return accumulate.to(x.dtype)

    def all_reduce_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if out is x and x.dtype not in (torch.float16, torch.bfloat16) and x.is_contiguous():
            dist.all_reduce(x, group=self.group)  # in place: no copy at all
            return x
        return super().all_reduce_into(x, out)

    def all_gather(self, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        out = x.new_empty(world_size * x.numel())  # rank r's elements at [r * numel, (r + 1) * numel)
        _all_gather_flat(out, x.reshape(-1), self.group)
        return out.view((world_size,) + tuple(x.shape))
