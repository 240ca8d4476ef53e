"""Fake (meta) implementations: output shapes, dtypes and devices without computing, so torch.compile and
torch.export can trace through the ops. Each runs the same argument checks as the real kernels."""
import torch

from tp_kernels.ops import checks


@torch.library.register_fake("tp_kernels::qkv_rope")
def _qkv_rope_fake(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank, head_dim,
                   rope_style):
    checks.check_qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank,
                          head_dim, rope_style)
    n_tokens = x.shape[0]
    q = x.new_empty((n_tokens, n_heads_per_rank, head_dim))
    k = x.new_empty((n_tokens, n_kv_heads_per_rank, head_dim))
    return q, k, torch.empty_like(k)


@torch.library.register_fake("tp_kernels::qkv_rope_kv_cache")
def _qkv_rope_kv_cache_fake(x, w_qkv, b_qkv, cos_sin_cache, positions, cache_batch_index, k_cache, v_cache,
                            n_heads_per_rank, n_kv_heads_per_rank, head_dim, rope_style):
    checks.check_qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank,
                          head_dim, rope_style)
    checks.check_kv_cache(x, positions, cache_batch_index, k_cache, v_cache, n_kv_heads_per_rank, head_dim)
    return x.new_empty((x.shape[0], n_heads_per_rank, head_dim))


@torch.library.register_fake("tp_kernels::gemm_allreduce")
def _gemm_allreduce_fake(x, w, bias, group, chunks=None):
    checks.check_gemm(x, w, bias, chunks)
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.register_fake("tp_kernels::gemm_reduce_scatter")
def _gemm_reduce_scatter_fake(x, w, bias, group, chunks=None):
    from tp_kernels.distributed import resolve

    world_size = resolve(group).world_size
    checks.check_gemm_reduce_scatter(x, w, bias, chunks, world_size)
    return x.new_empty((x.shape[0] // world_size, w.shape[0]))


@torch.library.register_fake("tp_kernels::allgather_gemm")
def _allgather_gemm_fake(x, w, bias, group, chunks=None):
    from tp_kernels.distributed import resolve

    checks.check_gemm(x, w, bias, chunks)
    return x.new_empty((resolve(group).world_size * x.shape[0], w.shape[0]))


@torch.library.register_fake("tp_kernels::all_reduce")
def _all_reduce_fake(x, group, backend="auto"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("tp_kernels::all_reduce_")
def _all_reduce_inplace_fake(x, group, backend="auto"):
    return None


@torch.library.register_fake("tp_kernels::all_gather")
def _all_gather_fake(x, group, dim):
    from tp_kernels.distributed import resolve

    checks.check_all_gather(x, dim)
    shape = list(x.shape)
    shape[dim] *= resolve(group).world_size
    return x.new_empty(shape)


@torch.library.register_fake("tp_kernels::add_rmsnorm")
def _add_rmsnorm_fake(x, residual, weight, eps):
    checks.check_add_rmsnorm(x, residual, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format)


@torch.library.register_fake("tp_kernels::allreduce_residual_rmsnorm")
def _allreduce_residual_rmsnorm_fake(x, residual, weight, eps, group):
    return _add_rmsnorm_fake(x, residual, weight, eps)
