"""The backends of a TPGroup's collective chain and how a chain is built from their names.

    identity (world size 1) -> the named backends, in the order given -> (nothing: no backend applies raises)

`BACKENDS` maps each name to the function that makes its communicator for a group (or returns None, with
a log line saying why, when it cannot serve the group at all): "ipc" (CUDA IPC, tp_kernels.comm.cuda_ipc),
"shm" (shared memory for CPU ranks of one host, tp_kernels.comm.shm), "torch" (torch.distributed: gloo or
NCCL, always possible). The default chain is DEFAULT_BACKENDS: CUDA IPC before shm (the two apply to
disjoint devices, and GPU tensors are the common case on GPU nodes), torch.distributed last.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence, Tuple

from tp_kernels.comm.base import Communicator, IdentityCommunicator, TorchCommunicator
from tp_kernels.comm.cuda_ipc import CudaIpcCommunicator
from tp_kernels.comm.shm import ShmCommunicator

if TYPE_CHECKING:
    from tp_kernels.distributed import TPGroup

log = logging.getLogger(__name__)

MakeCommunicator = Callable[["TPGroup"], Optional[Communicator]]

BACKENDS: Dict[str, MakeCommunicator] = {
    "ipc": CudaIpcCommunicator.create,
    "shm": ShmCommunicator.for_group,
    "torch": lambda tp: TorchCommunicator(tp.process_group),
}
DEFAULT_BACKENDS: Tuple[str, ...] = ("ipc", "shm", "torch")


def check_backend_names(backends: Sequence[str]) -> Tuple[str, ...]:
    """backends as a tuple, after checking that it names known backends, each once, at least one."""
    if isinstance(backends, str):
        raise TypeError(f"backends must be a sequence of backend names, e.g. ('shm', 'torch'), got the string "
                        f"{backends!r}")
    names = tuple(backends)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"backends must name each of {sorted(BACKENDS)} at most once, at least one of them, "
                         f"got {names}")
    return names


def build_chain(tp: "TPGroup", backends: Sequence[str], warn_missing: bool) -> Tuple[Communicator, ...]:
    """identity, then the communicators of the named backends that can serve tp, in order. Collective
    over tp's ranks (the fast paths exchange hostnames and buffer names): every rank must call it with the
    same backends. A named backend that cannot serve tp is left out; warn_missing=True (the caller asked
    for it by name) says so in a warning, else the backend's own log line says why."""
    chain = [IdentityCommunicator(tp.world_size)]
    multi_rank = tp.process_group is not None and tp.world_size > 1
    for name in check_backend_names(backends):
        if name != "torch" and not multi_rank:
            continue  # one rank: nothing to reduce, the fast paths would only set up buffers for nobody
        comm = BACKENDS[name](tp)
        if comm is None:
            if warn_missing:
                log.warning("group %r: backend %r was asked for but cannot serve this group, so it is not in the "
                            "chain (the INFO log of tp_kernels.comm says why)", tp.name, name)
            continue
        chain.append(comm)
    return tuple(chain)


__all__ = ["BACKENDS", "DEFAULT_BACKENDS", "Communicator", "CudaIpcCommunicator", "IdentityCommunicator",
           "ShmCommunicator", "TorchCommunicator", "build_chain", "check_backend_names"]
