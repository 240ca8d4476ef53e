"""TPGroup: the explicit tensor-parallel group that layers and ops take, and the one place that decides which
backend serves each of its collectives.

There is no module-level parallel state: a TPGroup is made by the caller (`TPGroup.init()` in a script,
`TPGroup.from_group(pg)` inside a job that already has process groups, `TPGroup.single()` for one rank)
and handed to every layer. Ops receive the group's *name* (a str, so torch.compile can trace the call) and
resolve it here; the only table kept is name -> TPGroup, filled when a group is made.

The backend chain (tp_kernels.comm) is fixed when the group is made: identity for one rank, then the
backends named by `backends` (default: CUDA IPC, shared memory, torch.distributed), each collective taking
the first that applies to its tensor. The only way to change which backend serves the group afterwards is
`with tp.use_backend(name): ...`, which also updates the C++ CPU kernels' table of shared-memory groups
(csrc/cpu/shm_ops.cpp), so every path (the ops from Python or C++, the layers, the overlap pipelines'
communication thread, all_gather) keeps asking the same question and gets the same answer. Making a
TPGroup over a multi-rank process group is collective: the fast paths exchange hostnames and buffer names,
after a barrier through the store that waits at most TP_KERNELS_COMM_TIMEOUT and names the ranks that did
not come (tp_kernels.comm.rendezvous).

Threads: the ranks pair collectives by the order they are issued in, so two threads issuing collectives
of one group would pair them differently on different ranks. A multi-rank group therefore serves one
thread, the one that made it (or called `bind_to_current_thread`), plus the group's own communication
thread (tp_kernels.comm.thread) and the autograd engine's threads while they run a backward pass; a
collective from any other thread raises before it communicates.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import threading
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from tp_kernels import comm
from tp_kernels._extension import _C
from tp_kernels.comm import rendezvous
from tp_kernels.comm.base import Communicator, IdentityCommunicator, comm_timeout_s
# The dtypes the C++ CPU kernels hand to a registered shared-memory communicator without asking Python:
# the ones the shm communicator serves.
from tp_kernels.comm.shm import SUPPORTED_DTYPES as _NATIVE_CPU_DTYPES

_GROUPS: Dict[str, "TPGroup"] = {}
SINGLE_GROUP_NAME = "tp_kernels.single"


class TPGroup:
    """A tensor-parallel group: `rank` and `world_size` of this process in it, the `name` ops use to find
    it, the torch.distributed `process_group` (None for a single rank), and its backend chain.

    The chain is made here from `backends` (names of tp_kernels.comm.BACKENDS, default DEFAULT_BACKENDS;
    collective over the group) or given ready-made as `communicators` (for tests and custom backends), and
    is fixed from then on: `communicators` is a read-only tuple; `use_backend` forces one of its backends
    for a block of code.
    """

    def __init__(self, rank: int, world_size: int, name: str, process_group: Optional[dist.ProcessGroup] = None,
                 *, backends: Optional[Sequence[str]] = None,
                 communicators: Optional[Sequence[Communicator]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if backends is not None and communicators is not None:
            raise ValueError("give backends (names, the chain is built) or communicators (a ready chain), not both")
        self.rank, self.world_size, self.name, self.process_group = rank, world_size, name, process_group
        self._forced: Optional[str] = None
        self._owner_thread = threading.get_ident()
        self._helper_thread: Optional[int] = None
        if communicators is not None:
            chain = tuple(communicators)
            if not chain or not all(isinstance(c, Communicator) for c in chain):
                raise TypeError(f"communicators must be a non-empty sequence of tp_kernels.comm.Communicator, "
                                f"got {communicators!r}")
            self.backends = tuple(c.name for c in chain)
        else:
            # checked before the barrier: a bad name raises here, not after waiting for the other ranks
            self.backends = comm.check_backend_names(backends if backends is not None else comm.DEFAULT_BACKENDS)
            if process_group is not None and world_size > 1:
                rendezvous.group_barrier(process_group, name, rank, world_size)
            chain = comm.build_chain(self, self.backends, warn_missing=backends is not None)
        self._chain: Tuple[Communicator, ...] = chain
        _GROUPS[self.name] = self
        self._sync_native_cpu_path()

    # -- the chain: fixed, forced only through use_backend -----------------------------------------------
    @property
    def communicators(self) -> Tuple[Communicator, ...]:
        """The chain, in order (fixed when the group was made)."""
        return self._chain

    @communicators.setter
    def communicators(self, value) -> None:
        raise AttributeError(f"the backend chain of TPGroup {self.name!r} is fixed when the group is made "
                             "(TPGroup.from_group(pg, backends=...), TPGroup.init(..., backends=...)); to force one "
                             "of its backends for a block of code use `with tp.use_backend(name): ...`")

    @property
    def forced_backend(self) -> Optional[str]:
        """The backend that use_backend forces now, or None (each collective takes the first that applies)."""
        return self._forced

    @property
    def active_communicators(self) -> Tuple[Communicator, ...]:
        """The part of the chain that serves collectives now: all of it, or identity (one rank) and the
        backend use_backend forces."""
        if self._forced is None:
            return self._chain
        return tuple(c for c in self._chain if c.name == self._forced or isinstance(c, IdentityCommunicator))

    def _named(self, name: str) -> Communicator:
        for c in self._chain:
            if c.name == name:
                return c
        raise ValueError(f"backend must be one of {[c.name for c in self._chain]} (the chain of group "
                         f"{self.name!r}), got {name!r}")

    @contextlib.contextmanager
    def use_backend(self, name: str) -> Iterator[Communicator]:
        """Inside the block, every collective of this group is served by backend `name` (or by identity at
        world size 1, where there is nothing to communicate): the ops from Python and from their C++ CPU
        kernels, the layers, the overlap pipelines' communication thread and all_gather. A tensor the
        backend cannot serve raises instead of falling through to another backend. Blocks nest; the
        previous choice is restored on exit. Every rank must enter and leave it at the same point, as
        with any collective."""
        forced = self._named(name)
        previous = self._forced
        self._forced = name
        self._sync_native_cpu_path()
        try:
            yield forced
        finally:
            self._forced = previous
            self._sync_native_cpu_path()

    def _sync_native_cpu_path(self) -> None:
        """Keep the C++ CPU kernels of all_reduce / allreduce_residual_rmsnorm (csrc/cpu/shm_ops.cpp) in step
        with the chain: they may serve this group's calls without Python only when the backend the chain
        picks for every CPU dtype they handle is one with a native communicator (shared memory)."""
        if _C is None:
            return
        picks = {self._first_applicable(torch.empty(0, dtype=d)) for d in _NATIVE_CPU_DTYPES}
        native = next(iter(picks)).native_cpu_communicator if len(picks) == 1 and None not in picks else None
        _C.register_shm_group(self.name, native)

    def _first_applicable(self, x: torch.Tensor) -> Optional[Communicator]:
        return next((c for c in self.active_communicators if c.applies(x)), None)

    def communicator_for(self, x: torch.Tensor, backend: str = "auto") -> Communicator:
        """The backend that serves a collective of x: the first of the active chain that applies, or the
        one named by backend (which must be in the active chain and apply to x)."""
        if backend == "auto":
            chosen = self._first_applicable(x)
            if chosen is None:
                raise RuntimeError(f"no backend of group {self.name!r} applies to a {x.dtype} {x.device.type} "
                                   f"tensor of shape {tuple(x.shape)} (chain {self._describe_chain()})")
            return chosen
        named = self._named(backend)
        if named not in self.active_communicators:
            raise ValueError(f"backend={backend!r} conflicts with use_backend({self._forced!r}), which forces group "
                             f"{self.name!r} to {self._forced!r} here")
        if not named.applies(x):
            raise ValueError(f"backend={backend!r} does not apply to a {x.dtype} {x.device.type} tensor of "
                             f"{x.numel()} elements in group {self.name!r} (world size {self.world_size})")
        return named

    def _describe_chain(self) -> str:
        names = [c.name for c in self.active_communicators]
        return f"{names}, forced to {self._forced!r} by use_backend" if self._forced else f"{names}"

    # -- threads: one per group (and its communication thread) -------------------------------------------
    def bind_to_current_thread(self) -> None:
        """Issue this group's collectives from the calling thread from now on (instead of the thread that
        made the group, whose calls then raise). Do it on every rank, before the thread's first collective."""
        self._owner_thread = threading.get_ident()
        for c in self._chain:
            c.bind_thread(self._owner_thread)

    def _allow_comm_thread(self, thread: int) -> None:
        """tp_kernels.comm.thread: the group's communication thread may issue its collectives too (never
        at the same time as the owner, which waits for it)."""
        self._helper_thread = thread
        for c in self._chain:
            c.allow_helper_thread(thread)

    def _check_thread(self, what: str) -> None:
        if self.world_size == 1:
            return  # nothing is paired across ranks: any thread may use a one-rank group
        me = threading.get_ident()
        # the autograd engine runs the backward of CUDA ops on its own device threads while the thread that
        # called .backward() waits for them: their collectives are that thread's
        if me != self._owner_thread and me != self._helper_thread and torch._C._current_graph_task_id() == -1:
            raise RuntimeError(
                f"TPGroup {self.name!r} (rank {self.rank}): {what} called from thread {threading.current_thread().name!r} "
                f"({me}), but the group belongs to thread {self._owner_thread}. The ranks pair collectives by the "
                "order they are issued in, so a group is used by one thread: the one that made it, or the one that "
                "called tp.bind_to_current_thread()")

    # -- the collectives: every one of the group goes through these ---------------------------------------
    def all_reduce(self, x: torch.Tensor, backend: str = "auto", out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sum of x over the group: a new tensor, or written into out (out=x: in place)."""
        self._check_thread("all_reduce")
        chosen = self.communicator_for(x, backend)
        return chosen.all_reduce(x) if out is None else chosen.all_reduce_into(x, out)

    def all_gather(self, x: torch.Tensor, dim: int, backend: str = "auto") -> torch.Tensor:
        """Every rank's x concatenated along dim, rank 0's first."""
        self._check_thread("all_gather")
        # the backend sees the gathered size: a fast path may take x but not world_size times its bytes
        chosen = self.communicator_for(x.new_empty((self.world_size,) + tuple(x.shape)), backend)
        stacked = chosen.all_gather(x.contiguous(), self.rank, self.world_size)  # (world_size, *x.shape)
        if dim == 0:
            return stacked.flatten(0, 1)
        return torch.cat(stacked.unbind(0), dim=dim)

    def allreduce_residual_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                   backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
        """add_rmsnorm(all_reduce(x), residual, weight, eps) -> (normed, new_residual), fused by the backend
        when it can."""
        self._check_thread("allreduce_residual_rmsnorm")
        return self.communicator_for(x, backend).allreduce_residual_rmsnorm(x, residual, weight, eps)

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def single(cls) -> "TPGroup":
        """One rank, no torch.distributed needed: every collective is the identity."""
        return _GROUPS.get(SINGLE_GROUP_NAME) or cls(rank=0, world_size=1, name=SINGLE_GROUP_NAME,
                                                     backends=("torch",))

    @classmethod
    def from_group(cls, pg: Optional[dist.ProcessGroup] = None,
                   backends: Optional[Sequence[str]] = None) -> "TPGroup":
        """The TPGroup over an existing process group (default: the world group). One TPGroup per process
        group: asking twice returns the same object (asking with other backends than it was made with
        raises). backends: see TPGroup; collective when the group is made."""
        if not dist.is_initialized():
            raise RuntimeError("TPGroup.from_group needs torch.distributed initialized "
                               "(call TPGroup.init() or torch.distributed.init_process_group first)")
        pg = pg if pg is not None else dist.group.WORLD
        existing = _GROUPS.get(pg.group_name)
        if existing is not None:
            if backends is not None and comm.check_backend_names(backends) != existing.backends:
                raise ValueError(f"TPGroup {existing.name!r} exists with backends {existing.backends}; its chain is "
                                 f"fixed, so it cannot be made again with backends {tuple(backends)} (close() it "
                                 "first, or use tp.use_backend(name) to force one of its backends)")
            return existing
        return cls(rank=dist.get_rank(pg), world_size=dist.get_world_size(pg), name=pg.group_name, process_group=pg,
                   backends=backends)

    @classmethod
    def init(cls, rank: Optional[int] = None, world_size: Optional[int] = None, backend: Optional[str] = None,
             init_method: Optional[str] = None, timeout_s: Optional[float] = None,
             backends: Optional[Sequence[str]] = None) -> "TPGroup":
        """Initialize torch.distributed for a script and return the world TPGroup.

        Explicit arguments win; otherwise torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
        MASTER_PORT). With world size 1 and nothing initialized, no process group is made.
        backend is torch.distributed's (default "cpu:gloo,cuda:nccl" when CUDA is available, else "gloo");
        backends names the group's collective chain (see TPGroup). timeout_s bounds the rendezvous and
        every collective of the process group (default TP_KERNELS_COMM_TIMEOUT, 60 s); a rank that does not
        come within it is named in the error (env://, tcp:// and file:// init methods).
        """
        if dist.is_initialized():
            return cls.from_group(backends=backends)
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if world_size == 1 and init_method is None and "MASTER_ADDR" not in os.environ:
            return cls.single()
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if backend.endswith("nccl") and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        timeout_s = comm_timeout_s() if timeout_s is None else timeout_s
        init_method = init_method or "env://"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = rendezvous.init_store(init_method, rank, world_size, timeout_s)
        if store is None:  # another scheme: torch's rendezvous, bounded by timeout_s but naming nobody
            dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timeout)
        else:
            rendezvous.barrier(store, "tp_kernels/init", rank, world_size, timeout_s, "torch.distributed rendezvous")
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        return cls.from_group(backends=backends)

    def close(self) -> None:
        """Release the communicators' resources and forget the name. The process group is the caller's."""
        for c in self._chain:
            c.close()
        if _GROUPS.get(self.name) is self:
            _GROUPS.pop(self.name)
            if _C is not None:
                _C.register_shm_group(self.name, None)

    def __repr__(self) -> str:
        return (f"TPGroup(name={self.name!r}, rank={self.rank}, world_size={self.world_size}, "
                f"chain={self._describe_chain()})")


def resolve(name: str) -> TPGroup:
    """The TPGroup registered under name (what ops receive as their `group` argument)."""
    try:
        return _GROUPS[name]
    except KeyError:
        raise ValueError(f"group {name!r} is not a known TPGroup in this process (known: {sorted(_GROUPS)}); "
                         "make one with TPGroup.init(), TPGroup.from_group(pg) or TPGroup.single()") from None


__all__ = ["TPGroup", "resolve"]
