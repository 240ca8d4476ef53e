"""Symmetric buffers: for a TP group, a buffer of the same layout on every rank, mapped into every rank's
address space, with a pointer table a kernel indexes by rank. The fused GEMM + collective kernels
(tp_kernels/kernels/gemm_collective*.py) write tiles into peers' buffers and raise or wait on signal
words there; nothing else moves data between ranks.

Layout of one rank's buffer (the same on every rank; parities alternate between calls, so a call never
overwrites data a slower peer may still be reading from the previous call, see the protocol module):

    [signals, parity 0 | signals, parity 1 | data, parity 0 | data, parity 1]
     n_signals int64      n_signals int64    data_bytes       data_bytes

Beside it every rank holds, locally, `control` (int64 words on the kernels' device: the call epoch all
ranks advance in step, an arrival counter, a sticky failure word) and `status` (int64 words the host can
read without synchronizing: the rank a wait gave up on, and the abort flag of the CPU watchdog).

Backends:
- CPU (ranks are processes of one host; the kernels run under TRITON_INTERPRET=1): one shared segment
  of world_size buffers (tp_kernels.comm.segment: memfd, 0600, sealed, secret-checked, no name in any
  file system), mapped by every rank. A wait is bounded by a watchdog thread that raises the abort flag
  after the timeout (the interpreter has no clock a kernel can read).
- CUDA (ranks on one host, one GPU each or several sharing one): every rank allocates its buffer with
  torch's CUDA caching allocator and the ranks exchange CUDA IPC handles (torch.multiprocessing's
  tensor reduction) over the group's CPU (gloo) process group. A wait is bounded in the kernel by the
  GPU's global timer. `status` is pinned host memory, so a failed wait is seen at the next call without
  a device synchronization. Not yet run on a GPU (tests/gpu/test_gemm_collective_gpu.py).

Groups opt in with `SymmetricBuffer.create(tp, ...)` (collective), which registers the buffer under the
group's name; `buffer_of(name)` is how ops find it.
"""
from __future__ import annotations

import logging
import pickle
import threading
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from tp_kernels.comm import segment as segment_mod

log = logging.getLogger(__name__)

SIGNAL_BYTES = 8  # one int64 word per signal
# control words (device-local)
CONTROL_EPOCH, CONTROL_ARRIVALS, CONTROL_FAILED = 0, 1, 2
CONTROL_WORDS = 4
# status words (host-readable)
STATUS_MISSING, STATUS_ABORT = 0, 1
STATUS_WORDS = 4
# Each region starts on a 256-byte boundary: 16-byte vector loads and stores of the tiles need 16, and
# 256 keeps rows of typical widths from straddling more cache lines than they must.
ALIGNMENT_BYTES = 256
# CPU (interpreter) defaults: a few small test shapes per call. CUDA defaults: a two-shot all-reduce of
# M x N bf16 needs 2 M N bytes per parity (partial slots + relayed tiles): 64 MiB covers M = 4096 tokens
# at N = 8192; larger calls take the chunked pipeline.
DEFAULT_DATA_BYTES = {"cpu": 1 << 20, "cuda": 64 << 20}
DEFAULT_SIGNALS = {"cpu": 4096, "cuda": 1 << 16}
MAX_WORLD_SIZE = 8  # one NVLink domain; the interpreter tests use at most 4 ranks

_BUFFERS: Dict[str, "SymmetricBuffer"] = {}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def buffer_bytes(data_bytes: int, n_signals: int) -> int:
    """Bytes of one rank's buffer."""
    return _round_up(2 * n_signals * SIGNAL_BYTES, ALIGNMENT_BYTES) + 2 * _round_up(data_bytes, ALIGNMENT_BYTES)


class SymmetricBufferError(RuntimeError):
    """A fused collective could not complete: a rank did not arrive (timeout) or the buffer is unusable."""


class SymmetricBuffer:
    """One rank's view of a group's symmetric buffers. Make it with `create` (collective)."""

    def __init__(self, tp_name: str, rank: int, world_size: int, device: torch.device, data_bytes: int,
                 n_signals: int, pointers: torch.Tensor, timeout_s: float, keepalive: list, on_close):
        self.tp_name = tp_name
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.data_bytes = data_bytes  # per parity
        self.n_signals = n_signals  # per parity
        self.data_offset = _round_up(2 * n_signals * SIGNAL_BYTES, ALIGNMENT_BYTES)  # signals come first
        self.pointers = pointers  # (world_size,) int64 on device: rank r's buffer address in this process
        self.timeout_s = timeout_s
        self.control = torch.zeros(CONTROL_WORDS, dtype=torch.int64, device=device)
        self.control[CONTROL_EPOCH] = 1  # signal words start at 0, which no call's tag equals
        self.status = torch.zeros(STATUS_WORDS, dtype=torch.int64,
                                  pin_memory=device.type == "cuda")
        self.calls = 0
        self.failure: Optional[str] = None
        self._keepalive = keepalive  # what backs the mappings (segment, local and peer tensors)
        self._on_close = on_close
        self._watchdog: Optional[_Watchdog] = None

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, tp, data_bytes: Optional[int] = None, n_signals: Optional[int] = None,
               device: Optional[torch.device] = None, timeout_s: Optional[float] = None,
               register: bool = True) -> "SymmetricBuffer":
        """Make the group's symmetric buffers on `device` (default: CPU; a CUDA device for GPU ranks).
        Collective over tp's process group (which must have a gloo backend: handles and segment
        invitations are Python objects). Raises SegmentError / SymmetricBufferError on every rank when
        any rank fails. register=True makes it the buffer `buffer_of(tp.name)` returns."""
        from tp_kernels.comm.base import comm_timeout_s

        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        kind = device.type
        if kind not in DEFAULT_DATA_BYTES:
            raise ValueError(f"device must be cpu or cuda, got {device}")
        data_bytes = DEFAULT_DATA_BYTES[kind] if data_bytes is None else data_bytes
        n_signals = DEFAULT_SIGNALS[kind] if n_signals is None else n_signals
        for name, value in (("data_bytes", data_bytes), ("n_signals", n_signals)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 1 <= tp.world_size <= MAX_WORLD_SIZE:
            raise ValueError(f"symmetric buffers support 1 to {MAX_WORLD_SIZE} ranks, got world size {tp.world_size}")
        if tp.world_size > 1 and tp.process_group is None:
            raise ValueError(f"group {tp.name!r} has no process group to exchange buffers over")
        timeout_s = comm_timeout_s() if timeout_s is None else float(timeout_s)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        per_rank = buffer_bytes(data_bytes, n_signals)
        _check_agreement(tp, (kind, data_bytes, n_signals))
        if kind == "cpu":
            pointers, keepalive = _map_cpu(tp, per_rank)
        else:
            pointers, keepalive = _map_cuda(tp, per_rank, device)
        buf = cls(tp.name, tp.rank, tp.world_size, device, data_bytes, n_signals,
                  torch.tensor(pointers, dtype=torch.int64, device=device), timeout_s, keepalive,
                  lambda: _barrier(tp))
        if register:
            old = _BUFFERS.get(tp.name)
            if old is not None and old is not buf:
                log.info("replacing the symmetric buffer of group %r", tp.name)
            _BUFFERS[tp.name] = buf
        return buf

    # -- capacity ----------------------------------------------------------------------------------------
    def capacity_reason(self, data_bytes: int, n_signals: int) -> Optional[str]:
        """Why a call needing data_bytes and n_signals per parity does not fit, or None."""
        if data_bytes > self.data_bytes:
            return f"needs {data_bytes} bytes of symmetric buffer, the group's holds {self.data_bytes}"
        if n_signals > self.n_signals:
            return f"needs {n_signals} signal words, the group's buffer holds {self.n_signals}"
        return None

    # -- one call ----------------------------------------------------------------------------------------
    def begin_call(self, op: str) -> None:
        """Before a launch: refuse a closed or failed buffer, see a failure of an earlier (GPU) call, and
        on CPU arm the watchdog that bounds every wait of this call."""
        if self.closed:
            raise SymmetricBufferError(f"{op}: the symmetric buffer of group {self.tp_name!r} is closed")
        self._raise_if_failed(op)
        self.calls += 1
        if self.device.type == "cpu":
            self.status[STATUS_ABORT] = 0
            self._watchdog = _Watchdog(self.status, self.timeout_s)

    def end_call(self, op: str) -> None:
        """After a launch: on CPU (synchronous) disarm the watchdog and raise if a wait gave up."""
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self.device.type == "cpu":
            self._raise_if_failed(op)

    def _raise_if_failed(self, op: str) -> None:
        if self.failure is None:
            missing = int(self.status[STATUS_MISSING])  # pinned host memory on CUDA: no device sync
            if missing:
                self.failure = (f"rank {missing - 1} did not arrive within {self.timeout_s:g} s "
                                f"(TP_KERNELS_COMM_TIMEOUT) at call {self.calls} on this symmetric buffer of group "
                                f"{self.tp_name!r} (rank {self.rank}): it is missing, stalled, or called with "
                                "different arguments (shape, dtype, bias or algorithm)")
                raise SymmetricBufferError(f"{op}: {self.failure}")
        if self.failure is not None:
            raise SymmetricBufferError(f"{op}: the symmetric buffer is unusable after an earlier failure: "
                                       f"{self.failure}; make the group's buffers again")

    def check(self) -> None:
        """Raise if a call on this buffer failed (on CUDA, after synchronizing, to see the last one)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._raise_if_failed("check")

    # -- lifetime ----------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._keepalive is None

    def close(self) -> None:
        """Unmap the buffers once no peer can still write into them. Collective (a barrier over the
        group). Idempotent."""
        if self.closed:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._on_close()
        keepalive, self._keepalive = self._keepalive, None
        self.pointers = None
        for item in keepalive:
            if isinstance(item, segment_mod.Segment):
                item.close()
        if _BUFFERS.get(self.tp_name) is self:
            del _BUFFERS[self.tp_name]


class _Watchdog:
    """The interpreter's clock for the waits of one call: raises status[STATUS_ABORT] by one per
    timeout_s elapsed (read by wait_signals, which gives up at its patience, 1 or 2), until stopped."""

    LEVELS = 2  # the longest patience of a wait

    def __init__(self, status: torch.Tensor, timeout_s: float):
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(status, timeout_s), daemon=True,
                                        name="tp_kernels-symmetric-watchdog")
        self._thread.start()

    def _run(self, status: torch.Tensor, timeout_s: float) -> None:
        for level in range(1, self.LEVELS + 1):
            if self._stopped.wait(timeout_s):
                return
            status[STATUS_ABORT] = level

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def buffer_of(tp_name: str) -> Optional[SymmetricBuffer]:
    """The registered symmetric buffer of the group with this name, or None."""
    buf = _BUFFERS.get(tp_name)
    return None if buf is None or buf.closed else buf


def _check_agreement(tp, layout: tuple) -> None:
    """Every rank must ask for the same layout (device kind, data bytes, signals): a kernel computes a
    peer's addresses from its own. Raises on every rank, naming the ranks that differ."""
    if tp.world_size == 1:
        return
    layouts: List[Optional[tuple]] = [None] * tp.world_size
    dist.all_gather_object(layouts, layout, group=tp.process_group)
    differ = [r for r, other in enumerate(layouts) if other != layouts[0]]
    if differ:
        raise SymmetricBufferError(f"symmetric buffers of group {tp.name!r}: ranks asked for different layouts "
                                   f"(device kind, data_bytes, n_signals): " +
                                   ", ".join(f"rank {r}: {layouts[r]}" for r in [0, *differ]))


def _barrier(tp) -> None:
    if tp.world_size > 1:
        dist.barrier(group=tp.process_group)


def _map_cpu(tp, per_rank: int):
    """One segment of world_size buffers; rank r's buffer at offset r * per_rank."""
    if tp.world_size == 1:
        seg, _ = segment_mod.create(per_rank, f"{tp.name}/symmetric")
        seg.close_fd()
    else:
        seg = segment_mod.share(tp.process_group, tp.rank, tp.world_size * per_rank, f"{tp.name}/symmetric")
    return [seg.address + r * per_rank for r in range(tp.world_size)], [seg]


def _map_cuda(tp, per_rank: int, device: torch.device):
    """Every rank allocates its buffer; CUDA IPC handles are exchanged over the CPU group."""
    from torch.multiprocessing.reductions import ForkingPickler

    local = torch.zeros(per_rank, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)  # the zeros are in place before any peer can see the buffer
    if tp.world_size == 1:
        return [local.data_ptr()], [local]
    handles: List[Optional[bytes]] = [None] * tp.world_size
    dist.all_gather_object(handles, bytes(ForkingPickler.dumps(local)), group=tp.process_group)
    tensors = [local if r == tp.rank else pickle.loads(h) for r, h in enumerate(handles)]
    return [t.data_ptr() for t in tensors], tensors
