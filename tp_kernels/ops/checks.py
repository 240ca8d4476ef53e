"""Argument checks shared by the fake, CPU and CUDA implementations of the ops, so a bad call fails the
same way in eager mode, under torch.compile and on every device: a ValueError naming the argument and
what was expected. `check_positions` reads values, so only the CPU kernels call it (on a GPU it would
cost a device sync per call; the Triton kernel's contract for out-of-range indices is in its docstring)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from tp_kernels.reference import ROPE_STYLES, SKIP_POSITION

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_dim(name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_qkv_rope(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: Optional[torch.Tensor],
                   cos_sin_cache: Optional[torch.Tensor], positions: torch.Tensor, n_heads_per_rank: int,
                   n_kv_heads_per_rank: int, head_dim: int, rope_style: str) -> None:
    check_dim("x", x, 2, "(T, hidden)")
    check_dtype("x", x)
    check_same("w_qkv", w_qkv, "x", x)
    if n_heads_per_rank < 1 or n_kv_heads_per_rank < 1 or head_dim < 1:
        raise ValueError(f"n_heads_per_rank, n_kv_heads_per_rank and head_dim must be >= 1, got "
                         f"{n_heads_per_rank}, {n_kv_heads_per_rank}, {head_dim}")
    if n_heads_per_rank % n_kv_heads_per_rank:
        raise ValueError(f"n_heads_per_rank ({n_heads_per_rank}) must be a multiple of n_kv_heads_per_rank "
                         f"({n_kv_heads_per_rank})")
    qkv_rows = (n_heads_per_rank + 2 * n_kv_heads_per_rank) * head_dim
    if tuple(w_qkv.shape) != (qkv_rows, x.shape[1]):
        raise ValueError(f"w_qkv must be ((n_heads_per_rank + 2 * n_kv_heads_per_rank) * head_dim, hidden) = "
                         f"({qkv_rows}, {x.shape[1]}), got {tuple(w_qkv.shape)}")
    if b_qkv is not None:
        check_same("b_qkv", b_qkv, "x", x)
        if tuple(b_qkv.shape) != (qkv_rows,):
            raise ValueError(f"b_qkv must be ({qkv_rows},), got {tuple(b_qkv.shape)}")
    if rope_style not in ROPE_STYLES:
        raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {rope_style!r}")
    check_dim("positions", positions, 1, "(T,)")
    if positions.shape[0] != x.shape[0]:
        raise ValueError(f"positions must have one entry per token ({x.shape[0]}), got {positions.shape[0]}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if rope_style != "none":
        if cos_sin_cache is None:
            raise ValueError(f"cos_sin_cache is required for rope_style={rope_style!r}")
        check_dim("cos_sin_cache", cos_sin_cache, 2, "(max_position, rotary_dim)")
        rotary_dim = cos_sin_cache.shape[1]
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"cos_sin_cache's rotary_dim must be even and in (0, head_dim={head_dim}], "
                             f"got {rotary_dim}")
        if cos_sin_cache.device != x.device:
            raise ValueError(f"cos_sin_cache must be on {x.device}, got {cos_sin_cache.device}")
    if cos_sin_cache is not None:
        check_dtype("cos_sin_cache", cos_sin_cache)  # an integer table would truncate every cos and sin


def check_positions(positions: torch.Tensor, cos_sin_cache: Optional[torch.Tensor]) -> None:
    """Values of positions: >= 0, or SKIP_POSITION (-1, a padding token), and inside cos_sin_cache's rows
    when there is a table to index (a negative index would silently read a row from its end)."""
    if positions.numel() == 0:
        return
    real = positions[positions != SKIP_POSITION]
    if real.numel() == 0:
        return
    lo, hi = int(real.min()), int(real.max())
    bound = cos_sin_cache.shape[0] if cos_sin_cache is not None else None
    if lo < 0 or (bound is not None and hi >= bound):
        allowed = f"[0, {bound})" if bound is not None else ">= 0"
        raise ValueError(f"positions must be {allowed} (the rows of cos_sin_cache), or {SKIP_POSITION} for a padding "
                         f"token, got values in [{lo}, {hi}]")


def check_all_gather(x: torch.Tensor, dim: int) -> None:
    if x.dim() < 1:
        raise ValueError("all_gather: x must have at least one dimension to gather along, got a 0-D tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"all_gather: dim must be in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, "
                         f"got {dim}")


def check_kv_cache(x: torch.Tensor, positions: torch.Tensor, cache_batch_index: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, n_kv_heads_per_rank: int, head_dim: int) -> None:
    check_dim("cache_batch_index", cache_batch_index, 1, "(T,)")
    if cache_batch_index.shape[0] != x.shape[0]:
        raise ValueError(f"cache_batch_index must have one entry per token ({x.shape[0]}), "
                         f"got {cache_batch_index.shape[0]}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_dim(name, cache, 4, "(batch, max_seq, n_kv_heads_per_rank, head_dim)")
        if tuple(cache.shape[2:]) != (n_kv_heads_per_rank, head_dim):
            raise ValueError(f"{name} must be (batch, max_seq, {n_kv_heads_per_rank}, {head_dim}), "
                             f"got {tuple(cache.shape)}")
        check_same(name, cache, "x", x)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match")


def check_gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], chunks: Optional[int]) -> None:
    check_dim("x", x, 2, "(M, K)")
    check_dtype("x", x)
    check_dim("w", w, 2, "(N, K)")
    check_same("w", w, "x", x)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be (N, K={x.shape[1]}) to match x (M, K), got {tuple(w.shape)}")
    if bias is not None:
        check_same("bias", bias, "x", x)
        if tuple(bias.shape) != (w.shape[0],):
            raise ValueError(f"bias must be (N,) = ({w.shape[0]},), got {tuple(bias.shape)}")
    if chunks is not None and chunks < 1:
        raise ValueError(f"chunks must be >= 1 or None, got {chunks}")


def check_gemm_reduce_scatter(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                              chunks: Optional[int], world_size: int) -> None:
    """check_gemm, and M divisible by the world size: each rank gets M / world_size output rows."""
    check_gemm(x, w, bias, chunks)
    if x.shape[0] % world_size:
        raise ValueError(f"x must have a number of rows M divisible by the world size {world_size} (each rank "
                         f"gets M / {world_size} output rows), got M = {x.shape[0]}; pad the tokens to a multiple")


def check_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_dtype("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., hidden)")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_same("residual", residual, "x", x)
    check_same("weight", weight, "x", x)
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must be (hidden,) = ({x.shape[-1]},), got {tuple(weight.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
