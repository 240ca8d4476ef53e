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
Under neox the even slots of a tile hold contiguous features of the head, and so do the odd ones, so the
epilogue stores the two rotated halves as two contiguous blocks (vector stores; tests/kernels/
test_aot_compile.py counts them in the PTX).

Split-K. Where a launch has fewer tiles than the GPU has SMs (decode, and TP-sized N at small M), K is cut
into split_k parts and each (tile, part) is a program (configs.split_k_for picks split_k). A part writes
its fp32 partial tile to a workspace and counts itself in at its tile's arrival counter; the last part to
arrive sums the partials in part order, runs the epilogue and zeroes the counter (the protocol is
commented in the kernel; launch.py hands out the counters).

Indices. positions[t] == -1 marks a padding token (reference.SKIP_POSITION): its k and v are written
nowhere and its cos/sin row is row 0. The kernel clamps every cos/sin row into the table and writes no
cache slot outside the caches, so an out-of-range index cannot touch memory it does not own; on CPU the
launchers raise for one instead (checking on a GPU would cost a device sync per call).
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from tp_kernels import reference
from tp_kernels.kernels import configs, launch
from tp_kernels.kernels.tiling import accumulate_tile, grouped_tile_ids
from tp_kernels.ops import checks

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The launch choices (configs.py's table, the split-K policy, the launcher below) are baked into a graph
# that torch.compile caches, so they are part of the kernels' identity: torch's AOTAutograd cache key
# reads the source of the kernels registered for an op and the constexpr globals they use, and
# tp_kernels/ops/triton_impls.py registers _launch_code_key next to the kernels (issue 18, item 11).
LAUNCH_CODE_DIGEST = tl.constexpr(launch.source_digest(configs, launch, sys.modules[__name__]))


@triton.jit
def _launch_code_key():
    """Never launched: it only carries LAUNCH_CODE_DIGEST into torch's compile-cache key."""
    return LAUNCH_CODE_DIGEST


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
    partials_ptr,  # (split_k, n_tiles, BLOCK_M, BLOCK_N) fp32 workspace; used only if SPLIT_K
    counters_ptr,  # (n_tiles,) int32, zero before and after the launch; used only if SPLIT_K
    # sizes
    T, hidden, n_q_heads, n_kv_heads, max_position, cache_batch, cache_max_seq, split_k, k_per_split,
    # strides
    stride_xt, stride_xk, stride_wn, stride_wk, stride_cs_pos, stride_cs_col,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh, stride_kd,  # stride_kb is 0 and stride_kt the token stride without a cache
    stride_vb, stride_vt, stride_vh, stride_vd,
    # meta-parameters
    HEAD_DIM: tl.constexpr, HEAD_SLOTS: tl.constexpr, ROTARY_DIM: tl.constexpr, ROPE_STYLE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_KV_CACHE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    HALF_ROTARY: tl.constexpr = ROTARY_DIM // 2
    HALF_HEAD: tl.constexpr = HEAD_DIM // 2
    TILES_PER_HEAD: tl.constexpr = HEAD_SLOTS // BLOCK_N
    n_heads_total = n_q_heads + 2 * n_kv_heads
    n_tiles_m = tl.cdiv(T, BLOCK_M)
    n_tiles_n = n_heads_total * TILES_PER_HEAD
    if SPLIT_K:  # program = (tile, part of K); the parts of a tile are neighbours in launch order
        tile = tl.program_id(0) // split_k
        k_part = tl.program_id(0) % split_k
        k_start = k_part * k_per_split
        x_part = x_ptr + k_start * stride_xk  # the part's first column; its length is k_len
        w_part = w_ptr + k_start * stride_wk
        k_len = tl.minimum(hidden - k_start, k_per_split)
    else:
        tile = tl.program_id(0)
        x_part = x_ptr
        w_part = w_ptr
        k_len = hidden
    tile_m, tile_n = grouped_tile_ids(tile, n_tiles_m, n_tiles_n, GROUP_M)
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

    acc = accumulate_tile(x_part, w_part, rows, w_rows, features_valid, T, k_len,
                          stride_xt, stride_xk, stride_wn, stride_wk,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_OPERANDS, DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
    is_last = True
    if SPLIT_K:
        # Arrival protocol: every part writes its partial tile, then counts itself in at the tile's counter;
        # the part that arrives last sums all partials (in part order, so the bits do not depend on which
        # part is last), runs the epilogue and puts the counter back to zero for the next launch.
        tile_offsets = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_stride = (n_tiles_m * n_tiles_n).to(tl.int64) * (BLOCK_M * BLOCK_N)  # between parts
        tile_partials = partials_ptr + tile.to(tl.int64) * (BLOCK_M * BLOCK_N) + tile_offsets
        tl.store(tile_partials + k_part * tile_stride, acc)
        tl.debug_barrier()  # all threads' partials are written before the arrival below publishes them
        arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")  # release: matches acquire [A]
        is_last = arrived == split_k - 1
        if is_last:  # [A] acquire: the other parts' partials are visible; .cg reads them from L2
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for part in range(0, split_k):
                acc += tl.load(tile_partials + part * tile_stride, cache_modifier=".cg")
            tl.atomic_xchg(counters_ptr + tile, 0)
    if is_last:
        _epilogue(acc, bias_ptr, cos_sin_ptr, positions_ptr, batch_index_ptr, q_ptr, k_ptr, v_ptr,
                  head, rows, rows_valid, first_slot, features, features_valid, w_rows,
                  n_q_heads, n_kv_heads, max_position, cache_batch, cache_max_seq,
                  stride_cs_pos, stride_cs_col, stride_qt, stride_qh,
                  stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
                  HEAD_DIM, ROTARY_DIM, ROPE_STYLE, HAS_BIAS, WRITE_KV_CACHE, BLOCK_M, BLOCK_N)


@triton.jit
def _epilogue(acc, bias_ptr, cos_sin_ptr, positions_ptr, batch_index_ptr, q_ptr, k_ptr, v_ptr,
              head, rows, rows_valid, first_slot, features, features_valid, w_rows,
              n_q_heads, n_kv_heads, max_position, cache_batch, cache_max_seq,
              stride_cs_pos, stride_cs_col, stride_qt, stride_qh,
              stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
              HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, ROPE_STYLE: tl.constexpr,
              HAS_BIAS: tl.constexpr, WRITE_KV_CACHE: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Bias, RoPE and the store of one (BLOCK_M, BLOCK_N) fp32 tile of head `head`."""
    HALF_ROTARY: tl.constexpr = ROTARY_DIM // 2
    HALF_HEAD: tl.constexpr = HEAD_DIM // 2
    if HAS_BIAS:
        acc += tl.load(bias_ptr + w_rows, mask=features_valid, other=0.0).to(tl.float32)[None, :]
    positions = tl.load(positions_ptr + rows, mask=rows_valid, other=0)

    # Where this head goes: q by token row; k and v by token row, or with WRITE_KV_CACHE at
    # [batch_index[t], positions[t]] of the cache. Only scalars differ between the branches, so the
    # pointer tiles are built once, after them.
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
    store_rows = rows_valid
    if WRITE_KV_CACHE:
        to_cache = head >= n_q_heads
        batch_index = tl.load(batch_index_ptr + rows, mask=rows_valid, other=0)
        dst_rows = tl.where(to_cache, positions, rows).to(tl.int64) * stride_dst_t + \
            tl.where(to_cache, batch_index, 0).to(tl.int64) * stride_dst_b
        # A slot outside the cache is never written: position -1 marks a padding token (the skip value
        # of the op's contract) and any other out-of-range index is dropped too, since checking it on
        # the host would cost a device sync per call.
        in_cache = (positions >= 0) & (positions < cache_max_seq) & (batch_index >= 0) & (batch_index < cache_batch)
        store_rows = rows_valid & (in_cache | (head < n_q_heads))
    else:
        dst_rows = rows.to(tl.int64) * stride_dst_t
    dst_rows_ptr = dst_base + dst_rows  # (BLOCK_M,)

    if ROPE_STYLE != "none":
        pair_ids = first_slot // 2 + tl.arange(0, BLOCK_N // 2)
        x0, x1 = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))  # even, odd slots
        if head < n_q_heads + n_kv_heads:  # q and k heads; v heads are not rotated
            # clamped, so that no position reads outside the table (-1, the skip value, reads row 0)
            rope_positions = tl.minimum(tl.maximum(positions, 0), max_position - 1).to(tl.int64)
            rotate = rows_valid[:, None] & (pair_ids < HALF_ROTARY)[None, :]
            cos_ptrs = cos_sin_ptr + rope_positions[:, None] * stride_cs_pos + pair_ids[None, :] * stride_cs_col
            # pairs past rotary_dim/2 (pass-through features, padding) get the identity rotation
            cos = tl.load(cos_ptrs, mask=rotate, other=1.0).to(tl.float32)  # (BLOCK_M, BLOCK_N / 2)
            sin = tl.load(cos_ptrs + HALF_ROTARY * stride_cs_col, mask=rotate, other=0.0).to(tl.float32)
            x0, x1 = x0 * cos - x1 * sin, x1 * cos + x0 * sin
        if ROPE_STYLE == "neox":
            # The even slots of a tile hold features that are contiguous in the head, and so do the odd
            # ones: two stores of BLOCK_N / 2 contiguous columns each, which compile to vector stores
            # (joined back into slot order they were one scalar store per element).
            if HALF_ROTARY == HALF_HEAD:
                first_features = pair_ids
                second_features = pair_ids + HALF_HEAD
            else:  # partial rotary: the pass-through pairs sit past rotary_dim (module docstring)
                first_features = pair_ids + tl.where(pair_ids < HALF_ROTARY, 0, HALF_ROTARY)
                second_features = pair_ids + tl.where(pair_ids < HALF_ROTARY, HALF_ROTARY, HALF_HEAD)
            mask = store_rows[:, None] & (pair_ids < HALF_HEAD)[None, :]
            out_dtype = q_ptr.dtype.element_ty
            tl.store(dst_rows_ptr[:, None] + first_features[None, :] * stride_dst_d, x0.to(out_dtype), mask=mask)
            tl.store(dst_rows_ptr[:, None] + second_features[None, :] * stride_dst_d, x1.to(out_dtype), mask=mask)
        else:
            acc = tl.reshape(tl.join(x0, x1), (BLOCK_M, BLOCK_N))
    if ROPE_STYLE != "neox":
        tl.store(dst_rows_ptr[:, None] + features[None, :] * stride_dst_d, acc.to(q_ptr.dtype.element_ty),
                 mask=store_rows[:, None] & features_valid[None, :])


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
        _check_index_range("positions", positions, cos_sin_cache.shape[0], "cos_sin_cache's max_position",
                           positions != reference.SKIP_POSITION)


def _check_runs_here(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and triton.knobs.runtime.interpret:
        return
    raise ValueError(f"x must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set before triton is "
                     f"imported), got a {x.device.type} tensor")


def _check_index_range(name: str, index: torch.Tensor, bound: int, bound_name: str, checked: torch.Tensor) -> None:
    """Indices of the `checked` tokens must lie in [0, bound). Checked on CPU only: on a GPU the check needs
    a device sync per call (and breaks CUDA-graph capture), so there the kernel drops a cache write to a
    slot outside the cache and clamps a cos/sin row into the table (the op's contract, reference.py)."""
    index = index[checked]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
        raise ValueError(f"{name} must be in [0, {bound_name}={bound}) (or the position {reference.SKIP_POSITION} "
                         f"that marks a padding token), got values in [{int(index.min())}, {int(index.max())}]")


def _launch(x, w_qkv, b_qkv, cos_sin_cache, positions, batch_index, q, k_dst, v_dst, k_strides, v_strides,
            n_heads_per_rank, n_kv_heads_per_rank, head_dim, rope_style, write_kv_cache, split_k=None):
    """Launch _qkv_rope_kernel. split_k: parts of K per tile; None lets the config decide
    (configs.split_k_for), a number forces it (tests)."""
    n_tokens, hidden = x.shape
    head_slots = head_slots_for(head_dim)
    config = configs.qkv_config(x.device, x.dtype, n_tokens)
    block_n = min(config.block_n, head_slots)
    n_heads_total = n_heads_per_rank + 2 * n_kv_heads_per_rank
    n_tiles = triton.cdiv(n_tokens, config.block_m) * n_heads_total * (head_slots // block_n)
    if split_k is None:
        split_k = configs.split_k_for(n_tiles, hidden, config.block_k, configs.sm_count(x.device)) \
            if config.split_k else 1
    k_per_split = triton.cdiv(triton.cdiv(max(hidden, 1), split_k), config.block_k) * config.block_k
    split_k = max(1, triton.cdiv(hidden, k_per_split))  # no part left without K
    if split_k > 1:
        partials = torch.empty((split_k, n_tiles, config.block_m, block_n), dtype=torch.float32, device=x.device)
        counters = launch.arrival_counters(x.device, n_tiles)
    else:
        partials = counters = x  # unused (SPLIT_K off)
    rotary_dim = 0 if rope_style == "none" else cos_sin_cache.shape[1]
    # unused pointer arguments get x: the kernel never reads them (their constexpr flags are off)
    cos_sin = x if rope_style == "none" else cos_sin_cache
    cs_strides = (0, 0) if rope_style == "none" else cos_sin_cache.stride()
    max_position = 1 if rope_style == "none" else cos_sin_cache.shape[0]
    cache_batch, cache_max_seq = (k_dst.shape[0], k_dst.shape[1]) if write_kv_cache else (0, 0)
    interpreting = x.device.type == "cpu"
    launch.kernel_for_launch(_qkv_rope_kernel)[(n_tiles * split_k,)](
        x, w_qkv, x if b_qkv is None else b_qkv.contiguous(), cos_sin, positions.contiguous(),
        batch_index.contiguous() if write_kv_cache else positions, q, k_dst, v_dst, partials, counters,
        n_tokens, hidden, n_heads_per_rank, n_kv_heads_per_rank, max_position, cache_batch, cache_max_seq,
        split_k, k_per_split,
        x.stride(0), x.stride(1), w_qkv.stride(0), w_qkv.stride(1), cs_strides[0], cs_strides[1],
        q.stride(0), q.stride(1), *k_strides, *v_strides,
        HEAD_DIM=head_dim, HEAD_SLOTS=head_slots, ROTARY_DIM=rotary_dim, ROPE_STYLE=rope_style,
        HAS_BIAS=b_qkv is not None, WRITE_KV_CACHE=write_kv_cache, BLOCK_M=config.block_m, BLOCK_N=block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, SPLIT_K=split_k > 1, UPCAST_OPERANDS=interpreting,
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
    and no other cache slot is written. A token at position -1 (reference.SKIP_POSITION, a padding token)
    writes nothing; other indices outside the caches raise on CPU and write nothing on a GPU."""
    _check_launch(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank, head_dim,
                  rope_style)
    checks.check_kv_cache(x, positions, cache_batch_index, k_cache, v_cache, n_kv_heads_per_rank, head_dim)
    if cache_batch_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_batch_index must be int32 or int64, got {cache_batch_index.dtype}")
    if cache_batch_index.device != x.device:
        raise ValueError(f"cache_batch_index must be on x's device ({x.device}), got {cache_batch_index.device}")
    if x.device.type == "cpu":
        written = positions != reference.SKIP_POSITION
        _check_index_range("cache_batch_index", cache_batch_index, k_cache.shape[0], "the caches' batch", written)
        _check_index_range("positions", positions, k_cache.shape[1], "the caches' max_seq", written)
    n_tokens = x.shape[0]
    q = x.new_empty((n_tokens, n_heads_per_rank, head_dim))
    if n_tokens == 0:
        return q
    _launch(x, w_qkv, b_qkv, cos_sin_cache, positions, cache_batch_index, q, k_cache, v_cache, k_cache.stride(),
            v_cache.stride(), n_heads_per_rank, n_kv_heads_per_rank, head_dim, rope_style, write_kv_cache=True)
    return q
