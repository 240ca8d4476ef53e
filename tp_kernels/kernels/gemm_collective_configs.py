"""Launch configs of the fused GEMM + collective kernels, per GPU arch, dtype class and row bucket (the
rows of one owner block or source rank), in the layout and with the rules of configs.py.

The tiles are at most half the plain GEMM's (MATMUL_TILES in configs.py): 4096 elements for 16-bit
inputs, 2048 for fp32. A reducing program holds a second fp32 tile beside its accumulator (the sum of the
ranks' partials), and with the plain GEMM's tiles the two-shot kernel spilled: 704 bytes on sm_80 and
296 on sm_90 at 64 x 128 (16-bit), 8-16 bytes on sm_90 at 64 x 64 (fp32). Every entry is compiled for
sm_80 and sm_90 by tests/kernels/test_aot_compile.py (gemm_collective_resources.py lists the cases).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from tp_kernels.kernels.configs import ARCHS, DTYPE_CLASSES, M_BUCKETS, TileConfig, _make, arch_of, dtype_class, \
    m_bucket

MAX_TILE_ELEMENTS = {"16bit": 4096, "fp32": 2048}
FUSED_TILES = {"16bit": {16: (16, 64), 64: (32, 128), None: (64, 64)},
               "fp32": {16: (16, 64), 64: (32, 64), None: (32, 64)}}
assert all(m * n <= MAX_TILE_ELEMENTS[dc] for dc, by_bucket in FUSED_TILES.items() for m, n in by_bucket.values())


# (arch, dtype class, row bucket) -> config; K step and stages by configs.py's rule (_make): 32 (fp32) or 64
# (16-bit) deep, as many stages of (BLOCK_M + BLOCK_N) x BLOCK_K elements as the arch's shared memory holds, 2 to 4
FUSED_CONFIGS: Dict[Tuple[str, str, object], TileConfig] = {
    (arch, dc, mb): _make(arch, dc, *FUSED_TILES[dc][mb]) for arch in ARCHS for dc in DTYPE_CLASSES for mb in M_BUCKETS}


def fused_config(device: torch.device, dtype: torch.dtype, rows: int) -> TileConfig:
    return FUSED_CONFIGS[(arch_of(device), dtype_class(dtype), m_bucket(rows))]
