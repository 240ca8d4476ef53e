"""CudaIpcCommunicator: the CUDA fast path of the all-reduce chain (DESIGN.md, Communication).

Every rank of a group on one host cudaMallocs an IPC buffer (csrc/cuda/custom_all_reduce.cu); the buffers'
IPC handles are exchanged as uint8 tensors through the group's CPU (gloo) process group, and each rank maps
its peers' buffers. A collective is one kernel: every rank's block b synchronizes with block b of the others
through sequence-numbered flags in those buffers, reads its peers' inputs over NVLink/PCIe and reduces in
fp32. The decisions (whether the path applies, one-shot or two-shot, grid) are tp_kernels.comm.ipc_plan's.

CUDA graphs: outside capture an input is copied into this rank's staging buffer first (also valid inside a
capture). Inside `with comm.capture(): with torch.cuda.graph(g): ...` inputs are read in place: their
addresses are recorded during capture and exchanged by `register_graph_buffers()` when the block exits
(a collective: every rank must capture the same all-reduces in the same order).
"""
from __future__ import annotations

import contextlib
import logging
import socket
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from tp_kernels import _extension
from tp_kernels.comm import ipc_plan
from tp_kernels.comm.base import Communicator

if TYPE_CHECKING:
    from tp_kernels.distributed import TPGroup

log = logging.getLogger(__name__)
_warned: set = set()


def warn_once(key: str, message: str) -> None:
    """A fallback says why, once per kind of reason (not once per call)."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _pci_id(device_index: int) -> str:
    props = torch.cuda.get_device_properties(device_index)
    return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}"


def _peer_access_row(my_device: Optional[int], peer_pci_ids: Sequence[Optional[str]]) -> List[bool]:
    """Whether this rank's GPU can reach each rank's GPU. A peer GPU this process cannot see (another
    CUDA_VISIBLE_DEVICES) cannot be mapped, so it counts as unreachable."""
    if my_device is None:
        return [False] * len(peer_pci_ids)
    local = {_pci_id(i): i for i in range(torch.cuda.device_count())}
    row = []
    for pci in peer_pci_ids:
        peer_device = local.get(pci) if pci is not None else None
        if peer_device is None:
            row.append(False)
        elif peer_device == my_device:
            row.append(True)  # itself (two ranks on one GPU are refused by ipc_plan.group_fallback_reason)
        else:
            row.append(bool(torch.cuda.can_device_access_peer(my_device, peer_device)))
    return row


def _gather_objects(tp: TPGroup, obj) -> list:
    gathered = [None] * tp.world_size
    dist.all_gather_object(gathered, obj, group=tp.process_group)
    return gathered


def _gather_bytes(tp: TPGroup, t: torch.Tensor) -> List[torch.Tensor]:
    """all_gather of a uint8 CPU tensor of the same shape on every rank, through the CPU group."""
    parts = [torch.empty_like(t) for _ in range(tp.world_size)]
    dist.all_gather(parts, t.contiguous(), group=tp.process_group)
    return parts


class CudaIpcCommunicator(Communicator):
    """All-reduce through CUDA IPC buffers for the ranks of a TPGroup on one host; `create` makes it."""

    name = "ipc"

    def __init__(self, tp: TPGroup, impl, device: torch.device, buffer_bytes: int):
        self.tp = tp
        self.device = device
        self.buffer_bytes = buffer_bytes
        self.timeout_ms = ipc_plan.timeout_ms()
        self._impl = impl

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, tp: TPGroup, buffer_bytes: int = ipc_plan.DEFAULT_BUFFER_BYTES,
               device: Optional[torch.device] = None) -> Optional["CudaIpcCommunicator"]:
        """The communicator for tp, or None (with a warning, once, saying why) when the group cannot use
        CUDA IPC. A collective over tp's CPU group when world size > 1: call it on every rank; all ranks
        reach the same answer."""
        ipc_plan.check_buffer_bytes(buffer_bytes)
        reason, device = cls.probe(tp, device)
        if reason is not None:
            # Where this machine has a GPU and there is something to reduce, NCCL taking over is a fallback
            # worth a warning; on a CPU-only machine, or for one rank, nothing falls back.
            if torch.cuda.is_available() and tp.world_size > 1:
                warn_once(f"create:{reason}", f"CUDA IPC all-reduce disabled, NCCL is used instead: {reason}")
            return None
        impl = _extension._C.CustomAllReduce(tp.rank, tp.world_size, buffer_bytes, device.index)
        impl.open_peers(_gather_bytes(tp, impl.ipc_handle()))
        return cls(tp, impl, device, buffer_bytes)

    @staticmethod
    def probe(tp: TPGroup, device: Optional[torch.device] = None) -> Tuple[Optional[str], Optional[torch.device]]:
        """(why tp cannot use CUDA IPC, or None; this rank's device). Gathers every rank's host, GPU and
        peer reachability through tp's CPU group (a collective) unless a reason is clear without it."""
        if tp.world_size < 2 or tp.process_group is None:
            return ("world size 1 needs no all-reduce" if tp.world_size < 2 else "the group has no process group"), None
        if tp.world_size > ipc_plan.MAX_WORLD_SIZE:
            return (f"world size {tp.world_size} exceeds the {ipc_plan.MAX_WORLD_SIZE} ranks the IPC flag arrays "
                    "hold"), None
        backend = str(dist.get_backend(tp.process_group))
        if "gloo" not in backend:  # the same test on every rank: no collective needed to agree
            return (f"the group's process group ({backend}) has no CPU (gloo) backend to exchange the IPC "
                    "handles; use backend='cpu:gloo,cuda:nccl'"), None
        local_reason = ipc_plan.local_fallback_reason(torch.cuda.is_available(), _extension.built_with_cuda())
        my_device = None
        if local_reason is None:
            device = torch.device("cuda") if device is None else torch.device(device)
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            my_device = device.index
        facts: Sequence[Tuple[str, Optional[str], Optional[str]]] = _gather_objects(
            tp, (socket.gethostname(), local_reason, _pci_id(my_device) if my_device is not None else None))
        peer_access = _gather_objects(tp, _peer_access_row(my_device, [f[2] for f in facts]))
        reason = ipc_plan.group_fallback_reason(tp.world_size, [f[1] for f in facts], [f[0] for f in facts],
                                                [f[2] for f in facts], peer_access)
        return reason, (device if reason is None else None)

    # -- the chain's interface ---------------------------------------------------------------------------
    def applies(self, x: torch.Tensor) -> bool:
        if self._impl is None or x.device.type != "cuda":
            return False
        reason = ipc_plan.tensor_fallback_reason(x, self.device, self.buffer_bytes)
        if reason is not None:
            warn_once(f"tensor:{reason.split()[0]}", f"CUDA IPC all-reduce does not apply, NCCL is used: {reason}")
            return False
        return True

    def all_reduce(self, x: torch.Tensor, algo: Optional[str] = None) -> torch.Tensor:
        """The sum of x over the group. algo: None lets ipc_plan choose; ONE_SHOT or TWO_SHOT forces one."""
        impl = self._live()
        ipc_plan.check_input(x, "x", self.device, self.buffer_bytes)
        out = torch.empty_like(x)
        if x.numel() == 0:
            return out
        plan = ipc_plan.plan_all_reduce(x.numel(), x.element_size(), self.tp.world_size, self.buffer_bytes, algo)
        impl.all_reduce(x, out, plan.two_shot, plan.n_blocks, plan.chunk, self._read_in_place(x), self.timeout_ms)
        return out

    def allreduce_residual_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   eps: float, algo: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(normed, new_residual) = add_rmsnorm(all_reduce(x), residual, weight, eps), with the residual add
        and the norm done by the all-reduce kernel."""
        from tp_kernels.ops import checks

        impl = self._live()
        ipc_plan.check_input(x, "x", self.device, self.buffer_bytes)
        checks.check_add_rmsnorm(x, residual, weight, eps)
        reason = ipc_plan.fused_fallback_reason(x.shape[-1], x.element_size())
        if reason is not None:
            warn_once("fused:hidden", f"fused all-reduce + RMSNorm unavailable, running the two steps: {reason}")
            return torch.ops.tp_kernels.add_rmsnorm(self.all_reduce(x, algo), residual, weight, eps)
        residual, weight = _packed(residual), _packed(weight)
        normed, new_residual = torch.empty_like(x), torch.empty_like(x)
        if x.numel() == 0:
            return normed, new_residual
        hidden = x.shape[-1]
        plan = ipc_plan.plan_fused(x.numel() // hidden, hidden, x.element_size(), self.tp.world_size,
                                   self.buffer_bytes, algo)
        impl.allreduce_residual_rmsnorm(x, residual, weight, normed, new_residual, eps, plan.two_shot,
                                        plan.n_blocks, plan.chunk, self._read_in_place(x), self.timeout_ms)
        return normed, new_residual

    # -- CUDA graphs -------------------------------------------------------------------------------------
    def _read_in_place(self, x: torch.Tensor) -> bool:
        """Inside a capture, read x where it is (its address is registered after capture) instead of
        copying it into the staging buffer. A misaligned x is staged: the copy is capturable too."""
        return (x.is_cuda and torch.cuda.is_current_stream_capturing()
                and x.data_ptr() % ipc_plan.ALIGNMENT_BYTES == 0)

    def register_graph_buffers(self) -> int:
        """Exchange the addresses of the inputs captured since the last call and fill the tables the
        captured kernels read. Collective. Returns how many addresses were registered."""
        impl = self._live()
        records = impl.pending_graph_buffers()  # (n_pending, BUFFER_RECORD_BYTES) uint8
        counts = [int(c) for c in _gather_objects(self.tp, records.shape[0])]
        if len(set(counts)) > 1:
            raise RuntimeError(f"ranks captured different numbers of IPC all-reduces {counts}; every rank must "
                               "capture the same collectives in the same order")
        impl.register_graph_buffers(_gather_bytes(self.tp, records))
        return counts[0]

    @contextlib.contextmanager
    def capture(self):
        """Wrap torch.cuda.graph capture: the captured inputs are registered when the block exits normally
        (not after an exception: the other ranks may not be there to exchange addresses)."""
        yield self
        self.register_graph_buffers()

    # -- lifetime ----------------------------------------------------------------------------------------
    def _live(self):
        if self._impl is None:
            raise RuntimeError("the CUDA IPC communicator is closed")
        peer = self._impl.timed_out_peer()
        if peer >= 0:
            raise RuntimeError(f"CUDA IPC all-reduce: rank {peer} did not arrive at a barrier within "
                               f"{self.timeout_ms / 1000:.0f} s (TP_KERNELS_COMM_TIMEOUT); the kernel trapped and "
                               "this process's CUDA context is unusable")
        return self._impl

    def close(self) -> None:
        """Free the buffers once no peer can still be reading them. Collective (a CPU barrier)."""
        if self._impl is None:
            return
        impl, self._impl = self._impl, None
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.tp.process_group)
        impl.close()


def _packed(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and 16-byte aligned (the kernels read 128-bit packs); a fresh copy if it is not."""
    t = t.contiguous()
    return t if t.data_ptr() % ipc_plan.ALIGNMENT_BYTES == 0 else t.clone()

