"""Host-side decisions of the CUDA IPC custom all-reduce (csrc/cuda/custom_all_reduce.cu), in plain Python
so that they run, and are tested, on machines without a GPU.

The CUDA code makes no decision of its own: tp_kernels.comm.cuda_ipc asks this module for a `Plan`
(algorithm, grid size, how the work is split between ranks) and passes its fields to the kernel launcher,
which only validates them. The limits below are compiled into the kernels too; a test checks that both
sides agree (`tp_kernels._C.cuda_ipc_limits()`).

Decisions:
- whether the IPC path applies to a group at all (`group_fallback_reason`) and to one tensor
  (`tensor_fallback_reason`); otherwise the chain falls through to NCCL;
- one-shot (every rank reads every peer's whole input and reduces it) or two-shot (reduce-scatter, then
  all-gather through the IPC buffers), by bytes and world size (`choose_algorithm`);
- the grid, the per-rank split and, for the fused norm, how many blocks share a row (`plan_all_reduce`,
  `plan_fused`);
- how long a kernel waits for a peer (`kernel_timeout_ms`) and what a trapped kernel recorded
  (`describe_kernel_error`);
- the data of the transfer check every new group runs over its mappings (`transfer_pattern`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from tp_kernels.comm.base import IPC_KERNEL_TIMEOUT_ENV, ipc_kernel_timeout_s
from tp_kernels.perf.cost_model import HARDWARE, Hardware

# Flag arrays in the IPC buffer are sized for 8 ranks: one NVLink/NVSwitch node holds at most 8 GPUs, and
# a one-shot kernel keeps one 16-byte load per peer in flight per thread (8 x 4 registers).
MAX_WORLD_SIZE = 8
# 64 blocks x 512 threads x 16 B = 512 KB of loads in flight per pass, about NVLink's bandwidth-delay
# product (450 GB/s x ~1 us), while leaving 68 of an H100's 132 SMs to the GEMMs it overlaps with.
MAX_BLOCKS = 64
THREADS_PER_BLOCK = 512
# Each thread moves one 128-bit pack per load: 4 fp32 or 8 fp16/bf16 elements.
PACK_BYTES = 16
# Every IPC allocation (and so every peer pointer) is aligned to this; registered inputs must be too.
ALIGNMENT_BYTES = PACK_BYTES
# 8 MiB covers decode: 256 tokens x hidden 8192 x 2 bytes (bf16) = 4 MiB. Each rank maps world_size
# buffers of 3 x this (input staging + two result regions for the fused norm), 24 MiB each.
DEFAULT_BUFFER_BYTES = 8 * 2**20
# sizeof(cudaIpcMemHandle_t).
IPC_HANDLE_BYTES = 64
# Rows of the device table of peer pointers: slot 0 is the staging buffers, every all-reduce captured inside
# CudaIpcCommunicator.capture() takes one more, never reused (2 MiB of device memory; see the .h file).
MAX_SLOTS = 32768
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

ONE_SHOT = "one_shot"
TWO_SHOT = "two_shot"


# ----------------------------------------------------------------------------------------------------------
# algorithm choice
# ----------------------------------------------------------------------------------------------------------
def one_shot_limit_bytes(world_size: int, hw: Hardware = HARDWARE["H100"]) -> float:
    """Largest message for which one-shot is modeled faster than two-shot (math.inf: always).

    Modeled, not measured (constants: cost_model.HARDWARE, from the datasheets). With L the latency of one
    flag barrier (hw.link_latency_us) and B the NVLink bandwidth into one GPU (hw.link_gbps):
      one-shot: 2 barriers, each rank reads (W-1) N bytes from its peers:      t1 = 2L + (W-1) N / B
      two-shot: 3 barriers, reads (W-1) N / W in the reduce-scatter and again
                in the all-gather:                                             t2 = 3L + 2 (W-1) N / (W B)
    t1 < t2  <=>  N < L B W / ((W-1)(W-2)). At W = 2 both move N bytes, so one-shot (one barrier fewer)
    always wins. On H100 constants: W=4 -> 1.5 MB, W=8 -> 0.43 MB.
    """
    check_world_size(world_size)
    if world_size <= 2:
        return math.inf
    latency_s, bandwidth_bps = hw.link_latency_us * 1e-6, hw.link_gbps * 1e9
    return latency_s * bandwidth_bps * world_size / ((world_size - 1) * (world_size - 2))


def choose_algorithm(nbytes: int, world_size: int, hw: Hardware = HARDWARE["H100"]) -> str:
    """ONE_SHOT for messages below one_shot_limit_bytes(world_size), else TWO_SHOT."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return ONE_SHOT if nbytes < one_shot_limit_bytes(world_size, hw) else TWO_SHOT


# ----------------------------------------------------------------------------------------------------------
# launch plans
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What the kernel launcher receives.

    Plain all-reduce: the input is n_packs 16-byte packs then n_tail single elements (odd sizes); the tail
    is reduced one-shot by every rank. Two-shot gives rank r the packs [r * chunk, (r + 1) * chunk).
    Fused norm: the input is n_rows rows of `hidden` elements (packs_per_row packs each); two-shot gives
    rank r the rows [r * chunk, (r + 1) * chunk). `split` blocks share a row (n_blocks is a multiple of
    it), each taking ceil(packs_per_row / split) of its packs. Blocks take packs or rows grid-stride, the
    same mapping in every phase, so a block only ever waits for the block of the same index on the other
    ranks (and, for a split row, for the other blocks of that row on its own rank).
    """

    algo: str
    n_blocks: int
    chunk: int  # packs (plain) or rows (fused) per rank in two-shot; all of them in one-shot
    n_packs: int = 0
    n_tail: int = 0
    n_rows: int = 0
    packs_per_row: int = 0
    split: int = 1

    @property
    def two_shot(self) -> bool:
        return self.algo == TWO_SHOT


def pack_elems(element_size: int) -> int:
    """Elements in one 16-byte pack."""
    if element_size not in (2, 4):
        raise ValueError(f"element_size must be 2 (fp16/bf16) or 4 (fp32) bytes, got {element_size}")
    return PACK_BYTES // element_size


def _blocks_for(work_items: int, items_per_block: int, max_blocks: int) -> int:
    return max(1, min(max_blocks, -(-work_items // items_per_block)))


def check_max_blocks(max_blocks: int) -> None:
    if not 1 <= max_blocks <= MAX_BLOCKS:
        raise ValueError(f"max_blocks must be in [1, {MAX_BLOCKS}], got {max_blocks}")


def grid_limit(resident_blocks: Sequence[int], gpu_ids: Sequence[str]) -> int:
    """The largest grid every rank may launch (0: none), from each rank's resident_blocks (how many blocks of
    the kernels its GPU runs at once: 1 per SM on sm_80/sm_90) and gpu_ids (ranks with the same id share a
    GPU). Every block waits at barriers for blocks of the other ranks (and, for split rows, of its own), so
    a grid that does not fit at once can wait forever for a block that is never scheduled: on a GPU with
    fewer than 64 SMs, or with ranks sharing a GPU under MPS, where their kernels run side by side (4 ranks x
    64 blocks > an H100's 132 SMs). Time-sliced ranks (no MPS) would not need the division; it costs them
    nothing that matters (they are a test setting)."""
    sharing = max(list(gpu_ids).count(g) for g in gpu_ids)
    return min(MAX_BLOCKS, min(resident_blocks) // sharing)


def _algo_for(nbytes: int, world_size: int, algo: Optional[str]) -> str:
    if algo is None:
        return choose_algorithm(nbytes, world_size)
    if algo not in (ONE_SHOT, TWO_SHOT):
        raise ValueError(f"algo must be None, {ONE_SHOT!r} or {TWO_SHOT!r}, got {algo!r}")
    check_world_size(world_size)
    return algo


def plan_all_reduce(numel: int, element_size: int, world_size: int, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                    algo: Optional[str] = None, max_blocks: int = MAX_BLOCKS) -> Plan:
    """The plan for an all-reduce of numel elements of element_size bytes. algo=None chooses by size;
    naming one forces it (tests and benchmarks run both algorithms at every size). max_blocks: the
    communicator's grid_limit."""
    check_max_blocks(max_blocks)
    nbytes = numel * element_size
    check_message_bytes(nbytes, buffer_bytes)
    per_pack = pack_elems(element_size)
    n_packs, n_tail = divmod(numel, per_pack)
    algo = _algo_for(nbytes, world_size, algo)
    chunk = -(-n_packs // world_size) if algo == TWO_SHOT else n_packs
    # one thread per pack of this rank's share; at least one block for the tail and the barriers
    return Plan(algo=algo, n_blocks=_blocks_for(chunk, THREADS_PER_BLOCK, max_blocks), chunk=chunk,
                n_packs=n_packs, n_tail=n_tail)


def fused_fallback_reason(hidden: int, element_size: int) -> Optional[str]:
    """Why the fused residual + RMSNorm kernel cannot take rows of this width (None: it can)."""
    per_pack = pack_elems(element_size)
    if hidden < 1 or hidden % per_pack:
        return (f"the fused residual+RMSNorm kernel loads rows in {PACK_BYTES}-byte packs, so hidden must be a "
                f"positive multiple of {per_pack} for {element_size}-byte elements, got {hidden}")
    return None


# Fused norm: blocks per row. One block per row leaves a one-token decode step on one SM, reading every
# peer's whole row through one SM's few outstanding loads (~3 us for a 16 KiB bf16 row at TP=8 on H100,
# modeled); split over blocks that each read at least FUSED_MIN_PACKS_PER_BLOCK packs of it (2 KiB per
# peer), a hidden-8192 bf16 row uses 8 SMs. The split rows then meet in a row-group barrier (one more
# on-GPU sync, ~1 us modeled), so it is used only while rows are too few to fill the grid. Modeled, not
# measured: to be tuned on a GPU with bench/allreduce_rmsnorm.py.
FUSED_MIN_PACKS_PER_BLOCK = 128
MAX_SPLIT = 16


def choose_split(rows_per_rank: int, packs_per_row: int, max_blocks: int = MAX_BLOCKS) -> int:
    """Blocks per row for the fused kernel when each rank normalizes rows_per_rank rows."""
    if rows_per_rank >= max_blocks:
        return 1
    by_work = -(-packs_per_row // FUSED_MIN_PACKS_PER_BLOCK)
    return max(1, min(max_blocks // max(rows_per_rank, 1), by_work, MAX_SPLIT))


def plan_fused(n_rows: int, hidden: int, element_size: int, world_size: int,
               buffer_bytes: int = DEFAULT_BUFFER_BYTES, algo: Optional[str] = None,
               split: Optional[int] = None, max_blocks: int = MAX_BLOCKS) -> Plan:
    """The plan for allreduce_residual_rmsnorm over n_rows rows of hidden elements (algo and max_blocks as
    in plan_all_reduce; split=None lets choose_split decide, a number forces it: tests run both)."""
    check_max_blocks(max_blocks)
    reason = fused_fallback_reason(hidden, element_size)
    if reason is not None:
        raise ValueError(reason)
    nbytes = n_rows * hidden * element_size
    check_message_bytes(nbytes, buffer_bytes)
    algo = _algo_for(nbytes, world_size, algo)
    packs_per_row = hidden // pack_elems(element_size)
    chunk = -(-n_rows // world_size) if algo == TWO_SHOT else n_rows
    if split is None:
        split = choose_split(chunk, packs_per_row, max_blocks)
    elif not 1 <= split <= min(max_blocks, packs_per_row):
        raise ValueError(f"split must be in [1, {min(max_blocks, packs_per_row)}] (blocks per row, each taking at "
                         f"least one of the row's {packs_per_row} packs, at most the grid of {max_blocks}), "
                         f"got {split}")
    # groups of `split` blocks, one row per group at a time; the row's sum of squares is a block (then a
    # row-group) reduction
    n_groups = max(1, min(chunk, max_blocks // split))
    return Plan(algo=algo, n_blocks=n_groups * split, chunk=chunk, n_rows=n_rows, packs_per_row=packs_per_row,
                split=split)


# ----------------------------------------------------------------------------------------------------------
# limits and argument checks
# ----------------------------------------------------------------------------------------------------------
def check_world_size(world_size: int) -> None:
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ValueError(f"world_size must be in [1, {MAX_WORLD_SIZE}] for the CUDA IPC all-reduce, got {world_size}")


def check_buffer_bytes(buffer_bytes: int) -> None:
    if buffer_bytes <= 0 or buffer_bytes % ALIGNMENT_BYTES:
        raise ValueError(f"buffer_bytes must be a positive multiple of {ALIGNMENT_BYTES}, got {buffer_bytes}")


def check_message_bytes(nbytes: int, buffer_bytes: int) -> None:
    if nbytes > buffer_bytes:
        raise ValueError(f"the message ({nbytes} bytes) exceeds the IPC buffer ({buffer_bytes} bytes); "
                         "pass it to NCCL (the chain does when applies() is False)")


def check_input(x: torch.Tensor, name: str, device: torch.device, buffer_bytes: int) -> None:
    """Raise TypeError/ValueError naming `name` if x cannot go through the IPC kernels as given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in SUPPORTED_DTYPES]}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} (the communicator's device), got {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels index it flat), got strides {x.stride()}")
    check_message_bytes(x.numel() * x.element_size(), buffer_bytes)


def check_aligned(name: str, address: int) -> None:
    """Registered inputs and the fused op's residual/weight are read in 16-byte packs."""
    if address % ALIGNMENT_BYTES:
        raise ValueError(f"{name} must be {ALIGNMENT_BYTES}-byte aligned for 128-bit loads, got address "
                         f"{address:#x} ({address % ALIGNMENT_BYTES} bytes past a boundary)")


# ----------------------------------------------------------------------------------------------------------
# when the IPC path does not apply (the chain then uses NCCL)
# ----------------------------------------------------------------------------------------------------------
def local_fallback_reason(cuda_available: bool, built_with_cuda: bool) -> Optional[str]:
    """Why this process cannot take part in an IPC all-reduce (None: it can)."""
    if not cuda_available:
        return "CUDA is not available in this process"
    if not built_with_cuda:
        return "tp_kernels._C was built without CUDA (TP_KERNELS_BUILD_CUDA=0, or no nvcc at build time)"
    return None


def group_fallback_reason(world_size: int, local_reasons: Sequence[Optional[str]], hostnames: Sequence[str],
                          gpu_ids: Sequence[Optional[str]], peer_access: Sequence[Sequence[bool]],
                          nvlink: Optional[Sequence[Sequence[Optional[bool]]]] = None,
                          allow_shared_gpu: bool = False) -> Optional[str]:
    """Why a group cannot use the IPC all-reduce (None: it can). Every rank evaluates it on the same
    gathered facts, so all ranks agree.

    local_reasons[r] is rank r's local_fallback_reason; hostnames[r] its host; gpu_ids[r] its GPU's PCI
    address; peer_access[r][q] whether rank r's GPU can access rank q's (cudaDeviceCanAccessPeer; True on
    the diagonal); nvlink[r][q] whether they are connected by NVLink (None: unknown; only needed above 2
    ranks: over PCIe, 4-8 GPUs all-reduce faster with NCCL's rings than with every rank reading every peer).
    allow_shared_gpu is the test switch (`SHARED_GPU_ENV`): ranks that share a GPU then run the kernels too,
    which proves the protocol on a one-GPU machine but is slower than one process per GPU."""
    if world_size < 2:
        return "world size 1 needs no all-reduce"
    if world_size > MAX_WORLD_SIZE:
        return f"world size {world_size} exceeds the {MAX_WORLD_SIZE} ranks the IPC flag arrays hold"
    for r, reason in enumerate(local_reasons):
        if reason is not None:
            return f"rank {r}: {reason}"
    if len(set(hostnames)) > 1:
        return f"ranks are on different hosts {sorted(set(hostnames))}; CUDA IPC works within one host"
    first_rank_of = {}
    for r, gpu in enumerate(gpu_ids):
        if gpu in first_rank_of and not allow_shared_gpu:
            # e.g. CPU test ranks on a GPU node, all on cuda:0: nothing to gain over NCCL
            return (f"ranks {first_rank_of[gpu]} and {r} share the GPU {gpu}; each rank needs its own GPU "
                    f"({SHARED_GPU_ENV}=1 overrides this for tests)")
        first_rank_of.setdefault(gpu, r)
    for r, row in enumerate(peer_access):
        for q, ok in enumerate(row):
            if not ok:
                return f"rank {r}'s GPU cannot access rank {q}'s GPU (cudaDeviceCanAccessPeer is false)"
    if world_size > 2:
        for r in range(world_size):
            for q in range(world_size):
                if gpu_ids[r] == gpu_ids[q]:
                    continue
                link = None if nvlink is None else nvlink[r][q]
                if link is None:
                    return (f"cannot tell whether rank {r}'s GPU and rank {q}'s are connected by NVLink (NVML "
                            f"unavailable); above 2 ranks the IPC all-reduce needs NVLink")
                if not link:
                    return (f"rank {r}'s GPU and rank {q}'s are not connected by NVLink; over PCIe, {world_size} "
                            "ranks all-reduce faster with NCCL")
    return None


def tensor_fallback_reason(x: torch.Tensor, device: torch.device, buffer_bytes: int) -> Optional[str]:
    """Why this tensor goes to NCCL instead (None: the IPC kernels take it)."""
    if x.device != device:
        return f"tensor is on {x.device}, the IPC buffers on {device}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not one of {[str(d) for d in SUPPORTED_DTYPES]}"
    nbytes = x.numel() * x.element_size()
    if nbytes > buffer_bytes:
        return f"message of {nbytes} bytes exceeds the {buffer_bytes}-byte IPC buffer"
    return None


# ----------------------------------------------------------------------------------------------------------
# the test switch for ranks that share a GPU
# ----------------------------------------------------------------------------------------------------------
SHARED_GPU_ENV = "TP_KERNELS_IPC_ALLOW_SHARED_GPU"


def allow_shared_gpu(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether SHARED_GPU_ENV asks the IPC all-reduce to serve ranks that share a GPU (tests only)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(SHARED_GPU_ENV, "0")
    if raw not in ("0", "1"):
        raise ValueError(f"{SHARED_GPU_ENV} must be 0 or 1, got {raw!r}")
    return raw == "1"


# ----------------------------------------------------------------------------------------------------------
# barrier timeout, and what a trapped kernel left in the error word
# ----------------------------------------------------------------------------------------------------------
KERNEL_TIMEOUT_ENV = IPC_KERNEL_TIMEOUT_ENV  # parsed in tp_kernels.comm.base, with the other timeouts
# Mirrors of custom_all_reduce_kernels.h: error word = kind << ERROR_KIND_SHIFT | detail.
ERROR_KIND_SHIFT = 24
ERROR_BARRIER_TIMEOUT = 1
ERROR_NULL_INPUT = 2


def kernel_timeout_ms(environ: Optional[Mapping[str, str]] = None) -> int:
    """How long a kernel waits at a barrier for a peer before it records the missing rank and traps, in ms:
    TP_KERNELS_IPC_TIMEOUT seconds (tp_kernels.comm.base.ipc_kernel_timeout_s: default 600; 0 waits forever
    and never traps)."""
    seconds = ipc_kernel_timeout_s(environ)
    return 0 if seconds == 0 else max(1, int(seconds * 1000))


def describe_kernel_error(word: int, timeout_ms: int) -> Optional[str]:
    """What the error word of a communicator says (None: no kernel trapped)."""
    if word == 0:
        return None
    kind, detail = word >> ERROR_KIND_SHIFT, word & ((1 << ERROR_KIND_SHIFT) - 1)
    unusable = "; the kernel trapped and this process's CUDA context is unusable"
    if kind == ERROR_BARRIER_TIMEOUT:
        return (f"rank {detail} did not arrive at a barrier within {timeout_ms / 1000:g} s "
                f"({KERNEL_TIMEOUT_ENV}){unusable}")
    if kind == ERROR_NULL_INPUT:
        return (f"an all-reduce captured inside capture() was replayed while its slot {detail} held no peer "
                f"pointers (before register_graph_buffers(), or after release_graph_buffers()){unusable}")
    return f"unknown error word {word:#x}{unusable}"


# ----------------------------------------------------------------------------------------------------------
# the transfer check of a new group
# ----------------------------------------------------------------------------------------------------------
# Some drivers report peer access and then move wrong data (vLLM checks for this too); every rank reads this
# much of every peer's staging buffer, with the kernels' loads, before the group is used.
TRANSFER_CHECK_BYTES = 256 * 1024


def transfer_check_words(buffer_bytes: int) -> int:
    """int32 words of the transfer check: TRANSFER_CHECK_BYTES, or the whole staging buffer if smaller."""
    return min(TRANSFER_CHECK_BYTES, buffer_bytes) // 4


def transfer_pattern(rank: int, n_words: int) -> torch.Tensor:
    """(n_words,) int32: what rank writes into its staging buffer for the check; differs between ranks and
    between any two words of one rank (a misplaced or stale block shows)."""
    i = torch.arange(n_words, dtype=torch.int64)
    return ((i * 2654435761 + (rank + 1) * 40503) % (2**31 - 1)).to(torch.int32)
