"""The plain Triton GEMM: y = a @ b.T + bias, the per-chunk GEMM of the row-parallel op.

Contract: `matmul(a, b, bias)` with a (M, K) and b (N, K), which is how a linear layer stores its weight
(and what gemm_allreduce receives: x (M, K_per_rank), w (N, K_per_rank)); so matmul(x, w, bias) equals
torch.nn.functional.linear(x, w, bias), computed with fp32 accumulation and rounded once to a's dtype.
It shares the tiling of qkv.py (tiling.accumulate_tile); only its epilogue (bias, store) is its own.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from tp_kernels.kernels import configs
from tp_kernels.kernels.launch import kernel_for_launch
from tp_kernels.kernels.tiling import accumulate_tile, grouped_tile_ids
from tp_kernels.ops import checks

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr,  # (M, K)
    b_ptr,  # (N, K)
    bias_ptr,  # (N,); read only if HAS_BIAS
    c_ptr,  # (M, N)
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile_m, tile_n = grouped_tile_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_valid = cols < N
    acc = accumulate_tile(a_ptr, b_ptr, rows, cols, cols_valid, M, K, stride_am, stride_ak, stride_bn, stride_bk,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_OPERANDS, DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols_valid, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows < M)[:, None] & cols_valid[None, :])


def matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b.T + bias (= F.linear(a, b, bias)) as one Triton kernel; returns a new contiguous (M, N) tensor
    in a's dtype.

    a (M, K), b (N, K) and bias (N,) share a dtype (fp16, bf16 or fp32) and a device: a GPU, or the CPU
    under TRITON_INTERPRET=1. Any strides.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"a and b must be tensors, got {type(a).__name__} and {type(b).__name__}")
    checks.check_gemm(a, b, bias, None)
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"a must be float16, bfloat16 or float32 for the Triton GEMM, got {a.dtype}")
    if not (a.device.type == "cuda" or (a.device.type == "cpu" and triton.knobs.runtime.interpret)):
        raise ValueError(f"a must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set before triton "
                         f"is imported), got a {a.device.type} tensor")
    n_rows, n_cols = a.shape[0], b.shape[0]
    c = a.new_empty((n_rows, n_cols))
    if c.numel() == 0:
        return c
    config = configs.matmul_config(a.device, a.dtype, n_rows)
    grid = (triton.cdiv(n_rows, config.block_m) * triton.cdiv(n_cols, config.block_n),)
    interpreting = a.device.type == "cpu"
    kernel_for_launch(_matmul_kernel)[grid](
        a, b, a if bias is None else bias.contiguous(), c,
        n_rows, n_cols, a.shape[1],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, UPCAST_OPERANDS=interpreting,
        # exact fp32 products for fp32 inputs (torch's default, no TF32); 16-bit operands ignore it
        DOT_PRECISION="ieee" if a.dtype == torch.float32 or interpreting else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages)
    return c
