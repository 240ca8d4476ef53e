"""Call every tp_kernels op directly, on 2 CPU ranks, and check each against its plain-PyTorch equivalent.

    python python/examples/call_ops.py

The ops live in torch.ops.tp_kernels; tp_kernels.ops wraps them with typed signatures. Collectives take the
TPGroup (or its name). Every rank builds the inputs of all ranks from the same seed, so it can compute the
expected result of a collective on its own.
"""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tp_kernels
from tp_kernels import ops

WORLD_SIZE = 2


def rms_norm(h, weight, eps):
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rotate_neox(t, cos, sin):
    """Rotary embedding, neox style: the halves (x1, x2) of each head rotate as pairs."""
    x1, x2 = t.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, head_dim / 2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def check(rank, name, actual, expected, atol=1e-5):
    error = (actual - expected).abs().max().item()
    if rank == 0:
        print(f"  {name:<28} max |error| = {error:.1e}")
    if error > atol:
        raise SystemExit(f"rank {rank}: {name} differs from its plain-PyTorch equivalent by {error}")


def run_rank(rank, init_file):
    torch.set_num_threads(1)
    tp = tp_kernels.TPGroup.init(rank=rank, world_size=WORLD_SIZE, backend="gloo", init_method=f"file://{init_file}")
    torch.manual_seed(0)
    tokens, hidden, eps = 6, 32, 1e-6
    xs = [torch.randn(tokens, hidden) for _ in range(WORLD_SIZE)]  # one input per rank
    x = xs[rank]
    if rank == 0:
        print(f"tp_kernels ops on {WORLD_SIZE} CPU ranks (extension built with CUDA: "
              f"{tp_kernels._extension.built_with_cuda()})")

    # all_reduce / all_gather: the sum and the concatenation over ranks
    check(rank, "all_reduce", ops.all_reduce(x, tp), sum(xs))
    check(rank, "all_gather (dim=-1)", ops.all_gather(x, tp, dim=-1), torch.cat(xs, dim=-1))

    # gemm_allreduce: a row-parallel linear; rank r holds columns [r*K/p, (r+1)*K/p) of w and the same x slice
    w, bias = torch.randn(24, 2 * hidden), torch.randn(24)
    x_full = torch.cat(xs, dim=-1)  # (tokens, 2 * hidden): rank r's slice is xs[r]
    w_slice = w[:, rank * hidden:(rank + 1) * hidden]
    check(rank, "gemm_allreduce (chunks=2)", ops.gemm_allreduce(x, w_slice, bias, tp, chunks=2), x_full @ w.T + bias,
          atol=1e-4)

    # add_rmsnorm and its fused-with-all-reduce form
    residual, weight = torch.randn(tokens, hidden), torch.randn(hidden)
    normed, new_residual = ops.add_rmsnorm(x, residual, weight, eps)
    check(rank, "add_rmsnorm", normed, rms_norm(x + residual, weight, eps))
    normed, new_residual = ops.allreduce_residual_rmsnorm(x, residual, weight, eps, tp)
    check(rank, "allreduce_residual_rmsnorm", normed, rms_norm(sum(xs) + residual, weight, eps))
    check(rank, "  its new residual", new_residual, sum(xs) + residual)

    # qkv_rope: this rank's QKV projection (2 query heads, 1 KV head of head_dim 8), bias, rotary embedding
    n_q, n_kv, head_dim = 2, 1, 8
    w_qkv, b_qkv = torch.randn((n_q + 2 * n_kv) * head_dim, hidden), torch.randn((n_q + 2 * n_kv) * head_dim)
    positions = torch.arange(tokens)
    cos_sin_cache = tp_kernels.reference.rope_cos_sin_cache(64, head_dim)  # (max_position, head_dim): [cos | sin]
    q, k, v = ops.qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank=n_q, n_kv_heads_per_rank=n_kv,
                           head_dim=head_dim, rope_style="neox")
    qkv = x @ w_qkv.T + b_qkv
    q_ref, k_ref, v_ref = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    check(rank, "qkv_rope q", q, rotate_neox(q_ref.view(tokens, n_q, head_dim), cos, sin), atol=1e-4)
    check(rank, "qkv_rope k", k, rotate_neox(k_ref.view(tokens, n_kv, head_dim), cos, sin), atol=1e-4)
    check(rank, "qkv_rope v", v, v_ref.view(tokens, n_kv, head_dim), atol=1e-4)

    # qkv_rope_kv_cache: the same, with k and v written into caches (batch, max_seq, n_kv, head_dim)
    k_cache, v_cache = torch.zeros(1, 16, n_kv, head_dim), torch.zeros(1, 16, n_kv, head_dim)
    q2 = ops.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin_cache, positions, torch.zeros(tokens, dtype=torch.long),
                               k_cache, v_cache, n_heads_per_rank=n_q, n_kv_heads_per_rank=n_kv, head_dim=head_dim)
    check(rank, "qkv_rope_kv_cache q", q2, q)
    check(rank, "  k_cache[positions]", k_cache[0, :tokens], k)
    check(rank, "  v_cache[positions]", v_cache[0, :tokens], v)

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run_rank, args=(os.path.join(tmp, "rendezvous"),), nprocs=WORLD_SIZE)
    print("OK: every op matches its plain-PyTorch equivalent")
