"""CudaIpcCommunicator: the CUDA fast path of the all-reduce chain (DESIGN.md, Communication).

Every rank of a group on one host cudaMallocs an IPC buffer (csrc/cuda/custom_all_reduce.cu); the buffers'
IPC handles are exchanged as uint8 tensors through the group's CPU (gloo) process group, and each rank maps
its peers' buffers. A collective is one kernel: every rank's block b synchronizes with block b of the others
through sequence-numbered flags in those buffers, reads its peers' inputs over NVLink/PCIe and reduces in
fp32. The decisions (whether the path applies, one-shot or two-shot, grid) are tp_kernels.comm.ipc_plan's.

Collective calls (every rank of the group makes them, in the same order): `create`, `capture()`'s exit,
`register_graph_buffers`, `release_graph_buffers`, `close`, and every all-reduce. The all-reduces of one
communicator must be ordered on each rank (one stream, or streams that wait for each other): they share
the staging buffer and the barrier counters.

Connecting (`create`): the handles are exported and exchanged, the peers mapped, and every rank reads a known
pattern from every peer's buffer with the kernels' loads (some drivers claim peer access and move garbage).
After each step the ranks agree: if any rank failed, every rank frees what it made and declines, and the
warning names the rank and the reason, so no rank keeps a fast path its peers lack.

CUDA graphs (tp_kernels.comm.ipc_graphs explains the slots): outside `capture()` an input is copied into this
rank's staging buffer first, which is also valid in any capture (a bare `torch.cuda.graph`, torch.compile's
CUDA graphs). Inside `with comm.capture(): with torch.cuda.graph(g): ...` captured inputs are read in place:
each captured call gets its own slot, filled by `register_graph_buffers()` when the block exits. Peers' graph
memory stays mapped until `release_graph_buffers()` or `close()`: call one of them (on every rank) before a
rank frees captured graphs' memory (`del graph; torch.cuda.empty_cache()`), since CUDA forbids freeing memory
another process still maps.

Teardown (`close`): every rank synchronizes and closes its mappings, the group meets at a barrier, then every
rank frees its buffer.
"""
from __future__ import annotations

import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from tp_kernels import _extension
from tp_kernels.comm import ipc_plan, ipc_topology
from tp_kernels.comm.ipc_graphs import GraphSlots
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


def _gather_objects(tp: TPGroup, obj) -> list:
    gathered = [None] * tp.world_size
    dist.all_gather_object(gathered, obj, group=tp.process_group)
    return gathered


def _gather_tensors(tp: TPGroup, t: torch.Tensor) -> List[torch.Tensor]:
    """all_gather of a CPU tensor of the same shape and dtype on every rank, through the CPU group."""
    parts = [torch.empty_like(t) for _ in range(tp.world_size)]
    dist.all_gather(parts, t.contiguous(), group=tp.process_group)
    return parts


class _Declined(Exception):
    """A step of connecting failed on at least one rank; the message names the ranks and why."""


def _attempt(step: Callable[[], None]) -> Optional[str]:
    """None if step ran, else the first line of its error (torch's C++ errors append a long trace)."""
    try:
        step()
        return None
    except Exception as error:  # noqa: BLE001  (any failure declines the group: reported, never swallowed)
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _agree(tp: TPGroup, error: Optional[str]) -> None:
    """Collective: raise _Declined on every rank if any rank's step failed."""
    failed = [f"rank {r}: {e}" for r, e in enumerate(_gather_objects(tp, error)) if e is not None]
    if failed:
        raise _Declined("; ".join(failed))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _teardown(tp: TPGroup, impl, device: torch.device) -> None:
    """Close this rank's mappings, barrier, free: CUDA forbids freeing memory another process still maps.
    Collective. A failure before the barrier is logged, not raised, so that every rank reaches it."""
    try:
        if impl.error_word() == 0:  # after a trap the context is unusable: nothing runs any more
            _synchronize(device)    # this rank's kernels, which read the peers' memory, are done
    except RuntimeError as error:
        log.warning("CUDA IPC all-reduce: synchronizing before teardown failed: %s", error)
    impl.close_peer_handles()           # [T1] this rank maps no peer memory any more
    dist.barrier(group=tp.process_group)  # [T2] every rank has done [T1]
    impl.free_buffers()                 # [T3] so no one maps this rank's buffer


class CudaIpcCommunicator(Communicator):
    """All-reduce through CUDA IPC buffers for the ranks of a TPGroup on one host; `create` makes it."""

    name = "ipc"

    def __init__(self, tp: TPGroup, impl, device: torch.device, buffer_bytes: int,
                 max_blocks: int = ipc_plan.MAX_BLOCKS):
        self.tp = tp
        self.device = device
        self.buffer_bytes = buffer_bytes
        self.max_blocks = max_blocks  # the grid limit of every plan: the same on every rank (see connect)
        self.timeout_ms = ipc_plan.kernel_timeout_ms()
        self._impl = impl
        self._graphs = GraphSlots(tp.rank, tp.world_size)
        self._capturing = False

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, tp: TPGroup, buffer_bytes: int = ipc_plan.DEFAULT_BUFFER_BYTES,
               device: Optional[torch.device] = None,
               allow_shared_gpu: Optional[bool] = None) -> Optional["CudaIpcCommunicator"]:
        """The communicator for tp, or None (with a warning, once, saying why) when the group cannot use
        CUDA IPC. A collective over tp's CPU group when world size > 1: call it on every rank; all ranks
        reach the same answer. allow_shared_gpu (default: ipc_plan.SHARED_GPU_ENV) is the test switch that
        lets ranks sharing a GPU use the kernels."""
        comm, reason = cls.create_or_reason(tp, buffer_bytes, device, allow_shared_gpu)
        # Where this machine has a GPU and there is something to reduce, NCCL taking over is a fallback
        # worth a warning; on a CPU-only machine, or for one rank, nothing falls back.
        if comm is None and torch.cuda.is_available() and tp.world_size > 1:
            warn_once(f"create:{reason}", f"CUDA IPC all-reduce disabled, NCCL is used instead: {reason}")
        return comm

    @classmethod
    def create_or_reason(cls, tp: TPGroup, buffer_bytes: int = ipc_plan.DEFAULT_BUFFER_BYTES,
                         device: Optional[torch.device] = None, allow_shared_gpu: Optional[bool] = None
                         ) -> Tuple[Optional["CudaIpcCommunicator"], Optional[str]]:
        """create, without the warning: (communicator, None) or (None, why not)."""
        ipc_plan.check_buffer_bytes(buffer_bytes)
        if allow_shared_gpu is None:
            allow_shared_gpu = ipc_plan.allow_shared_gpu()
        reason, device = cls.probe(tp, device, allow_shared_gpu)
        if reason is not None:
            return None, reason
        impl = None

        def construct():
            nonlocal impl
            impl = _extension._C.CustomAllReduce(tp.rank, tp.world_size, buffer_bytes, device.index)

        try:  # one rank failing to allocate (out of memory, say) must not leave the others waiting in connect
            _agree(tp, _attempt(construct))
        except _Declined as declined:
            if impl is not None:
                impl.free_buffers()  # nothing was exported yet, so nobody maps it
            return None, f"allocating the IPC buffers failed ({declined})"
        return cls.connect(tp, impl, device, buffer_bytes)

    @classmethod
    def connect(cls, tp: TPGroup, impl, device: torch.device,
                buffer_bytes: int) -> Tuple[Optional["CudaIpcCommunicator"], Optional[str]]:
        """(communicator, None), or (None, why) with impl torn down on every rank. Collective: exports and
        exchanges the handles, maps the peers, checks a transfer from every peer; the ranks agree after each
        step, so either all of them get a communicator or none does."""
        handle = torch.zeros(ipc_plan.IPC_HANDLE_BYTES, dtype=torch.uint8)

        def export():
            nonlocal handle
            handle = impl.ipc_handle()

        try:
            _agree(tp, _attempt(export))
            handles = _gather_tensors(tp, handle)
            _agree(tp, _attempt(lambda: impl.open_peers(handles)))
            n_words = ipc_plan.transfer_check_words(buffer_bytes)
            _agree(tp, _attempt(lambda: impl.write_staging(ipc_plan.transfer_pattern(tp.rank, n_words).to(device))))
            _agree(tp, _attempt(lambda: _check_transfers(tp, impl, device, n_words)))  # also: every rank read
            resident = _gather_objects(tp, (impl.max_resident_blocks(), _gpu_key(device)))
            max_blocks = ipc_plan.grid_limit([n for n, _ in resident], [gpu for _, gpu in resident])
            _agree(tp, None if max_blocks >= 1 else f"the GPUs run {[n for n, _ in resident]} blocks at once, "
                   "too few for the ranks that share them")
        except _Declined as declined:
            _teardown(tp, impl, device)
            return None, f"connecting the ranks failed ({declined})"
        return cls(tp, impl, device, buffer_bytes, max_blocks), None

    @staticmethod
    def probe(tp: TPGroup, device: Optional[torch.device] = None,
              allow_shared_gpu: bool = False) -> Tuple[Optional[str], Optional[torch.device]]:
        """(why tp cannot use CUDA IPC, or None; this rank's device). Gathers every rank's host, GPU, peer
        reachability and (above 2 ranks) NVLink through tp's CPU group (a collective) unless a reason is
        clear without it."""
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
        my_device, my_pci = None, None
        if local_reason is None:
            device = torch.device("cuda") if device is None else torch.device(device)
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            my_device, my_pci = device.index, ipc_topology.pci_id(device.index)
        facts: Sequence[Tuple[str, Optional[str], Optional[str], bool]] = _gather_objects(
            tp, (socket.gethostname(), local_reason, my_pci, bool(allow_shared_gpu)))
        pcis = [f[2] for f in facts]
        peer_access = _gather_objects(tp, ipc_topology.peer_access_row(my_device, pcis))
        nvlink = _gather_objects(tp, ipc_topology.nvlink_row(my_pci, pcis)) if tp.world_size > 2 else None
        shared_allowed = all(f[3] for f in facts)  # the switch counts only if every rank set it
        reason = ipc_plan.group_fallback_reason(tp.world_size, [f[1] for f in facts], [f[0] for f in facts], pcis,
                                                peer_access, nvlink, shared_allowed)
        if reason is None and len(set(pcis)) < tp.world_size:
            warn_once("shared-gpu", f"CUDA IPC all-reduce serves ranks that share a GPU ({ipc_plan.SHARED_GPU_ENV}"
                                    "): a test setting, slower than one process per GPU")
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
        x = x.contiguous() if isinstance(x, torch.Tensor) else x
        ipc_plan.check_input(x, "x", self.device, self.buffer_bytes)
        out = torch.empty_like(x)
        if x.numel() == 0:
            return out
        plan = ipc_plan.plan_all_reduce(x.numel(), x.element_size(), self.tp.world_size, self.buffer_bytes, algo,
                                        max_blocks=self.max_blocks)
        slot, stage = self._input_slot(x, "all_reduce")
        impl.all_reduce(x, out, plan.two_shot, plan.n_blocks, plan.chunk, slot, stage, self.timeout_ms)
        return out

    def allreduce_residual_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   eps: float, algo: Optional[str] = None,
                                   split: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(normed, new_residual) = add_rmsnorm(all_reduce(x), residual, weight, eps), with the residual add
        and the norm done by the all-reduce kernel. split forces the blocks per row (tests)."""
        from tp_kernels.ops import checks

        impl = self._live()
        x = x.contiguous() if isinstance(x, torch.Tensor) else x
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
                                   self.buffer_bytes, algo, split, max_blocks=self.max_blocks)
        slot, stage = self._input_slot(x, "allreduce_residual_rmsnorm")
        impl.allreduce_residual_rmsnorm(x, residual, weight, normed, new_residual, eps, plan.two_shot,
                                        plan.n_blocks, plan.chunk, plan.split, slot, stage, self.timeout_ms)
        return normed, new_residual

    # -- CUDA graphs -------------------------------------------------------------------------------------
    def _input_slot(self, x: torch.Tensor, op: str) -> Tuple[int, bool]:
        """(slot, stage): a slot of its own, read in place when aligned, for a call captured inside
        capture(); the staging buffers (slot 0) for everything else, captured or not."""
        if self._capturing and torch.cuda.is_current_stream_capturing():
            return self._graphs.claim(x.data_ptr(), x.numel() * x.element_size(), op, lambda: self._locate(x))
        return 0, True

    def _locate(self, x: torch.Tensor) -> Optional[Tuple[int, int]]:
        """(base, offset) of x's allocation, found now while x is alive; None (x is then staged, with a
        warning once) where x's memory cannot be exported: not torch's native caching allocator (the
        cudaMallocAsync backend's pools need another export API), an expandable segment (torch refuses to
        locate those: they are not cudaMalloc'd), or memory torch did not allocate."""
        why = None
        backend = torch.cuda.memory.get_allocator_backend()
        if backend != "native":
            why = f"the {backend} allocator backend's memory cannot be exported with cudaIpcGetMemHandle"
        else:
            try:
                return self._impl.locate_input(x)
            except RuntimeError as error:
                why = str(error).splitlines()[0]
        warn_once("locate", f"CUDA IPC all-reduce: captured inputs are copied into the staging buffer instead of "
                            f"read in place: {why}")
        return None

    @contextlib.contextmanager
    def capture(self):
        """Wrap torch.cuda.graph capture so captured inputs are read in place; the captured calls are
        registered when the block exits (a collective). After an exception they are discarded (a replay of
        them would trap), and this rank still takes part in the exchange, reporting the failure, so that the
        peers raise naming it instead of waiting for it until the process group's timeout."""
        self._live()
        if self._capturing:
            raise RuntimeError("CudaIpcCommunicator.capture() blocks cannot be nested")
        self._capturing = True
        try:
            yield self
        except BaseException as error:
            self._capturing = False
            self._graphs.discard_pending()
            with contextlib.suppress(Exception):  # the capture's own error is the one to raise here
                self._exchange_records(failure=f"its capture raised {type(error).__name__}")
            raise
        finally:
            self._capturing = False
        self.register_graph_buffers()

    def register_graph_buffers(self) -> int:
        """Exchange the records of the calls captured inside capture() since the last call and fill their
        slots. Collective. Returns how many calls were registered."""
        return self._exchange_records(failure=None)

    def _exchange_records(self, failure: Optional[str]) -> int:
        """register_graph_buffers; failure: why this rank has nothing to register (every rank then raises)."""
        impl = self._live()
        records, error = None, failure
        if failure is None:
            try:
                records = self._graphs.local_records(impl.export_allocation)
            except RuntimeError as e:
                error = str(e).splitlines()[0]
        outcomes = _gather_objects(self.tp, (len(self._graphs.pending), error))
        counts = [n for n, _ in outcomes]
        failed = [f"rank {r}: {e}" for r, (_, e) in enumerate(outcomes) if e is not None]
        if failed or len(set(counts)) > 1:
            self._graphs.discard_pending()
            raise RuntimeError("registering the captured IPC all-reduces failed: " + (
                "; ".join(failed) if failed else
                f"ranks captured different numbers of them {counts}; every rank must capture the same "
                "collectives in the same order"))
        if counts[0] == 0:
            return 0
        gathered = _gather_tensors(self.tp, records)
        staging = [impl.staging_address(r) for r in range(self.tp.world_size)]
        table = None

        def build():
            nonlocal table
            table = self._graphs.table(gathered, impl.open_buffer, staging)

        try:
            _agree(self.tp, _attempt(build))  # a peer allocation one rank cannot map fails every rank
        except _Declined as declined:
            self._graphs.discard_pending()
            raise RuntimeError(f"registering the captured IPC all-reduces failed: {declined}") from None
        first, n = self._graphs.commit()
        impl.write_slots(first, table)
        return n

    def release_graph_buffers(self) -> None:
        """Unmap the peers' captured inputs and empty every slot filled so far (a later replay of a graph
        captured before traps, naming its slot, instead of reading freed memory). Collective: on return no
        rank maps another's graph memory, so graphs may be freed and torch.cuda.empty_cache() called."""
        impl = self._live()
        if self._capturing:
            raise RuntimeError("release_graph_buffers() inside capture()")
        _synchronize(self.device)  # no replay still reads what is unmapped below
        impl.release_graph_buffers(self._graphs.next_slot)
        dist.barrier(group=self.tp.process_group)

    # -- lifetime ----------------------------------------------------------------------------------------
    def _live(self):
        if self._impl is None:
            raise RuntimeError("the CUDA IPC communicator is closed")
        error = ipc_plan.describe_kernel_error(self._impl.error_word(), self.timeout_ms)
        if error is not None:
            raise RuntimeError(f"CUDA IPC all-reduce: {error}")
        return self._impl

    def close(self) -> None:
        """Free the buffers once no peer maps them. Collective (a CPU barrier); idempotent; also after a
        kernel trapped."""
        if self._impl is None:
            return
        impl, self._impl = self._impl, None
        _teardown(self.tp, impl, self.device)


def _check_transfers(tp: TPGroup, impl, device: torch.device, n_words: int) -> None:
    """Read every peer's transfer pattern out of its staging buffer; raise if any word is wrong."""
    got = torch.empty(n_words, dtype=torch.int32, device=device)
    for peer in range(tp.world_size):
        if peer == tp.rank:
            continue
        got.fill_(-1)  # never a pattern word (they are >= 0)
        impl.read_peer_staging(peer, got)
        wrong = int((got.cpu() != ipc_plan.transfer_pattern(peer, n_words)).sum())
        if wrong:
            raise RuntimeError(f"{wrong} of {n_words} words read from rank {peer}'s buffer are wrong: the driver "
                               "reports peer access but moves wrong data")


def _gpu_key(device: torch.device) -> str:
    """What tells this rank's GPU from its peers' (the PCI address: CUDA_VISIBLE_DEVICES may number one GPU
    differently in each process)."""
    return ipc_topology.pci_id(device.index) if device.type == "cuda" else str(device)


def _packed(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and 16-byte aligned (the kernels read 128-bit packs); a fresh copy if it is not."""
    t = t.contiguous()
    return t if t.data_ptr() % ipc_plan.ALIGNMENT_BYTES == 0 else t.clone()
