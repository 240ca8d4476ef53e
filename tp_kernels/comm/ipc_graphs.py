"""Which peer addresses a CUDA-graph-captured IPC all-reduce reads: the slots of the device table of peer
pointers (csrc/cuda/custom_all_reduce_kernels.h, RankData), in plain Python so that it is tested on CPU.

A kernel finds every rank's input through one slot of the table. Slot 0 holds the staging buffers: eager
calls, and calls captured outside `CudaIpcCommunicator.capture()`, copy their input there first. Inside
`capture()` every captured call takes a slot of its own, in capture order, and is recorded here; when the
capture ends the ranks exchange their records and each fills its slots with the addresses, as it maps them,
of every rank's input of that call. Rules this follows (each one a bug it replaces):
- One slot per captured call, never reused (append-only): the calls of the ranks are paired by their
  position in capture order, never by an address (a peer's input of the same call can live elsewhere), and a
  slot is never refilled with other pointers while a graph that reads it may still be replayed.
- Each rank decides alone whether it reads its input in place (16-byte aligned, and memory of torch's caching
  allocator: yes) or stages it, and its record says which, so the peers read its staging buffer for that call
  exactly when it filled it.
- Where an in-place input lives (its allocation's base and its offset in it) is looked up when the call is
  captured, not when the records are exchanged: a captured input is usually a temporary (a GEMM's output,
  `x.contiguous()`) that is already freed when the capture ends, and torch's allocator then no longer knows
  it; the allocation itself lives on in the graph's private pool.
- The records carry each call's byte count and kind, so ranks that captured different collectives raise
  instead of pairing the wrong calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from tp_kernels.comm.ipc_plan import ALIGNMENT_BYTES, IPC_HANDLE_BYTES, MAX_SLOTS

OPS = ("all_reduce", "allreduce_residual_rmsnorm")
# A record, as int64 words: [in_place (0/1), offset into the exported allocation, bytes, op index,
# the allocation's IPC handle (IPC_HANDLE_BYTES)].
RECORD_WORDS = 4 + IPC_HANDLE_BYTES // 8


@dataclass(frozen=True)
class CapturedCall:
    """One all-reduce captured inside capture(): its slot; if read in place (else None: staged) its input's
    address, and the base of the allocation holding it (a peer finds the input address - base bytes into
    its mapping of that allocation)."""

    slot: int
    address: Optional[int]
    base: Optional[int]
    nbytes: int
    op: str


class GraphSlots:
    """This rank's slots: the next free one and the calls captured since the last registration."""

    def __init__(self, rank: int, world_size: int, max_slots: int = MAX_SLOTS):
        self.rank, self.world_size, self.max_slots = rank, world_size, max_slots
        self.next_slot = 1  # slot 0 is the staging buffers
        self.pending: List[CapturedCall] = []

    # -- during capture ----------------------------------------------------------------------------------
    def claim(self, address: int, nbytes: int, op: str,
              locate: Callable[[], Optional[Tuple[int, int]]]) -> Tuple[int, bool]:
        """(slot, stage) for a call being captured, whose input starts at address: read in place if address is
        aligned and locate() (called now, while the input is alive) finds its allocation as (base, offset);
        staged otherwise (locate() returns None: not memory that can be exported)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if self.next_slot >= self.max_slots:
            raise RuntimeError(f"more than {self.max_slots - 1} IPC all-reduces captured by this communicator; "
                               "slots are never reused (a graph that still exists reads them): make a new "
                               "communicator, or capture fewer graphs")
        allocation = locate() if address % ALIGNMENT_BYTES == 0 else None
        if allocation is not None and allocation[0] + allocation[1] != address:
            raise ValueError(f"locate() placed the input at {allocation[0]:#x} + {allocation[1]}, not at its "
                             f"address {address:#x}")
        in_place = allocation is not None
        call = CapturedCall(self.next_slot, address if in_place else None,
                            allocation[0] if in_place else None, nbytes, op)
        self.next_slot += 1
        self.pending.append(call)
        return call.slot, not in_place

    def discard_pending(self) -> None:
        """A capture that failed: its calls are never registered (their slots stay empty, and a replay of
        anything captured with them traps, naming the slot)."""
        self.pending = []

    # -- registration ------------------------------------------------------------------------------------
    def local_records(self, export: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """(n_pending, RECORD_WORDS) int64: this rank's records, for the exchange. export(base) gives the IPC
        handle ((IPC_HANDLE_BYTES,) uint8) of the allocation at base."""
        records = torch.zeros(len(self.pending), RECORD_WORDS, dtype=torch.int64)
        for i, call in enumerate(self.pending):
            records[i, 2] = call.nbytes
            records[i, 3] = OPS.index(call.op)
            if call.address is not None:
                records[i, 0] = 1
                records[i, 1] = call.address - call.base
                records[i, 4:] = export(call.base).contiguous().view(torch.int64)
        return records

    def table(self, records: Sequence[torch.Tensor], open_handle: Callable[[torch.Tensor], int],
              staging_addresses: Sequence[int]) -> torch.Tensor:
        """(n_pending, world_size) int64: for each pending call, every rank's input as mapped here.

        records[r] is rank r's local_records; open_handle(handle) maps a peer allocation and returns its
        base address here; staging_addresses[r] is rank r's staging buffer as mapped here. Raises ValueError
        (the same on every rank: it reads only the exchanged records) when the ranks captured different
        collectives."""
        n = len(self.pending)
        if len(records) != self.world_size:
            raise ValueError(f"expected {self.world_size} record tables (one per rank), got {len(records)}")
        for r, rec in enumerate(records):
            if rec.dtype != torch.int64 or tuple(rec.shape) != (n, RECORD_WORDS):
                raise ValueError(f"rank {r}'s records must be ({n}, {RECORD_WORDS}) int64 (the same number of "
                                 f"captured all-reduces on every rank), got {tuple(rec.shape)} {rec.dtype}")
        for i in range(n):
            signatures = [(int(rec[i, 2]), OPS[int(rec[i, 3])]) for rec in records]
            if len(set(signatures)) > 1:
                per_rank = ", ".join(f"rank {r}: {b} bytes {op}" for r, (b, op) in enumerate(signatures))
                raise ValueError(f"captured all-reduce #{i} differs between ranks ({per_rank}); every rank must "
                                 "capture the same collectives in the same order")
        table = torch.zeros(n, self.world_size, dtype=torch.int64)
        for i, call in enumerate(self.pending):
            for r, rec in enumerate(records):
                if r == self.rank:
                    table[i, r] = call.address if call.address is not None else staging_addresses[r]
                elif int(rec[i, 0]) == 0:
                    table[i, r] = staging_addresses[r]
                else:
                    table[i, r] = open_handle(rec[i, 4:].contiguous().view(torch.uint8)) + int(rec[i, 1])
        return table

    def commit(self) -> Tuple[int, int]:
        """(first slot, count) of the pending calls, now registered; clears them."""
        if not self.pending:
            return self.next_slot, 0
        first = self.pending[0].slot
        slots = [c.slot for c in self.pending]
        assert slots == list(range(first, first + len(slots))), f"pending slots are not consecutive: {slots}"
        self.pending = []
        return first, len(slots)
