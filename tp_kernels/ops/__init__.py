"""The tp_kernels operators: typed Python wrappers over torch.ops.tp_kernels.*.

Every op is declared once in csrc/ops.cpp, has a fake implementation (tp_kernels.ops.fake) so it traces
under torch.compile, device implementations (tp_kernels.ops.native for the torch-native path, csrc/ and
tp_kernels.kernels for the fused ones) and a reference in tp_kernels.reference. Collectives take a TPGroup
(or its name); the op itself receives the name.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from tp_kernels._extension import _C, require_extension
from tp_kernels.distributed import TPGroup

if _C is not None:
    from tp_kernels.ops import autograd as _autograd  # noqa: F401  (the backward formulas)
    from tp_kernels.ops import fake as _fake  # noqa: F401  (registers fake impls)
    from tp_kernels.ops import native as _native  # noqa: F401  (registers torch-native impls)
    from tp_kernels.ops import overlap_cpu as _overlap_cpu  # noqa: F401  (registers the overlapped GEMM + collectives)
    from tp_kernels.ops import overlap_cuda as _overlap_cuda  # noqa: F401  (their CUDA pipelines)

GroupLike = Union[TPGroup, str]

__all__ = ["qkv_rope", "qkv_rope_kv_cache", "gemm_allreduce", "gemm_reduce_scatter", "allgather_gemm", "all_reduce",
           "all_reduce_", "all_gather", "add_rmsnorm", "allreduce_residual_rmsnorm"]


def _group_name(tp: GroupLike) -> str:
    if isinstance(tp, TPGroup):
        return tp.name
    if isinstance(tp, str):
        return tp
    raise TypeError(f"tp must be a TPGroup or a group name, got {type(tp).__name__}")


def qkv_rope(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: Optional[torch.Tensor],
             cos_sin_cache: Optional[torch.Tensor], positions: torch.Tensor, *, n_heads_per_rank: int,
             n_kv_heads_per_rank: int, head_dim: int,
             rope_style: str = "neox") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's fused QKV projection, bias, rotary embedding and split into heads.

    Plain PyTorch equivalent (x (T, hidden), w_qkv rows [q heads | k heads | v heads] of this rank)::

        qkv = x @ w_qkv.T + b_qkv
        q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        q = q.view(T, n_q, head_dim); k = k.view(T, n_kv, head_dim); v = v.view(T, n_kv, head_dim)
        cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
        q, k = rope(q, cos, sin, rope_style), rope(k, cos, sin, rope_style)

    with n_q = n_heads_per_rank, n_kv = n_kv_heads_per_rank; rope_style "neox" rotates the two halves of
    the first rotary_dim features, "gptj" adjacent pairs, "none" skips it (cos_sin_cache may be None).
    Returns q (T, n_q, head_dim), k and v (T, n_kv, head_dim), contiguous, in x's dtype. A position of -1
    marks a padding token and is rotated as position 0 (tp_kernels.reference.SKIP_POSITION).
    """
    require_extension()
    return torch.ops.tp_kernels.qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank,
                                         n_kv_heads_per_rank, head_dim, rope_style)


def qkv_rope_kv_cache(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: Optional[torch.Tensor],
                      cos_sin_cache: Optional[torch.Tensor], positions: torch.Tensor,
                      cache_batch_index: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                      n_heads_per_rank: int, n_kv_heads_per_rank: int, head_dim: int,
                      rope_style: str = "neox") -> torch.Tensor:
    """qkv_rope, with k and v written into the caches instead of returned; returns q.

    Plain PyTorch equivalent::

        q, k, v = qkv_rope(x, w_qkv, b_qkv, cos_sin_cache, positions, ...)
        k_cache[cache_batch_index, positions] = k   # caches: (batch, max_seq, n_kv, head_dim)
        v_cache[cache_batch_index, positions] = v
        return q

    except that a token at position -1 (a padding token of a CUDA-graph batch) writes nothing to the
    caches. Other indices outside the caches raise on CPU; on a GPU, where a check would cost a device
    sync per call, their k and v are written nowhere (tp_kernels.reference.SKIP_POSITION).
    """
    require_extension()
    return torch.ops.tp_kernels.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin_cache, positions, cache_batch_index,
                                                  k_cache, v_cache, n_heads_per_rank, n_kv_heads_per_rank,
                                                  head_dim, rope_style)


def gemm_allreduce(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], tp: GroupLike,
                   chunks: Optional[int] = None) -> torch.Tensor:
    """Row-parallel linear: the GEMM of this rank's input slice, summed over the group, plus bias once.

    Plain PyTorch equivalent (x (M, K_per_rank), w (N, K_per_rank), bias (N,) the same on every rank)::

        y = x @ w.T
        torch.distributed.all_reduce(y, group=tp.process_group)
        y = y + bias

    M is processed in `chunks` pieces so the reduction of one overlaps the GEMM of the next (CPU: on a
    communication thread; CUDA: on a communication stream); chunks=None lets the cost model
    (tp_kernels.perf.cost_model.best_chunks) choose, 1 for decode-sized M, with the GPU's datasheet entry on
    CUDA and on CPU only after tp_kernels.calibrate(tp) (else 1 chunk). The result equals the unchunked one
    up to the order of floating-point sums. On CUDA, for a group with symmetric buffers
    (tp_kernels.comm.symmetric.SymmetricBuffer.create(tp, device=...)) and chunks=None, the fused kernel
    (tp_kernels.kernels.gemm_collective: the reduction inside the GEMM, tile by tile) runs instead wherever
    the cost model prefers it (tp_kernels.ops.gemm_collective_path); the same holds for the two ops below.
    Backward: see tp_kernels.ops.autograd.
    """
    require_extension()
    return torch.ops.tp_kernels.gemm_allreduce(x, w, bias, _group_name(tp), chunks)


def gemm_reduce_scatter(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], tp: GroupLike,
                        chunks: Optional[int] = None) -> torch.Tensor:
    """Sequence-parallel row-parallel linear: the summed GEMM, scattered along tokens, plus bias once.

    Plain PyTorch equivalent (x (M, K_per_rank), w (N, K_per_rank), bias (N,); M divisible by p)::

        y = x @ w.T                                              # (M, N) partial sums
        out = torch.empty(M // p, N, dtype=x.dtype)
        torch.distributed.reduce_scatter_tensor(out, y, group=tp.process_group)
        out = out + bias                                         # rank r: rows [r M/p, (r+1) M/p)

    M not divisible by the world size raises ValueError (pad the tokens). Chunked like gemm_allreduce:
    rows [start, stop) of every rank's block are one chunk, so each chunk's reduction serves every rank.
    """
    require_extension()
    return torch.ops.tp_kernels.gemm_reduce_scatter(x, w, bias, _group_name(tp), chunks)


def allgather_gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], tp: GroupLike,
                   chunks: Optional[int] = None) -> torch.Tensor:
    """Sequence-parallel column-parallel linear: every rank's token rows gathered, times this rank's
    weight shard, plus its bias shard.

    Plain PyTorch equivalent (x (M_per_rank, K), the same M_per_rank on every rank; w (N_per_rank, K))::

        full = torch.empty(p * M_per_rank, K, dtype=x.dtype)
        torch.distributed.all_gather_into_tensor(full, x, group=tp.process_group)  # rank 0's rows first
        y = full @ w.T + bias                                                        # (M, N_per_rank)

    Chunked along M_per_rank: chunk i+1 is gathered while chunk i's GEMM runs.
    """
    require_extension()
    return torch.ops.tp_kernels.allgather_gemm(x, w, bias, _group_name(tp), chunks)


def all_reduce(x: torch.Tensor, tp: GroupLike, backend: str = "auto") -> torch.Tensor:
    """The sum of x over the ranks of tp, as a new tensor (x is not modified).

    Plain PyTorch equivalent::

        y = x.clone(); torch.distributed.all_reduce(y, group=tp.process_group)

    backend="auto" takes the first backend of the group's chain that applies (inside
    `tp.use_backend(name)`: that backend); a backend name ("shm", "torch", "ipc") asks for that one and
    raises if it is not in the chain or cannot serve x. fp16 and bf16 are accumulated in fp32; every rank
    gets the same bits.
    """
    require_extension()
    return torch.ops.tp_kernels.all_reduce(x, _group_name(tp), backend)


def all_reduce_(x: torch.Tensor, tp: GroupLike, backend: str = "auto") -> torch.Tensor:
    """all_reduce in place: x becomes the sum over the ranks of tp; returns x. For partial sums that are
    dead afterwards, it saves the new output's allocation and first touch (bench/all_reduce.py).

    Plain PyTorch equivalent::

        torch.distributed.all_reduce(x, group=tp.process_group)

    Inference only: x must not require grad in grad mode (that raises; all_reduce is the differentiable
    one). backend as for all_reduce.
    """
    require_extension()
    torch.ops.tp_kernels.all_reduce_(x, _group_name(tp), backend)
    return x


def all_gather(x: torch.Tensor, tp: GroupLike, dim: int = -1) -> torch.Tensor:
    """Every rank's x concatenated along dim, rank 0 first.

    Plain PyTorch equivalent::

        parts = [torch.empty_like(x) for _ in range(tp.world_size)]
        torch.distributed.all_gather(parts, x, group=tp.process_group); y = torch.cat(parts, dim)
    """
    require_extension()
    return torch.ops.tp_kernels.all_gather(x, _group_name(tp), dim)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm, one pass over the data; returns (normed, new_residual).

    Plain PyTorch equivalent::

        new_residual = x + residual
        h = new_residual.float()
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    """
    require_extension()
    return torch.ops.tp_kernels.add_rmsnorm(x, residual, weight, eps)


def allreduce_residual_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                               tp: GroupLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reduction of a row-parallel layer's partial output fused with the residual add and the next
    RMSNorm; returns (normed, new_residual).

    Plain PyTorch equivalent::

        torch.distributed.all_reduce(x, group=tp.process_group)
        normed, new_residual = add_rmsnorm(x, residual, weight, eps)
    """
    require_extension()
    return torch.ops.tp_kernels.allreduce_residual_rmsnorm(x, residual, weight, eps, _group_name(tp))


# The CUDA implementations of qkv_rope and qkv_rope_kv_cache are Triton kernels, registered only when
# triton imports (the CPU-only torch comes without it).
if _C is not None:
    try:
        import triton  # noqa: F401
    except ImportError as _triton_error:
        if torch.version.cuda is not None:  # a CUDA torch without triton: qkv_rope has no CUDA kernel
            import warnings

            warnings.warn(f"triton could not be imported ({_triton_error}); tp_kernels.ops.qkv_rope and "
                          "qkv_rope_kv_cache will have no CUDA implementation and the GEMMs of gemm_allreduce and its "
                          "sequence-parallel pair use torch.matmul", RuntimeWarning, stacklevel=2)
    else:
        from tp_kernels.ops import triton_impls as _triton_impls  # noqa: F401  (registers the CUDA kernels)
