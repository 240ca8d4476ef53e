"""The fast paths of the all-reduce chain (tp_kernels.distributed): communicators that beat
torch.distributed where their predicate holds. The chain of a group is

    identity (world size 1) -> FAST_PATHS, in order -> torch.distributed (gloo / NCCL)

Each entry of FAST_PATHS makes its communicator for a TPGroup (or returns None when it cannot serve the
group at all); a communicator's `applies(x)` then decides per tensor. A CUDA IPC communicator belongs
before shm: the two apply to disjoint devices, and GPU tensors are the common case on GPU nodes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional

from tp_kernels.comm.cuda_ipc import CudaIpcCommunicator
from tp_kernels.comm.shm import ShmCommunicator

if TYPE_CHECKING:
    from tp_kernels.distributed import Communicator, TPGroup

FastPath = Callable[["TPGroup"], Optional["Communicator"]]

FAST_PATHS: List[FastPath] = [CudaIpcCommunicator.create, ShmCommunicator.for_group]


def fast_path_communicators(tp: "TPGroup") -> List["Communicator"]:
    """The fast-path communicators of tp, in chain order. Collective over tp's ranks (they exchange
    hostnames and a segment name), so every rank of the group must call it."""
    communicators = []
    for make in FAST_PATHS:
        comm = make(tp)
        if comm is not None:
            communicators.append(comm)
    return communicators


__all__ = ["FAST_PATHS", "CudaIpcCommunicator", "ShmCommunicator", "fast_path_communicators"]
