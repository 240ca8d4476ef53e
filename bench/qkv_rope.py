"""qkv_rope: the fused Triton kernel (projection + bias + RoPE + head split in one pass) vs the unfused
PyTorch sequence (F.linear with bias, split, RoPE, contiguous heads), per TP rank.

On a GPU both are measured with do_bench (bench.common.measure_cuda). Without one, the H100 time of
both is *modeled* (rows say kind="modeled"; HARDWARE["H100"], datasheet constants):
- unfused: each kernel of the sequence costs its roofline, max(FLOPs / peak, bytes / HBM bandwidth)
  (tp_kernels.perf.cost_model.roofline_time_s), as if cuBLAS streamed at the HBM peak; their sum.
- fused: the same roofline, but with the memory term latency-bound by Little's law
  (cost_model.latency_bound_time_s): the launch's programs and the weight bytes each keeps in flight
  ((num_stages - 1) pipelined BLOCK_N x BLOCK_K tiles) come from the kernel's own config table and
  split-K policy (tp_kernels.kernels.configs, sm_90), so a launch with too few programs or too little in
  flight is modeled slower than the floor, not at it.
- fused-before: the same model for the configs the kernel had before split-K, for contrast: at decode
  the 16 x 32 x 64 tiles (four stages), beyond it today's tiles with K unsplit.
Kernel-launch gaps are left out (the unfused sequence has four or more kernels, the fused one one).

    python bench/qkv_rope.py     # rows in bench/results/qkv_rope.{csv,json}, Markdown table on stdout
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from common import Row, environment, markdown_table, measure_cuda, write_rows
from tp_kernels import reference
from tp_kernels.perf import cost_model
from tp_kernels.kernels import configs
from tp_kernels.perf.cost_model import HARDWARE

BENCH = "qkv_rope"
DTYPE = torch.bfloat16
# (name, hidden, n_heads, n_kv_heads, head_dim, qkv bias, TP degrees that divide n_heads)
MODELS = [("llama3-8b", 4096, 32, 8, 128, False, (1, 8)), ("qwen2-7b", 3584, 28, 4, 128, True, (1, 4)),
          ("llama3-70b", 8192, 64, 8, 128, False, (1, 8))]
N_TOKENS = (1, 16, 128, 2048)
MAX_POSITION = 8192


def per_rank_heads(n_heads: int, n_kv_heads: int, tp: int):
    """Heads per rank; KV heads are replicated when tp exceeds them (as the QKV layer shards them)."""
    if n_heads % tp or (n_kv_heads >= tp and n_kv_heads % tp):
        raise ValueError(f"tp={tp} must divide n_heads={n_heads} (and n_kv_heads={n_kv_heads} when smaller)")
    return n_heads // tp, max(1, n_kv_heads // tp)


ARCH = "sm_90"  # the H100's config table
# the 16-bit decode tile before split-K (commit 47b0cd0's table): 16 x 32 x 64, 4 warps, 4 stages
DECODE_TILE_BEFORE = configs.TileConfig(16, 32, 64, num_warps=4, num_stages=4)


def table_config(n_tokens):
    """The kernel's config for n_tokens on ARCH (configs.qkv_config, by arch instead of device)."""
    return configs.QKV_CONFIGS[(ARCH, configs.dtype_class(DTYPE), configs.m_bucket(n_tokens))]


def before_split_k(n_tokens):
    """The config the kernel had for n_tokens before split-K: DECODE_TILE_BEFORE at decode, else today's
    tile with split-K off."""
    if configs.m_bucket(n_tokens) == configs.M_BUCKETS[0]:
        return DECODE_TILE_BEFORE
    return dataclasses.replace(table_config(n_tokens), split_k=False)


def fused_launch(n_tokens, hidden, n_heads_per_rank, n_kv_heads_per_rank, head_dim, config):
    """(programs, weight bytes in flight per program, programs per SM, split-K partial bytes) of the
    fused kernel's launch with `config` on ARCH, as tp_kernels.kernels.qkv._launch computes the grid (head
    tiles x token tiles, times the split of K)."""
    e = cost_model.dtype_bytes(DTYPE)
    head_slots = max(16, 1 << (head_dim - 1).bit_length())
    block_n = min(config.block_n, head_slots)
    n_tiles = -(-n_tokens // config.block_m) * (n_heads_per_rank + 2 * n_kv_heads_per_rank) * (head_slots // block_n)
    split = configs.split_k_for(n_tiles, hidden, config.block_k, configs.SM_COUNT[ARCH]) if config.split_k else 1
    in_flight = (config.num_stages - 1) * block_n * config.block_k * e  # the pipelined weight tiles
    shared = (config.num_stages - 1) * (config.block_m + block_n) * config.block_k * e
    # split-K writes each part's fp32 partial tile and the last part reads them all back
    partial_bytes = 2 * split * n_tiles * config.block_m * block_n * 4 if split > 1 else 0
    return n_tiles * split, in_flight, max(1, configs.SHARED_MEMORY_LIMIT[ARCH] // shared), partial_bytes


def modeled_times(n_tokens, hidden, n_heads_per_rank, n_kv_heads_per_rank, head_dim, with_bias, hw,
                  config=None):
    """(fused seconds, unfused seconds, fused bytes, flops, programs) of one rank's call in bf16; the fused
    kernel launched with `config` (default: its table's for n_tokens)."""
    e = cost_model.dtype_bytes(DTYPE)
    qkv_cols = (n_heads_per_rank + 2 * n_kv_heads_per_rank) * head_dim
    qk_cols = (n_heads_per_rank + n_kv_heads_per_rank) * head_dim
    v_cols = n_kv_heads_per_rank * head_dim
    gemm_flops = 2.0 * n_tokens * hidden * qkv_cols
    weight_bytes = (qkv_cols * hidden + (qkv_cols if with_bias else 0)) * e
    cos_sin_bytes = n_tokens * head_dim * 4  # one fp32 (cos | sin) row per token
    x_bytes, out_bytes = n_tokens * hidden * e, n_tokens * qkv_cols * e
    # fused: read x, w, bias and cos/sin once, write q, k, v once
    fused_bytes = x_bytes + weight_bytes + cos_sin_bytes + out_bytes
    if config is None:
        config = table_config(n_tokens)
    programs, in_flight, per_sm, partial_bytes = fused_launch(n_tokens, hidden, n_heads_per_rank,
                                                              n_kv_heads_per_rank, head_dim, config)
    fused = cost_model.latency_bound_time_s(gemm_flops, fused_bytes + partial_bytes, programs, in_flight, hw, DTYPE,
                                           per_sm)
    # unfused: GEMM with bias epilogue writes qkv; RoPE reads q, k and cos/sin and writes them rotated;
    # v is copied out of the interleaved qkv rows into its own contiguous heads
    gemm = cost_model.roofline_time_s(gemm_flops, x_bytes + weight_bytes + out_bytes, hw, DTYPE)
    rope = cost_model.roofline_time_s(6.0 * n_tokens * qk_cols, 2 * n_tokens * qk_cols * e + cos_sin_bytes, hw, DTYPE)
    v_copy = cost_model.roofline_time_s(0.0, 2 * n_tokens * v_cols * e, hw, DTYPE)
    return fused, gemm + rope + v_copy, fused_bytes, gemm_flops, programs


def unfused_qkv_rope(x, w_qkv, b_qkv, cos_sin, positions, n_heads_per_rank, n_kv_heads_per_rank, head_dim):
    """The plain PyTorch sequence the fused op replaces."""
    n_tokens = x.shape[0]
    qkv = F.linear(x, w_qkv, b_qkv)  # (T, (n_q + 2 n_kv) * head_dim)
    q, k, v = qkv.split([n_heads_per_rank * head_dim, n_kv_heads_per_rank * head_dim,
                         n_kv_heads_per_rank * head_dim], dim=-1)
    cs = cos_sin[positions]  # (T, rotary_dim)
    q = reference.apply_rope(q.view(n_tokens, n_heads_per_rank, head_dim), cs, "neox")
    k = reference.apply_rope(k.view(n_tokens, n_kv_heads_per_rank, head_dim), cs, "neox")
    return q.contiguous(), k.contiguous(), v.reshape(n_tokens, n_kv_heads_per_rank, head_dim).contiguous()


def _shape(n_tokens, hidden, nq, nkv, head_dim):
    return f"T={n_tokens} hidden={hidden} heads_per_rank={nq}/{nkv} head_dim={head_dim}"


def modeled_rows():
    hw = HARDWARE["H100"]
    env = dict(environment(), device=f"modeled:{hw.name}", triton="n/a")
    latency = cost_model.MEMORY_LATENCY[hw.name]
    notes = (f"fused: roofline with Little's-law bandwidth ({latency.dram_latency_ns:.0f} ns assumed latency, "
             f"{latency.sm_count} SMs); unfused: roofline per kernel; launch gaps not modeled; {hw.name}: {hw.source}")
    rows = []
    for model, hidden, n_heads, n_kv_heads, head_dim, with_bias, tp_degrees in MODELS:
        for tp in tp_degrees:
            nq, nkv = per_rank_heads(n_heads, n_kv_heads, tp)
            for n_tokens in N_TOKENS:
                fused, unfused, fused_bytes, flops, programs = modeled_times(n_tokens, hidden, nq, nkv, head_dim,
                                                                             with_bias, hw)
                common = dict(dtype="bfloat16", shape=_shape(n_tokens, hidden, nq, nkv, head_dim),
                              world_size=tp, kind="modeled", env=env)
                config = f"model={model} tp={tp} bias={with_bias}"
                rows.append(Row(bench=BENCH, case="unfused", config=config, median_us=unfused * 1e6,
                                p20_us=unfused * 1e6, p80_us=unfused * 1e6, notes=notes, **common))
                rows.append(Row(bench=BENCH, case="fused", config=f"{config} programs={programs}",
                                median_us=fused * 1e6, p20_us=fused * 1e6, p80_us=fused * 1e6,
                                gbps=fused_bytes / fused / 1e9, tflops=flops / fused / 1e12, baseline="unfused",
                                ratio=unfused / fused, notes=notes, **common))
                tile_before = before_split_k(n_tokens)
                before, _, _, _, programs = modeled_times(n_tokens, hidden, nq, nkv, head_dim, with_bias, hw,
                                                          tile_before)
                rows.append(Row(bench=BENCH, case="fused-before", config=f"{config} programs={programs}",
                                median_us=before * 1e6, p20_us=before * 1e6, p80_us=before * 1e6,
                                gbps=fused_bytes / before / 1e9, tflops=flops / before / 1e12,
                                baseline="unfused", ratio=unfused / before,
                                notes=notes + f"; config before split-K: {tile_before}", **common))
    return rows


def measured_rows():
    from tp_kernels import ops

    rows = []
    for model, hidden, n_heads, n_kv_heads, head_dim, with_bias, tp_degrees in MODELS:
        for tp in tp_degrees:
            nq, nkv = per_rank_heads(n_heads, n_kv_heads, tp)
            n_rows = (nq + 2 * nkv) * head_dim
            w = (torch.randn(n_rows, hidden, device="cuda") / hidden ** 0.5).to(DTYPE)
            b = torch.randn(n_rows, device="cuda").to(DTYPE) if with_bias else None
            cos_sin = reference.rope_cos_sin_cache(MAX_POSITION, head_dim, device="cuda")
            for n_tokens in N_TOKENS:
                x = torch.randn(n_tokens, hidden, device="cuda").to(DTYPE)
                positions = torch.randint(0, MAX_POSITION, (n_tokens,), device="cuda")
                args = (x, w, b, cos_sin, positions)
                fused = measure_cuda(lambda: ops.qkv_rope(*args, n_heads_per_rank=nq, n_kv_heads_per_rank=nkv,
                                                          head_dim=head_dim))
                unfused = measure_cuda(lambda: unfused_qkv_rope(*args, nq, nkv, head_dim))
                _, _, fused_bytes, flops, _ = modeled_times(n_tokens, hidden, nq, nkv, head_dim, with_bias,
                                                            HARDWARE["H100"])
                common = dict(config=f"model={model} tp={tp} bias={with_bias}", dtype="bfloat16",
                              shape=_shape(n_tokens, hidden, nq, nkv, head_dim), world_size=tp)
                rows.append(Row.from_timing(BENCH, "unfused", unfused, **common))
                rows.append(Row.from_timing(BENCH, "fused", fused, gbps=fused_bytes / fused.median_s / 1e9,
                                            tflops=flops / fused.median_s / 1e12, baseline="unfused",
                                            ratio=unfused.median_s / fused.median_s, **common))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="qkv_rope fused vs unfused (linear + bias + rope + transpose): "
                                     "measured with do_bench on a GPU, modeled H100 roofline without one")
    parser.add_argument("--modeled", action="store_true", help="model the H100 even when a GPU is present")
    args = parser.parse_args(argv)
    rows = measured_rows() if torch.cuda.is_available() and not args.modeled else modeled_rows()
    path = write_rows(BENCH, rows)
    print(markdown_table(rows, ["case", "config", "shape", "kind", "median_us", "gbps", "tflops", "ratio"]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
