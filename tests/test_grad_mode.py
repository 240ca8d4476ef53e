"""Grad mode and backward (issue 12).

- Forward with grad mode on works every time: the drop-in layers' parity at TP=2 with weights that require
  grad, 50 times over, under each backend (the ParallelLMHead gather over gloo failed in 2 calls of 3 with
  "A view was created in no_grad mode and is being modified inplace"), and each collective op once with
  grad mode on and once off.
- The ops the layers use are differentiable: torch.autograd.gradcheck in float64 at TP=2 of the whole
  group's function (see `_global`), which checks the formulas of tp_kernels.ops.autograd.
- The inference ops raise naming the op when backward reaches them; an op that writes into an argument
  that requires grad raises at the call.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from conftest import assert_close, spawn_ranks
from tp_kernels import layers, ops, reference
from tp_kernels.distributed import TPGroup

BACKENDS = ["shm", "torch"]


# -- the layers, 50 times with grad mode on -------------------------------------------------------------------
def _layers_rank(tp, mods, x, ids, repeats, backend):
    row_lin, col_lin, emb, head_lin = mods
    row = layers.RowParallelLinear.from_linear(row_lin, tp)
    col = layers.ColumnParallelLinear.from_linear(col_lin, tp, gather_output=True)
    embedding = layers.VocabParallelEmbedding.from_embedding(emb, tp)
    head = layers.ParallelLMHead.from_linear(head_lin, tp)
    assert all(p.requires_grad for m in (row, col, embedding, head) for p in m.parameters())
    x_r = x.chunk(tp.world_size, dim=-1)[tp.rank]
    first, same = None, True
    with torch.enable_grad(), tp.use_backend(backend):
        for _ in range(repeats):
            ys = (row(x_r), col(x), embedding(ids), head(x))
            assert all(y.requires_grad for y in ys)
            ys = [y.detach() for y in ys]
            first = first or ys
            same = same and all(torch.equal(a, b) for a, b in zip(first, ys))
    return first, same


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_in_grad_mode_50_times(backend):
    dim, vocab = 16, 1001  # the odd vocabulary: the gathered logits are cut from padding
    mods = (nn.Linear(dim, 12), nn.Linear(dim, 10), nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False))
    x, ids = torch.randn(3, 5, dim), torch.randint(0, vocab, (3, 5))
    with torch.no_grad():
        expected = (mods[0].double()(x.double()), mods[1].double()(x.double()), mods[2].double()(ids),
                    mods[3].double()(x.double()))
    mods = tuple(m.float() for m in mods)
    for rank, (ys, same) in enumerate(spawn_ranks(2, _layers_rank, mods, x, ids, 50, backend)):
        assert same, f"rank {rank}: the 50 calls did not all give the same outputs"
        for name, y, want in zip(("row", "column", "embedding", "lm head"), ys, expected):
            assert_close(y, want, torch.float32, reduction_len=dim, msg=f"{name} rank {rank} ({backend})")


# -- every collective op, grad mode on and off -----------------------------------------------------------------
def _collectives_rank(tp, xs, ws, bias, backend):
    x, w = xs[tp.rank], ws[tp.rank]
    residual, norm_w = torch.ones(4, 6), torch.full((6,), 0.5)
    out = {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad), tp.use_backend(backend):
            xg, wg = x.clone().requires_grad_(grad), w.clone().requires_grad_(grad)
            results = {
                "all_reduce": ops.all_reduce(xg, tp),
                "all_reduce_": ops.all_reduce_(x.clone(), tp),
                "all_gather": ops.all_gather(xg, tp, dim=-1),
                "allreduce_residual_rmsnorm": ops.allreduce_residual_rmsnorm(xg, residual, norm_w, 1e-6, tp)[0],
                "gemm_allreduce": ops.gemm_allreduce(xg, wg, bias, tp, 2),
                "gemm_reduce_scatter": ops.gemm_reduce_scatter(xg, wg, bias, tp, 2),
                "allgather_gemm": ops.allgather_gemm(xg, wg, bias, tp, 2),
            }
        for name, y in results.items():
            assert y.requires_grad == (grad and name != "all_reduce_"), (name, grad)
            out[name, grad] = y.detach()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_collective_with_grad_mode_on_and_off(backend):
    xs = [torch.randn(4, 6) for _ in range(2)]
    ws = [torch.randn(5, 6) for _ in range(2)]
    bias = torch.randn(5)
    x64, w64, b64 = [x.double() for x in xs], [w.double() for w in ws], bias.double()
    total = reference.all_reduce(x64)
    for rank, out in enumerate(spawn_ranks(2, _collectives_rank, xs, ws, bias, backend)):
        expected = {
            "all_reduce": total, "all_reduce_": total, "all_gather": torch.cat(x64, dim=-1),
            "allreduce_residual_rmsnorm": reference.add_rmsnorm(total, torch.ones(4, 6, dtype=torch.float64),
                                                                torch.full((6,), 0.5, dtype=torch.float64), 1e-6)[0],
            "gemm_allreduce": reference.gemm_allreduce(x64, w64, b64),
            "gemm_reduce_scatter": reference.gemm_reduce_scatter(x64, w64, b64)[rank],
            "allgather_gemm": reference.allgather_gemm(x64, w64[rank], b64),
        }
        for (name, grad), y in out.items():
            assert_close(y, expected[name], torch.float32, reduction_len=12, msg=f"{name} grad={grad} rank {rank}")


# -- backward: gradcheck of the group's function ------------------------------------------------------------------
class _Replicate(torch.autograd.Function):
    """The entry of `_global`: the full inputs, the same on every rank, reach each rank unchanged; the
    gradient of each is summed over the ranks (plain dist.all_reduce), so every rank holds the gradient of
    the group's function with respect to every rank's input."""

    @staticmethod
    def forward(ctx, full, group):
        ctx.group = group
        return full.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherOutputs(torch.autograd.Function):
    """The exit of `_global`: every rank's output stacked (plain dist.all_gather), the same on every rank;
    rank r's output gets the gradient of its own block, counted once."""

    @staticmethod
    def forward(ctx, y, group, rank, world_size):
        ctx.rank = rank
        parts = [torch.empty_like(y) for _ in range(world_size)]
        dist.all_gather(parts, y.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None, None, None


def _global(tp, op, *fulls):
    """The group's function as one function of every rank's inputs: fulls[i][r] is rank r's i-th input;
    returns every rank's output stacked. Each rank computes it with the same arguments, so gradcheck,
    which perturbs one element at a time, sees on every rank the Jacobian of the whole group."""
    mine = [None if f is None else _Replicate.apply(f, tp.process_group)[tp.rank] for f in fulls]
    return _GatherOutputs.apply(op(tp, *mine), tp.process_group, tp.rank, tp.world_size)


OPS = {
    "all_reduce": lambda tp, x: ops.all_reduce(x, tp),
    "all_gather/dim0": lambda tp, x: ops.all_gather(x, tp, dim=0),
    "all_gather/dim-1": lambda tp, x: ops.all_gather(x, tp, dim=-1),
    "gemm_allreduce": lambda tp, x, w, b: ops.gemm_allreduce(x, w, b, tp, 2),
    "gemm_allreduce/nobias": lambda tp, x, w: ops.gemm_allreduce(x, w, None, tp, 1),
    "gemm_reduce_scatter": lambda tp, x, w, b: ops.gemm_reduce_scatter(x, w, b, tp, 2),
    "allgather_gemm": lambda tp, x, w, b: ops.allgather_gemm(x, w, b, tp, 2),
}


def _gradcheck_rank(tp, name, fulls):
    fulls = [f.clone().requires_grad_() for f in fulls]
    with torch.enable_grad():
        return torch.autograd.gradcheck(lambda *a: _global(tp, OPS[name], *a), fulls, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(OPS))
def test_backward_gradcheck_float64_two_ranks(name):
    p, rows, n, k = 2, 4, 3, 5
    x, w, b = torch.randn(p, rows, k, dtype=torch.float64), torch.randn(p, n, k, dtype=torch.float64), torch.randn(
        p, n, dtype=torch.float64)
    fulls = {"all_reduce": [x], "all_gather/dim0": [x], "all_gather/dim-1": [x], "gemm_allreduce/nobias": [x, w]}
    assert spawn_ranks(p, _gradcheck_rank, name, fulls.get(name, [x, w, b])) == [True, True]


def _sum_semantics_rank(tp, xs):
    """all_reduce's gradient is the gradient summed over the ranks: rank r's loss is (r + 1) * sum(y)."""
    x = xs[tp.rank].clone().requires_grad_()
    with torch.enable_grad():
        ((tp.rank + 1) * ops.all_reduce(x, tp).sum()).backward()
    return x.grad


def test_all_reduce_gradient_is_the_summed_gradient():
    xs = [torch.randn(3), torch.randn(3)]
    for grad in spawn_ranks(2, _sum_semantics_rank, xs):
        assert torch.equal(grad, torch.full((3,), 3.0))  # 1 + 2


# -- inference ops: backward raises naming the op --------------------------------------------------------------
def test_inference_ops_raise_naming_the_op_on_backward():
    tp = TPGroup.single()
    x = torch.randn(5, 16, requires_grad=True)
    w_qkv = torch.randn(64, 16, requires_grad=True)
    positions = torch.arange(5)
    cos_sin = reference.rope_cos_sin_cache(16, 8)
    weight = torch.randn(16, requires_grad=True)
    caches = torch.zeros(1, 16, 2, 8), torch.zeros(1, 16, 2, 8)
    outputs = {
        "qkv_rope": ops.qkv_rope(x, w_qkv, None, cos_sin, positions, n_heads_per_rank=4, n_kv_heads_per_rank=2,
                                 head_dim=8)[0],
        "qkv_rope_kv_cache": ops.qkv_rope_kv_cache(x, w_qkv, None, cos_sin, positions, torch.zeros(5, dtype=torch.long),
                                                   *caches, n_heads_per_rank=4, n_kv_heads_per_rank=2, head_dim=8),
        "add_rmsnorm": ops.add_rmsnorm(x, torch.zeros(5, 16), weight, 1e-6)[0],
        "allreduce_residual_rmsnorm": ops.allreduce_residual_rmsnorm(x, torch.zeros(5, 16), weight, 1e-6, tp)[0],
    }
    for name, y in outputs.items():
        assert y.requires_grad, name
        with pytest.raises(RuntimeError, match=f"tp_kernels::{name} has no backward: it is an inference op"):
            y.sum().backward()
    with pytest.raises(RuntimeError, match="tp_kernels::all_reduce_ writes into its argument 'x', which requires "
                                           "grad.*tp_kernels.ops.all_reduce is the differentiable"):
        ops.all_reduce_(torch.randn(3, requires_grad=True) * 2, tp)
    with torch.no_grad():  # what the decoder does: no graph, no error
        ops.all_reduce_(torch.randn(3, requires_grad=True) * 2, tp)


def test_a_cache_write_bumps_the_version_a_saved_graph_checks():
    """qkv_rope_kv_cache writes the caches in place: a graph that saved the cache must notice."""
    k_cache, v_cache = torch.zeros(1, 16, 2, 8), torch.zeros(1, 16, 2, 8)
    scale = torch.ones(1, requires_grad=True)
    y = (k_cache * scale).sum() + (k_cache * scale * scale).sum()  # saves k_cache for backward
    x = torch.randn(5, 16)
    ops.qkv_rope_kv_cache(x, torch.randn(64, 16), None, reference.rope_cos_sin_cache(16, 8), torch.arange(5),
                          torch.zeros(5, dtype=torch.long), k_cache, v_cache, n_heads_per_rank=4,
                          n_kv_heads_per_rank=2, head_dim=8)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
