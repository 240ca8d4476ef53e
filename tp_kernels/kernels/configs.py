"""Launch configs of the Triton GEMM kernels, per GPU arch, dtype class and M (token) bucket.

A config is picked from a table rather than autotuned: autotuning does not run under the interpreter
(the tests' path) and costs seconds per new shape on a GPU. Every entry is compiled ahead of time for
its arch by tests/kernels/test_aot_compile.py, which fails on a register spill or on shared memory over
the device limit (`python bench/kernel_resources.py` prints registers/spills/shared bytes per entry).

Choices and the numbers behind them:
- M buckets. Decode (M <= 16 tokens) uses 16-row tiles: tl.dot's minimum M is 16, and a 128-row tile
  would compute 8x (M=16) to 128x (M=1) the useful rows. 32 rows up to M=64; beyond, the GEMM turns
  compute-bound and 64-row tiles cut the re-reads of w.
- Tile size. BLOCK_M * BLOCK_N <= 8192 with 4 warps (64 fp32 accumulators per thread): 128x128 with
  8 warps spilled 968 bytes of registers in the KV-cache epilogue on sm_80.
- Decode (M <= 16) streams the weights, and by Little's law the bandwidth it gets is the bytes in flight
  over the memory latency, so what counts is how many programs run and how many bytes each keeps in
  flight. qkv's decode tiles are 16 columns wide and 256 deep in K (16-bit; 128 for fp32, the same
  bytes): 16 KB of weights per pipeline stage, against 4 KB for the 32x64 tile it replaced. Where the
  tiles are still fewer than the SMs, K is split (split_k_for): Llama-70B at TP=8 (QKV N = 1280,
  K = 8192) has 80 tiles of 16 columns; split in 2 they are 160 programs on 132 SMs (H100), where the
  32-column tiles without split-K gave 40 (the 'split_k' flag of a config; qkv.py has the protocol).
  The same holds past decode for TP-sized N: 128 tokens of that shape are 40 tiles of 64 x 64, 4 parts
  of K make 160 programs (bench/qkv_rope.py --modeled: 16.7 -> 8.6 us modeled on an H100).
- Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * element bytes; num_stages is the most
  that fit the arch's dynamic shared memory (sm_80 163 KB, sm_90 227 KB), capped at 4 (past 3-4
  stages the tutorials' K loops hide no more latency). With these tiles both archs get 4 stages, so
  their rows are equal today; they stay separate keys so one can be retuned on its own hardware.
- fp32 inputs use an exact fp32 dot ("ieee", matching torch's default of no TF32), which runs on FMA
  units; its K step is 32 to keep the same shared memory per stage as 16-bit inputs at 64.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

ARCHS = ("sm_80", "sm_90")
# dynamic shared memory per block, bytes (CUDA C programming guide, compute capability table)
SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
M_BUCKETS = (16, 64, None)  # upper bounds of the token-count buckets; None: everything larger
DTYPE_CLASSES = ("16bit", "fp32")
MAX_TILE_ELEMENTS = 8192


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int  # for qkv, capped at the head's width (qkv.head_slots_for)
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: bool = False  # K may be split across programs when the tiles are fewer than the SMs

    def __str__(self) -> str:
        return (f"BM{self.block_m}_BN{self.block_n}_BK{self.block_k}_w{self.num_warps}_s{self.num_stages}"
                f"_g{self.group_m}" + ("_splitk" if self.split_k else ""))


def _make(arch: str, dtype_class: str, block_m: int, block_n: int, block_k: int = 0,
          split_k: bool = False) -> TileConfig:
    default_block_k, element_bytes = (32, 4) if dtype_class == "fp32" else (64, 2)
    block_k = block_k or default_block_k
    stage_bytes = (block_m + block_n) * block_k * element_bytes
    num_stages = max(2, min(4, SHARED_MEMORY_LIMIT[arch] // stage_bytes))
    return TileConfig(block_m, block_n, block_k, num_warps=4, num_stages=num_stages, split_k=split_k)


# (BLOCK_M, BLOCK_N[, BLOCK_K, split_k]) per dtype class and M bucket. qkv's large tiles are 64x64 and
# fp32's mid/large matmul tiles 64 columns wide because the 128-column ones spilled on sm_80 (qkv KV-cache
# epilogue: 872 bytes at 64x128; fp32 matmul: 8 bytes at 32x128).
QKV_TILES = {"16bit": {16: (16, 16, 256, True), 64: (32, 64, 64, True), None: (64, 64, 64, True)},
             "fp32": {16: (16, 16, 128, True), 64: (32, 64, 32, True), None: (64, 64, 32, True)}}
MATMUL_TILES = {"16bit": {16: (16, 64), 64: (32, 128), None: (64, 128)},
                "fp32": {16: (16, 64), 64: (32, 64), None: (64, 64)}}
assert all(tile[0] * tile[1] <= MAX_TILE_ELEMENTS for table in (QKV_TILES, MATMUL_TILES)
           for by_bucket in table.values() for tile in by_bucket.values())

# (arch, dtype class, M bucket) -> config
QKV_CONFIGS: Dict[Tuple[str, str, object], TileConfig] = {
    (arch, dc, mb): _make(arch, dc, *QKV_TILES[dc][mb]) for arch in ARCHS for dc in DTYPE_CLASSES for mb in M_BUCKETS}
MATMUL_CONFIGS: Dict[Tuple[str, str, object], TileConfig] = {
    (arch, dc, mb): _make(arch, dc, *MATMUL_TILES[dc][mb])
    for arch in ARCHS for dc in DTYPE_CLASSES for mb in M_BUCKETS}

# Split-K (decode configs with split_k set). SMs per GPU: A100 SXM4 108, H100 SXM5 132 (datasheets);
# the CPU (interpreter) takes sm_80's. A split keeps at least MIN_K_BLOCKS_PER_SPLIT blocks of K, the
# pipeline depth (num_stages 4): with fewer, a program's loop would be all pipeline fill.
SM_COUNT = {"sm_80": 108, "sm_90": 132}
MIN_K_BLOCKS_PER_SPLIT = 4
MAX_SPLIT_K = 16


def split_k_for(n_tiles: int, k: int, block_k: int, n_sms: int) -> int:
    """How many parts to split K into for a launch of n_tiles output tiles: the smallest power of two
    that gives every SM a program (n_tiles * split >= n_sms), as far as each part keeps
    MIN_K_BLOCKS_PER_SPLIT blocks of K and the parts stay <= MAX_SPLIT_K. 1 when the tiles fill the SMs."""
    k_blocks = -(-k // block_k)
    split = 1
    while (n_tiles * split < n_sms and split * 2 <= MAX_SPLIT_K
           and k_blocks // (split * 2) >= MIN_K_BLOCKS_PER_SPLIT):
        split *= 2
    return split


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM_COUNT[arch_of(device)]


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def m_bucket(n_rows: int):
    for bound in M_BUCKETS[:-1]:
        if n_rows <= bound:
            return bound
    return None


_warned_capabilities = set()


def arch_of(device: torch.device) -> str:
    """The table's arch for a device. CPU tensors (the interpreter) use sm_80's configs; a GPU other
    than sm_80/sm_90 uses sm_80's, with a warning once, since its shared memory may be smaller
    (sm_86/sm_89: 99 KB) and Triton would then refuse the launch."""
    if device.type != "cuda":
        return "sm_80"
    capability = torch.cuda.get_device_capability(device)
    if capability[0] == 9:
        return "sm_90"
    if capability != (8, 0) and capability not in _warned_capabilities:
        _warned_capabilities.add(capability)
        warnings.warn(f"tp_kernels' Triton configs are tuned for sm_80 and sm_90; using sm_80's on "
                      f"sm_{capability[0]}{capability[1]}", RuntimeWarning, stacklevel=3)
    return "sm_80"


def qkv_config(device: torch.device, dtype: torch.dtype, n_tokens: int) -> TileConfig:
    return QKV_CONFIGS[(arch_of(device), dtype_class(dtype), m_bucket(n_tokens))]


def matmul_config(device: torch.device, dtype: torch.dtype, n_rows: int) -> TileConfig:
    return MATMUL_CONFIGS[(arch_of(device), dtype_class(dtype), m_bucket(n_rows))]
