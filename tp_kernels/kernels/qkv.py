"""Fused QKV projection + bias + rotary embedding + head split (+ KV-cache write) for one TP rank.

One GEMM kernel computes x @ w_qkv.T with fp32 accumulation; a program owns BLOCK_M tokens times
BLOCK_N columns of one head (q, k or v), so its epilogue can add the bias, rotate q and k and store
straight into the head-major output (or the KV cache) without another pass over q, k or v.

Tile layout. A head's HEAD_SLOTS = next_pow2(head_dim) columns are slots; slots (2s, 2s+1) hold the two
features that RoPE rotates together (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), so the epilogue
splits a tile into its even and odd slots and rotates them elementwise. Since partners are adjacent, a
head can be cut into HEAD_SLOTS / BLOCK_N tiles of any power-of-two width: decode uses narrow tiles so that
enough programs stream the weights (Llama-3-8B at TP=8 has 6 heads per rank: 6 programs with
whole-head tiles, 24 with 32-slot tiles). The slot -> feature map picks which rows of w_qkv the GEMM
reads:
- gptj: slot n holds feature n (the pairs are adjacent already);
- neox: pair s < rotary_dim/2 holds features (s, s + rotary_dim/2); the other pairs hold the
  pass-through features [rotary_dim, head_dim), first half with second half, rotated by cos=1, sin=0;
- none (and every v head): slot n holds feature n and nothing is rotated.
Slots of pair index >= head_dim/2 (head_dim 80 and 96 pad to 128) read zero weights and are not stored.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from tp_kernels.kernels import configs
from tp_kernels.kernels.tiling import accumulate_tile, grouped_tile_ids
from tp_kernels.ops import checks

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _qkv_rope_kernel(
    # pointers
    x_ptr,  # (T, hidden)
    w_ptr,  # ((n_q + 2 n_kv) * HEAD_DIM, hidden), rows [q heads | k heads | v heads]
    bias_ptr,  # ((n_q + 2 n_kv) * HEAD_DIM,); read only if HAS_BIAS
    cos_sin_ptr,  # (max_position, ROTARY_DIM), rows [cos | sin]; read only if ROPE_STYLE != "none"
    positions_ptr,  # (T,) int32/int64
    batch_index_ptr,  # (T,); read only if WRITE_KV_CACHE
    q_ptr,  # (T, n_q, HEAD_DIM), contiguous
    k_ptr,  # (T, n_kv, HEAD_DIM), or the k cache (batch, max_seq, n_kv, HEAD_DIM) if WRITE_KV_CACHE
    v_ptr,  # like k_ptr
    # sizes
    T, hidden, n_q_heads, n_kv_heads,
    # strides
    stride_xt, stride_xk, stride_wn, stride_wk, stride_cs_pos, stride_cs_col,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh, stride_kd,  # stride_kb is 0 and stride_kt the token stride without a cache
    stride_vb, stride_vt, stride_vh, stride_vd,
    # meta-parameters
    HEAD_DIM: tl.constexpr, HEAD_SLOTS: tl.constexpr, ROTARY_DIM: tl.constexpr, ROPE_STYLE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_KV_CACHE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    HALF_ROTARY: tl.constexpr = ROTARY_DIM // 2
    HALF_HEAD: tl.constexpr = HEAD_DIM // 2
    TILES_PER_HEAD: tl.constexpr = HEAD_SLOTS // BLOCK_N
    n_heads_total = n_q_heads + 2 * n_kv_heads
    tile_m, tile_n = grouped_tile_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), n_heads_total * TILES_PER_HEAD,
                                      GROUP_M)
    head = tile_n // TILES_PER_HEAD
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # token indices
    rows_valid = rows < T

    # slot -> feature of the head (module docstring)
    first_slot = (tile_n % TILES_PER_HEAD) * BLOCK_N
    slots = first_slot + tl.arange(0, BLOCK_N)
    pairs = slots // 2
    if ROPE_STYLE == "neox":
        is_second = (slots % 2) == 1
        rotated_pair = pairs < HALF_ROTARY
        features = pairs + tl.where(is_second, tl.where(rotated_pair, HALF_ROTARY, HALF_HEAD),
                                    tl.where(rotated_pair, 0, HALF_ROTARY))
    else:
        features = slots
    features_valid = pairs < HALF_HEAD
    w_rows = head * HEAD_DIM + features

    acc = accumulate_tile(x_ptr, w_ptr, rows, w_rows, features_valid, T, hidden,
                          stride_xt, stride_xk, stride_wn, stride_wk,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_OPERANDS, DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
    if HAS_BIAS:
        acc += tl.load(bias_ptr + w_rows, mask=features_valid, other=0.0).to(tl.float32)[None, :]

    positions = tl.load(positions_ptr + rows, mask=rows_valid, other=0)
    if ROPE_STYLE != "none":
        if head < n_q_heads + n_kv_heads:  # q and k heads; v heads are not rotated
            pair_ids = first_slot // 2 + tl.arange(0, BLOCK_N // 2)
            rotate = rows_valid[:, None] & (pair_ids < HALF_ROTARY)[None, :]
            cos_ptrs = cos_sin_ptr + positions[:, None].to(tl.int64) * stride_cs_pos + pair_ids[None, :] * stride_cs_col
            # pairs past rotary_dim/2 (pass-through features, padding) get the identity rotation
            cos = tl.load(cos_ptrs, mask=rotate, other=1.0).to(tl.float32)  # (BLOCK_M, BLOCK_N / 2)
            sin = tl.load(cos_ptrs + HALF_ROTARY * stride_cs_col, mask=rotate, other=0.0).to(tl.float32)
            x0, x1 = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))  # even, odd slots
            acc = tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (BLOCK_M, BLOCK_N))

    # Where this head goes: q by token row; k and v by token row, or with WRITE_KV_CACHE at
    # [batch_index[t], positions[t]] of the cache. Only scalars differ between the branches, so the
    # (BLOCK_M, BLOCK_N) pointer tile is built once, after them.
    if head < n_q_heads:
        dst_base = q_ptr + head * stride_qh
        stride_dst_b = 0
        stride_dst_t = stride_qt
        stride_dst_d = 1
    elif head < n_q_heads + n_kv_heads:
        dst_base = k_ptr + (head - n_q_heads) * stride_kh
        stride_dst_b = stride_kb
        stride_dst_t = stride_kt
        stride_dst_d = stride_kd
    else:
        dst_base = v_ptr + (head - n_q_heads - n_kv_heads) * stride_vh
        stride_dst_b = stride_vb
        stride_dst_t = stride_vt
        stride_dst_d = stride_vd
    if WRITE_KV_CACHE:
        to_cache = head >= n_q_heads
        batch_index = tl.load(batch_index_ptr + rows, mask=rows_valid, other=0)
        dst_rows = tl.where(to_cache, positions, rows).to(tl.int64) * stride_dst_t + \
            tl.where(to_cache, batch_index, 0).to(tl.int64) * stride_dst_b
    else:
        dst_rows = rows.to(tl.int64) * stride_dst_t
    dst = dst_base + dst_rows[:, None] + features[None, :] * stride_dst_d
    tl.store(dst, acc.to(q_ptr.dtype.element_ty), mask=rows_valid[:, None] & features_valid[None, :])


# ----------------------------------------------------------------------------------------------------------
# launchers: check, allocate, launch
# ----------------------------------------------------------------------------------------------------------
MAX_HEAD_DIM = 256  # a 256-slot head is the widest the configs were checked for


def head_slots_for(head_dim: int) -> int:
    """Columns a head takes in the tiling: the next power of two (tl.arange needs one), at least 16
    (tl.dot's minimum N)."""
    return max(16, triton.next_power_of_2(head_dim))


def _check_launch(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank, head_dim,
                  rope_style):
    checks.check_qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank,
                          head_dim, rope_style)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32 for the Triton kernel, got {x.dtype}")
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be even and <= {MAX_HEAD_DIM} for the Triton kernel, got {head_dim}")
    if positions.device != x.device:
        raise ValueError(f"positions must be on x's device ({x.device}), got {positions.device}")
    _check_runs_here(x)
    if x.device.type == "cpu" and rope_style != "none":
        _check_index_range("positions", positions, cos_sin_cache.shape[0], "cos_sin_cache's max_position")


def _check_runs_here(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and triton.knobs.runtime.interpret:
        return
    raise ValueError(f"x must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set before triton is "
                     f"imported), got a {x.device.type} tensor")


def _check_index_range(name: str, index: torch.Tensor, bound: int, bound_name: str) -> None:
    """Out-of-range indices would make the kernel read or write outside a tensor. Checked on CPU only:
    on a GPU the check needs a device sync per call (and breaks CUDA-graph capture), so there the caller
    owns it, as with torch's own index kernels."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
        raise ValueError(f"{name} must be in [0, {bound_name}={bound}), got values in "
                         f"[{int(index.min())}, {int(index.max())}]")


def _launch(x, w_qkv, b_qkv, cos_sin_cache, positions, batch_index, q, k_dst, v_dst, k_strides, v_strides,
            n_heads_per_rank, n_kv_heads_per_rank, head_dim, rope_style, write_kv_cache):
    n_tokens, hidden = x.shape
    head_slots = head_slots_for(head_dim)
    config = configs.qkv_config(x.device, x.dtype, n_tokens)
    block_n = min(config.block_n, head_slots)
    n_heads_total = n_heads_per_rank + 2 * n_kv_heads_per_rank
    grid = (triton.cdiv(n_tokens, config.block_m) * n_heads_total * (head_slots // block_n),)
    rotary_dim = 0 if rope_style == "none" else cos_sin_cache.shape[1]
    # unused pointer arguments get x: the kernel never reads them (their constexpr flags are off)
    cos_sin = x if rope_style == "none" else cos_sin_cache
    cs_strides = (0, 0) if rope_style == "none" else cos_sin_cache.stride()
    interpreting = x.device.type == "cpu"
    wrap_triton(_qkv_rope_kernel)[grid](
        x, w_qkv, x if b_qkv is None else b_qkv.contiguous(), cos_sin, positions.contiguous(),
        batch_index.contiguous() if write_kv_cache else positions, q, k_dst, v_dst,
        n_tokens, hidden, n_heads_per_rank, n_kv_heads_per_rank,
        x.stride(0), x.stride(1), w_qkv.stride(0), w_qkv.stride(1), cs_strides[0], cs_strides[1],
        q.stride(0), q.stride(1), *k_strides, *v_strides,
        HEAD_DIM=head_dim, HEAD_SLOTS=head_slots, ROTARY_DIM=rotary_dim, ROPE_STYLE=rope_style,
        HAS_BIAS=b_qkv is not None, WRITE_KV_CACHE=write_kv_cache, BLOCK_M=config.block_m, BLOCK_N=block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, UPCAST_OPERANDS=interpreting,
        # exact fp32 products for fp32 inputs (torch's default, no TF32); 16-bit operands ignore it
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or interpreting else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages)


def qkv_rope(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: Optional[torch.Tensor],
             cos_sin_cache: Optional[torch.Tensor], positions: torch.Tensor, n_heads_per_rank: int,
             n_kv_heads_per_rank: int, head_dim: int,
             rope_style: str = "neox") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tp_kernels::qkv_rope in one kernel launch; semantics of tp_kernels.reference.qkv_rope.

    x (T, hidden) fp16/bf16/fp32 on a GPU (or CPU under TRITON_INTERPRET=1); returns contiguous
    q (T, n_heads_per_rank, head_dim), k, v (T, n_kv_heads_per_rank, head_dim) in x's dtype.
    """
    _check_launch(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank, head_dim,
                  rope_style)
    n_tokens = x.shape[0]
    q = x.new_empty((n_tokens, n_heads_per_rank, head_dim))
    k = x.new_empty((n_tokens, n_kv_heads_per_rank, head_dim))
    v = x.new_empty((n_tokens, n_kv_heads_per_rank, head_dim))
    if n_tokens == 0:
        return q, k, v
    # (batch stride, token stride, head stride, feature stride); the outputs have no batch dimension
    k_strides = (0,) + k.stride()
    v_strides = (0,) + v.stride()
    _launch(x, w_qkv, b_qkv, cos_sin_cache, positions, None, q, k, v, k_strides, v_strides, n_heads_per_rank,
            n_kv_heads_per_rank, head_dim, rope_style, write_kv_cache=False)
    return q, k, v


def qkv_rope_kv_cache(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: Optional[torch.Tensor],
                      cos_sin_cache: Optional[torch.Tensor], positions: torch.Tensor,
                      cache_batch_index: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      n_heads_per_rank: int, n_kv_heads_per_rank: int, head_dim: int,
                      rope_style: str = "neox") -> torch.Tensor:
    """tp_kernels::qkv_rope_kv_cache in one kernel launch: returns q; k and v of token t go to
    k_cache/v_cache (batch, max_seq, n_kv_heads_per_rank, head_dim) at [cache_batch_index[t], positions[t]]
    and no other cache slot is written."""
    _check_launch(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank, head_dim,
                  rope_style)
    checks.check_kv_cache(x, positions, cache_batch_index, k_cache, v_cache, n_kv_heads_per_rank, head_dim)
    if cache_batch_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_batch_index must be int32 or int64, got {cache_batch_index.dtype}")
    if cache_batch_index.device != x.device:
        raise ValueError(f"cache_batch_index must be on x's device ({x.device}), got {cache_batch_index.device}")
    if x.device.type == "cpu":
        _check_index_range("cache_batch_index", cache_batch_index, k_cache.shape[0], "the caches' batch")
        _check_index_range("positions", positions, k_cache.shape[1], "the caches' max_seq")
    n_tokens = x.shape[0]
    q = x.new_empty((n_tokens, n_heads_per_rank, head_dim))
    if n_tokens == 0:
        return q
    _launch(x, w_qkv, b_qkv, cos_sin_cache, positions, cache_batch_index, q, k_cache, v_cache, k_cache.stride(),
            v_cache.stride(), n_heads_per_rank, n_kv_heads_per_rank, head_dim, rope_style, write_kv_cache=True)
    return q
