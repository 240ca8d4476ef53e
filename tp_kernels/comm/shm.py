"""The shared-memory all-reduce for CPU tensors of ranks that share a host (C++: csrc/cpu/shm_comm.h).

Setup is collective over the group: rank 0 makes the segment with tp_kernels.comm.segment (an unnamed
memfd, mode 0600, sealed against resizing, opened by the others through /proc/<pid>/fd after checking
its owner, mode, size, seals and a random secret sent over the group's gloo process group), every rank
hands its descriptor to the C++ communicator, which checks it again and maps it, and every descriptor is
closed. Nothing is ever named in /dev/shm, so nothing can be planted there and nothing is left behind,
whatever way the processes end and at whatever moment of setup. Whether the ranks share a host is decided
from their hostnames and kernel boot ids, gathered over the same group.
"""
from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
import torch.distributed as dist

from tp_kernels._extension import _C
from tp_kernels.comm import segment
from tp_kernels.comm.base import Communicator, comm_timeout_s

if TYPE_CHECKING:
    from tp_kernels.distributed import TPGroup

log = logging.getLogger(__name__)

# Per rank and slot parity. Messages larger than a slot go in slot-sized steps. Small steps keep a step's
# working set (the slots of both parities of every rank) inside the cores' caches while the input and
# output stream through: with 2 ranks pinned to the 2 cores of the CI host, interleaved A/B runs measured
# (fp32, median us) 1 MiB: 332 / 191 / 159 / 175 and 16 MiB: 7369 / 6017 / 6005 / 6207 for 1024 / 512 /
# 256 / 128 KiB slots, and the same 35 us at 256 KiB for all but 128 KiB. 2 ranks: a 1 MiB + 8 KiB segment.
# bench/all_reduce.py --slot-kib measures the alternatives.
DEFAULT_SLOT_BYTES = 256 << 10
# One-shot up to this size, two-shot above. With 2 ranks on the 2-core CI host the two are within noise
# of each other up to 16 KiB (4 KiB: 2.8-2.9 us either way), and two-shot wins above (64 KiB fp32: 13.4 us
# vs 18.4 us one-shot); one-shot keeps a single barrier for the tiniest messages, and its world_size-fold
# reads matter more at 4+ ranks.
DEFAULT_ONE_SHOT_MAX_BYTES = 16 << 10
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def host_id() -> Tuple[str, str]:
    """(hostname, kernel boot id): equal for two processes that can share /dev/shm. The boot id tells
    apart machines or containers that happen to share a hostname."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    return socket.gethostname(), boot_id


def _group_supports_cpu(pg: dist.ProcessGroup) -> bool:
    """Whether the process group can run CPU collectives (gloo), which setup uses to exchange names."""
    return "gloo" in str(dist.get_backend(pg)).lower()


def _native_setting(name: str, doc: str) -> property:
    """A property that reads and writes the native communicator's setting of the same name."""
    return property(lambda self: getattr(self._native, name), lambda self, value: setattr(self._native, name, value),
                    doc=doc)


class ShmCommunicator(Communicator):
    """All-reduce of CPU tensors through a shared-memory segment of the group.

    Applies to contiguous-able CPU float32 / float16 / bfloat16 tensors when every rank of the group is on
    this host. Small messages go one-shot (every rank sums every slot), large ones two-shot (each rank
    sums a part, then all copy); fp32 accumulation; the same bits on every rank. Waits time out after
    TP_KERNELS_COMM_TIMEOUT seconds (default 60) naming the ranks that did not arrive.
    """

    name = "shm"

    def __init__(self, process_group: dist.ProcessGroup, rank: int, world_size: int, label: str,
                 slot_bytes: int = DEFAULT_SLOT_BYTES, timeout_s: Optional[float] = None):
        """Collective over process_group: every rank must construct it, with the same slot_bytes."""
        if _C is None:
            raise RuntimeError("the shm communicator needs the compiled extension tp_kernels._C")
        timeout_s = comm_timeout_s() if timeout_s is None else timeout_s
        size = _C.ShmCommunicator.segment_bytes(world_size, slot_bytes)  # checks world_size and slot_bytes
        shared = segment.share(process_group, rank, size, f"shm:{label}", keep_fd=True)
        native, error = None, None
        try:
            native = _C.ShmCommunicator.map_fd(shared.fd, segment.HEADER_BYTES, rank, world_size, slot_bytes,
                                               timeout_s, label)
        except (RuntimeError, ValueError) as e:
            error = str(e)
        finally:
            shared.close()  # the descriptor and Python's mapping; the communicator holds its own mapping
        failed = segment.gather_failures(process_group, error)  # every rank has mapped (or failed)
        if failed:
            if native is not None:
                native.close()
            raise RuntimeError(f"shm communicator of group {label!r}: " +
                               "; ".join(f"rank {r}: {e}" for r, e in sorted(failed.items())))
        native.finish_setup()  # rank 0 marks it ready, the others check rank 0's header
        native.one_shot_max_bytes = DEFAULT_ONE_SHOT_MAX_BYTES
        self._native = native
        self.world_size = world_size

    @classmethod
    def for_group(cls, tp: "TPGroup") -> Optional["ShmCommunicator"]:
        """The communicator for tp when it can serve it: several ranks, a gloo-capable group, the compiled
        extension, every rank on this host. None (and an info log saying why) otherwise. Collective."""
        if tp.world_size == 1 or tp.process_group is None:
            return None
        if not _group_supports_cpu(tp.process_group):
            log.info("shm communicator not used for group %r: its backend %s has no CPU collectives", tp.name,
                     dist.get_backend(tp.process_group))
            return None
        hosts: List[Optional[Tuple[str, str]]] = [None] * tp.world_size
        dist.all_gather_object(hosts, host_id(), group=tp.process_group)
        if len(set(hosts)) != 1:
            log.info("shm communicator not used for group %r: its ranks span %d hosts", tp.name, len(set(hosts)))
            return None
        if _C is None:  # same answer on every rank (same host, same build), so no rank waits for another
            log.warning("shm communicator not used for group %r: tp_kernels._C is not loaded; CPU all-reduce "
                        "falls back to gloo", tp.name)
            return None
        return cls(tp.process_group, tp.rank, tp.world_size, tp.name)

    # -- Communicator ------------------------------------------------------------------------------------
    def applies(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES and not self._native.closed

    def all_reduce(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sum of x over the group, into out (contiguous, x's shape and dtype) or a new tensor."""
        return self._native.all_reduce(x.contiguous(), out)

    def all_reduce_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if out.is_contiguous():  # reduces straight into out (out is x: in place); the native call checks overlap
            return self._native.all_reduce(x if out is x else x.contiguous(), out)
        return super().all_reduce_into(x, out)

    @property
    def native_cpu_communicator(self):
        return self._native

    def allreduce_residual_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """add_rmsnorm(all_reduce(x), residual, weight, eps) with the residual add and the norm done in the
        same pass over the reduced rows; returns (normed, new_residual). Rows larger than a slot are summed
        in slot-sized steps first and normalized after (two passes). Either way every step carries the op,
        the row length and eps, so a rank making another call, or using another eps, raises on every rank."""
        return self._native.allreduce_residual_rmsnorm(x.contiguous(), residual.contiguous(), weight.contiguous(),
                                                       float(eps))

    def bind_thread(self, thread: int) -> None:
        self._native.bind_thread(thread)

    def allow_helper_thread(self, thread: int) -> None:
        self._native.allow_helper_thread(thread)

    def close(self) -> None:
        self._native.close()

    # -- knobs: settings of the native communicator, read and written through --------------------------
    timeout_s = _native_setting("timeout_s", "Seconds every wait may take before it raises naming the ranks.")
    one_shot_max_bytes = _native_setting(
        "one_shot_max_bytes", "Messages up to this size go one-shot. Set it to the same value on every rank (a "
        "difference is detected and raises at the next call).")
    stream_min_bytes = _native_setting(
        "stream_min_bytes", "Two-shot all-reduces of at least this many bytes write their output with "
        "non-temporal stores (default: where 2 x world_size x bytes exceeds the L3 cache). A local choice; "
        "ranks may differ.")
    publish_stores = _native_setting(
        "publish_stores", 'How two-shot all-reduces write what they publish for the peers: "auto" (rank 0 '
        'times both kinds and the group follows the faster, csrc/cpu/shm_store_policy.h), "ordinary" or '
        '"non-temporal".')

    @property
    def slot_bytes(self) -> int:
        return self._native.slot_bytes

    @property
    def segment_id(self) -> int:
        """A random number drawn for the segment: equal on the ranks that share it."""
        return self._native.segment_id

    @property
    def poisoned_by(self) -> int:
        """The rank whose failure made the communicator unusable (until the group is made again), or -1."""
        return self._native.poisoned_by

    @property
    def sequence(self) -> int:
        """How many steps this communicator has run (a message larger than a slot takes several)."""
        return self._native.sequence
