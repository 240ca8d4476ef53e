"""Torch-native implementations of every tp_kernels op.

They are two things at once: the CPU path (tp_kernels.ops.cpu registers them, with the communication done
by tp_kernels.distributed) and the oracle the tests compare every kernel against, usually after casting
the inputs to float64. They are written for clarity, not speed, and never call a tp_kernels kernel.

Collectives appear here in their single-process form: the inputs of every rank are given as a list, so
`all_reduce([x_0, ..., x_{p-1}])` is the value each rank must hold afterwards.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

ROPE_STYLES = ("neox", "gptj", "none")
# The position of a padding token (a CUDA-graph batch padded to its captured size): qkv_rope rotates it
# as position 0, qkv_rope_kv_cache writes none of its k and v. Any other position outside the tables
# raises on CPU; on a GPU, where checking would cost a device sync per call, the kernel writes nothing
# for it either and clamps its cos/sin row into the table (its q and k are then unspecified).
SKIP_POSITION = -1


# ----------------------------------------------------------------------------------------------------------
# rotary embedding
# ----------------------------------------------------------------------------------------------------------
def rope_cos_sin_cache(max_position: int, rotary_dim: int, theta: float = 10000.0,
                       dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The (max_position, rotary_dim) table that qkv_rope indexes by position: row p is
    [cos(p * f_0), ..., cos(p * f_{d/2-1}), sin(p * f_0), ..., sin(p * f_{d/2-1})] with
    f_i = theta^(-2i / rotary_dim), the frequencies of RoPE (Su et al. 2021) as Llama uses them."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64, device=device), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)  # (max_position, rotary_dim)


def apply_rope(t: torch.Tensor, cos_sin: torch.Tensor, rope_style: str) -> torch.Tensor:
    """Rotate the first rotary_dim features of each head of t (T, n_heads, head_dim) by the per-token
    angles in cos_sin (T, rotary_dim). neox rotates the two halves (x_i, x_{i+d/2}) as pairs; gptj rotates
    adjacent pairs (x_{2i}, x_{2i+1}). Features past rotary_dim pass through. Math in t's dtype."""
    if rope_style == "none":
        return t
    rotary_dim = cos_sin.shape[-1]
    half = rotary_dim // 2
    cos = cos_sin[:, None, :half].to(t.dtype)  # (T, 1, rotary_dim / 2)
    sin = cos_sin[:, None, half:].to(t.dtype)
    rot, passthrough = t[..., :rotary_dim], t[..., rotary_dim:]
    if rope_style == "neox":
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    elif rope_style == "gptj":
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {rope_style!r}")
    return torch.cat([rotated, passthrough], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# QKV projection
# ----------------------------------------------------------------------------------------------------------
def qkv_rope(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: Optional[torch.Tensor],
             cos_sin_cache: Optional[torch.Tensor], positions: torch.Tensor, n_heads_per_rank: int,
             n_kv_heads_per_rank: int, head_dim: int, rope_style: str):
    """q, k, v = split(x @ w_qkv.T + b_qkv) into heads, then rotary embedding on q and k.

    x (T, hidden); w_qkv ((n_heads_per_rank + 2 * n_kv_heads_per_rank) * head_dim, hidden), rows
    [q heads | k heads | v heads]; positions (T,) index cos_sin_cache (max_position, rotary_dim).
    Returns q (T, n_heads_per_rank, head_dim), k and v (T, n_kv_heads_per_rank, head_dim) in x's dtype.
    The projection and the rotation are done in float32 (float64 for float64 inputs), rounded once.
    """
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    qkv = x.to(compute_dtype) @ w_qkv.to(compute_dtype).T  # (T, (n_q + 2 n_kv) * head_dim)
    if b_qkv is not None:
        qkv = qkv + b_qkv.to(compute_dtype)
    n_tokens = x.shape[0]
    q_cols, kv_cols = n_heads_per_rank * head_dim, n_kv_heads_per_rank * head_dim
    q = qkv[:, :q_cols].reshape(n_tokens, n_heads_per_rank, head_dim)
    k = qkv[:, q_cols:q_cols + kv_cols].reshape(n_tokens, n_kv_heads_per_rank, head_dim)
    v = qkv[:, q_cols + kv_cols:].reshape(n_tokens, n_kv_heads_per_rank, head_dim)
    if rope_style != "none":
        rope_positions = torch.where(positions == SKIP_POSITION, 0, positions)  # padding tokens: as position 0
        cos_sin = cos_sin_cache[rope_positions].to(compute_dtype)  # (T, rotary_dim)
        q, k = apply_rope(q, cos_sin, rope_style), apply_rope(k, cos_sin, rope_style)
    return q.to(x.dtype).contiguous(), k.to(x.dtype).contiguous(), v.to(x.dtype).contiguous()


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cache_batch_index: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """k_cache[cache_batch_index[t], positions[t]] = k[t] (and v likewise), in place, for every token t
    whose position is not SKIP_POSITION (-1: a padding token, written nowhere). Caches are
    (batch, max_seq, n_kv_heads_per_rank, head_dim); the other indices must lie inside them (ValueError)."""
    written = positions != SKIP_POSITION
    batch_index, positions = cache_batch_index[written], positions[written]
    for name, index, bound in (("cache_batch_index", batch_index, k_cache.shape[0]),
                               ("positions", positions, k_cache.shape[1])):
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
            raise ValueError(f"{name} must be in [0, {bound}) for the tokens written to the cache (position "
                             f"{SKIP_POSITION} skips a token), got values in [{int(index.min())}, {int(index.max())}]")
    k_cache[batch_index, positions] = k[written].to(k_cache.dtype)
    v_cache[batch_index, positions] = v[written].to(v_cache.dtype)


# ----------------------------------------------------------------------------------------------------------
# norms
# ----------------------------------------------------------------------------------------------------------
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in float32 (float64 for float64), rounded once to x's dtype."""
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute_dtype)
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv_rms * weight.to(compute_dtype)).to(x.dtype)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """new_residual = x + residual (rounded to x's dtype); normed = rmsnorm(new_residual, weight, eps).
    Returns (normed, new_residual)."""
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    new_residual = (x.to(compute_dtype) + residual.to(compute_dtype)).to(x.dtype)
    return rmsnorm(new_residual, weight, eps), new_residual


# ----------------------------------------------------------------------------------------------------------
# collectives, single-process form
# ----------------------------------------------------------------------------------------------------------
def all_reduce(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of every rank's tensor, accumulated in float32 (float64 for float64) in rank order and
    rounded once: the result every rank holds."""
    compute_dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    total = torch.zeros_like(xs[0], dtype=compute_dtype)
    for x in xs:
        total += x.to(compute_dtype)
    return total.to(xs[0].dtype)


def all_reduce_(xs: Sequence[torch.Tensor]) -> None:
    """all_reduce in place: every rank's tensor becomes the sum (all_reduce's bits)."""
    total = all_reduce(xs)
    for x in xs:
        x.copy_(total)


def all_gather(xs: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Every rank's tensor concatenated along dim, rank 0 first."""
    return torch.cat(list(xs), dim=dim)


def gemm_allreduce(xs: Sequence[torch.Tensor], ws: Sequence[torch.Tensor],
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Row-parallel linear: sum_r xs[r] @ ws[r].T, plus bias once. xs[r] (M, K_r), ws[r] (N, K_r)."""
    compute_dtype = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    partials = [(x.to(compute_dtype) @ w.to(compute_dtype).T) for x, w in zip(xs, ws)]
    y = all_reduce(partials)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(xs[0].dtype)


def gemm_reduce_scatter(xs: Sequence[torch.Tensor], ws: Sequence[torch.Tensor],
                        bias: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Sequence-parallel row-parallel linear: gemm_allreduce(xs, ws, bias) split along M into one block
    of M / p rows per rank; returns the list of blocks, rank 0's first."""
    return list(gemm_allreduce(xs, ws, bias).chunk(len(xs), dim=0))


def allgather_gemm(xs: Sequence[torch.Tensor], w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Sequence-parallel column-parallel linear on one rank: the ranks' token blocks xs[r] (M / p, K)
    gathered along M, then linear with this rank's w (N_per_rank, K) and bias: (M, N_per_rank)."""
    return linear(all_gather(xs, dim=0), w, bias)


def allreduce_residual_rmsnorm(xs: Sequence[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor,
                               eps: float):
    """add_rmsnorm(all_reduce(xs), residual, weight, eps): (normed, new_residual)."""
    return add_rmsnorm(all_reduce(xs), residual, weight, eps)


def linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ w.T + bias in float32 (float64 for float64), rounded once to x's dtype."""
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.linear(x.to(compute_dtype), w.to(compute_dtype),
                    None if bias is None else bias.to(compute_dtype)).to(x.dtype)
