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
- Decode tiles are narrow (BLOCK_N 32) because at M <= 16 the GEMM streams the weights, and the
  bandwidth it gets grows with the number of programs: 32-column tiles give 4x the programs of 128.
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

    def __str__(self) -> str:
        return (f"BM{self.block_m}_BN{self.block_n}_BK{self.block_k}_w{self.num_warps}_s{self.num_stages}"
                f"_g{self.group_m}")


def _make(arch: str, dtype_class: str, block_m: int, block_n: int) -> TileConfig:
    block_k, element_bytes = (32, 4) if dtype_class == "fp32" else (64, 2)
    stage_bytes = (block_m + block_n) * block_k * element_bytes
    num_stages = max(2, min(4, SHARED_MEMORY_LIMIT[arch] // stage_bytes))
    return TileConfig(block_m, block_n, block_k, num_warps=4, num_stages=num_stages)


# (BLOCK_M, BLOCK_N) per dtype class and M bucket. qkv's large tiles are 64x64 and fp32's mid/large
# matmul tiles 64 columns wide because the 128-column ones spilled on sm_80 (qkv KV-cache epilogue:
# 872 bytes at 64x128; fp32 matmul: 8 bytes at 32x128).
QKV_TILES = {"16bit": {16: (16, 32), 64: (32, 64), None: (64, 64)},
             "fp32": {16: (16, 32), 64: (32, 64), None: (64, 64)}}
MATMUL_TILES = {"16bit": {16: (16, 64), 64: (32, 128), None: (64, 128)},
                "fp32": {16: (16, 64), 64: (32, 64), None: (64, 64)}}
assert all(m * n <= MAX_TILE_ELEMENTS for table in (QKV_TILES, MATMUL_TILES) for by_bucket in table.values()
           for m, n in by_bucket.values())

# (arch, dtype class, M bucket) -> config
QKV_CONFIGS: Dict[Tuple[str, str, object], TileConfig] = {
    (arch, dc, mb): _make(arch, dc, *QKV_TILES[dc][mb]) for arch in ARCHS for dc in DTYPE_CLASSES for mb in M_BUCKETS}
MATMUL_CONFIGS: Dict[Tuple[str, str, object], TileConfig] = {
    (arch, dc, mb): _make(arch, dc, *MATMUL_TILES[dc][mb])
    for arch in ARCHS for dc in DTYPE_CLASSES for mb in M_BUCKETS}


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
