"""Torch-native implementations of the ops, device-generic.

The math is tp_kernels.reference's; the communication is the TPGroup's backend chain. Registered for CPU
and for CUDA where no faster kernel exists: add_rmsnorm and qkv_rope / qkv_rope_kv_cache have C++ CPU
kernels (csrc/cpu/) and GPU kernels (CUDA, Triton), whose float64 CUDA calls come back to _qkv_rope
and _qkv_rope_kv_cache here; the overlapped GEMM + collective ops are in tp_kernels.ops.overlap_cpu and
overlap_cuda. When a fused CUDA kernel lands, its registration replaces the "cuda" entry here.
"""
import torch

from tp_kernels import reference
from tp_kernels._extension import _C
from tp_kernels.distributed import resolve
from tp_kernels.ops import checks

CPU_AND_CUDA = ("cpu", "cuda")


def _qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank, head_dim,
              rope_style):
    checks.check_qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank,
                          head_dim, rope_style)
    checks.check_positions(positions, cos_sin_cache if rope_style != "none" else None)
    return reference.qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank,
                              head_dim, rope_style)


def _qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin_cache, positions, cache_batch_index, k_cache, v_cache,
                       n_heads_per_rank, n_kv_heads_per_rank, head_dim, rope_style):
    checks.check_kv_cache(x, positions, cache_batch_index, k_cache, v_cache, n_kv_heads_per_rank, head_dim)
    q, k, v = _qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank, n_kv_heads_per_rank,
                        head_dim, rope_style)
    reference.write_kv_cache(k, v, positions, cache_batch_index, k_cache, v_cache)
    return q


def _all_reduce(x, group, backend="auto"):
    return resolve(group).all_reduce(x.contiguous(), backend)


def _all_reduce_inplace(x, group, backend="auto"):
    resolve(group).all_reduce(x, backend, out=x)


def _all_gather(x, group, dim):
    checks.check_all_gather(x, dim)
    return resolve(group).all_gather(x.contiguous(), dim % x.dim())


def _allreduce_residual_rmsnorm(x, residual, weight, eps, group):
    checks.check_add_rmsnorm(x, residual, weight, eps)
    # the group's backend for x fuses the residual add and the norm into its reduction when it can (shm)
    return resolve(group).allreduce_residual_rmsnorm(x.contiguous(), residual, weight, eps)


# register_kernel used as a decorator returns None, so register after definition.
# qkv_rope and qkv_rope_kv_cache are not registered here: on CPU they are C++ (csrc/cpu/qkv_rope.cpp,
# ~2.5x less time per decode call than _qkv_rope_kv_cache above), on CUDA the Triton kernel
# (tp_kernels.ops.triton_impls), which hands float64 calls to the two functions above.
torch.library.register_kernel("tp_kernels::all_gather", CPU_AND_CUDA, _all_gather)
# all_reduce, all_reduce_ and allreduce_residual_rmsnorm have C++ CPU kernels (csrc/cpu/shm_ops.cpp) that
# serve groups whose chain picks the shm communicator without a trip through Python, and call these for
# everything else.
torch.library.register_kernel("tp_kernels::all_reduce", "cuda", _all_reduce)
torch.library.register_kernel("tp_kernels::all_reduce_", "cuda", _all_reduce_inplace)
torch.library.register_kernel("tp_kernels::allreduce_residual_rmsnorm", "cuda", _allreduce_residual_rmsnorm)
_C.set_cpu_collective_fallbacks(_all_reduce, _all_reduce_inplace, _allreduce_residual_rmsnorm)
