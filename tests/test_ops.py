"""The op surface on CPU: opcheck, torch.compile, the CPU path against float64 references, bad input."""
import math

import pytest
import torch
from torch.library import opcheck

from conftest import assert_close, spawn_ranks
from tp_kernels import ops, reference
from tp_kernels.distributed import TPGroup

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv_args(n_tokens=5, hidden=16, n_heads=4, n_kv=2, head_dim=8, rotary_dim=8, dtype=torch.float32, bias=True):
    rows = (n_heads + 2 * n_kv) * head_dim
    return dict(x=torch.randn(n_tokens, hidden, dtype=dtype), w_qkv=torch.randn(rows, hidden, dtype=dtype),
                b_qkv=torch.randn(rows, dtype=dtype) if bias else None,
                cos_sin_cache=reference.rope_cos_sin_cache(64, rotary_dim),
                positions=torch.randint(0, 64, (n_tokens,)), n_heads_per_rank=n_heads, n_kv_heads_per_rank=n_kv,
                head_dim=head_dim)


# -- opcheck -------------------------------------------------------------------------------------------------
def _opcheck_cases(group: str):
    a = _qkv_args()
    qkv = (a["x"], a["w_qkv"], a["b_qkv"], a["cos_sin_cache"], a["positions"], 4, 2, 8)
    x, w, b = torch.randn(7, 16), torch.randn(5, 16), torch.randn(5)
    x_even = torch.randn(8, 16)  # gemm_reduce_scatter: M divisible by the world size
    caches = torch.zeros(3, 64, 2, 8), torch.zeros(3, 64, 2, 8)
    batch_index = torch.randint(0, 3, (5,))
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731  (exercises the autograd registration)
    return {
        "qkv_rope/neox": (torch.ops.tp_kernels.qkv_rope, qkv + ("neox",)),
        "qkv_rope/gptj": (torch.ops.tp_kernels.qkv_rope, qkv + ("gptj",)),
        "qkv_rope/none": (torch.ops.tp_kernels.qkv_rope, qkv[:3] + (None,) + qkv[4:] + ("none",)),
        "qkv_rope_kv_cache": (torch.ops.tp_kernels.qkv_rope_kv_cache,
                              qkv[:5] + (batch_index,) + caches + qkv[5:] + ("neox",)),
        "gemm_allreduce": (torch.ops.tp_kernels.gemm_allreduce, (x, w, b, group, 3)),
        "gemm_allreduce/nobias": (torch.ops.tp_kernels.gemm_allreduce, (x, w, None, group, None)),
        "gemm_allreduce/grad": (torch.ops.tp_kernels.gemm_allreduce, (grad(x), grad(w), grad(b), group, 2)),
        "gemm_reduce_scatter": (torch.ops.tp_kernels.gemm_reduce_scatter, (x_even, w, b, group, 2)),
        "gemm_reduce_scatter/grad": (torch.ops.tp_kernels.gemm_reduce_scatter, (grad(x_even), grad(w), None, group, 1)),
        "allgather_gemm": (torch.ops.tp_kernels.allgather_gemm, (x, w, b, group, 2)),
        "allgather_gemm/grad": (torch.ops.tp_kernels.allgather_gemm, (grad(x), grad(w), grad(b), group, None)),
        "all_reduce": (torch.ops.tp_kernels.all_reduce, (x, group, "auto")),
        "all_reduce/grad": (torch.ops.tp_kernels.all_reduce, (grad(x), group, "auto")),
        "all_reduce_": (torch.ops.tp_kernels.all_reduce_, (x.clone(), group, "auto")),
        "all_gather": (torch.ops.tp_kernels.all_gather, (x, group, 1)),
        "all_gather/grad": (torch.ops.tp_kernels.all_gather, (grad(x), group, 0)),
        "add_rmsnorm": (torch.ops.tp_kernels.add_rmsnorm, (x, torch.randn(7, 16), torch.randn(16), 1e-6)),
        "allreduce_residual_rmsnorm": (torch.ops.tp_kernels.allreduce_residual_rmsnorm,
                                       (x, torch.randn(7, 16), torch.randn(16), 1e-6, group)),
    }


def _opcheck_rank(tp):
    failures = {}
    for name, (op, args) in _opcheck_cases(tp.name).items():
        result = opcheck(op, args)
        bad = {k: v for k, v in result.items() if v != "SUCCESS"}
        if bad:
            failures[name] = bad
    return failures


def test_opcheck_every_op_single_rank():
    failures = _opcheck_rank(TPGroup.single())
    assert not failures, failures


def test_opcheck_every_op_two_ranks():
    assert spawn_ranks(2, _opcheck_rank) == [{}, {}]


def declared_ops():
    """Every op of the tp_kernels namespace the dispatcher knows (csrc/ops.cpp declares them all), whether or
    not Python has touched it yet (dir(torch.ops.tp_kernels) lists only those)."""
    return {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("tp_kernels::")}


def test_every_schema_has_a_case():
    declared = declared_ops()
    assert {"all_reduce", "all_reduce_", "gemm_reduce_scatter", "allgather_gemm", "qkv_rope"} <= declared
    covered = {name.split("/")[0] for name in _opcheck_cases("g")}
    assert declared <= covered, f"ops without an opcheck case: {sorted(declared - covered)}"


# -- torch.compile ---------------------------------------------------------------------------------------------
def _compiled_step(x, residual, w_qkv, cos_sin, positions, w_o, w_gate, norm_w, tp):
    q, k, v = ops.qkv_rope(x, w_qkv, None, cos_sin, positions, n_heads_per_rank=2, n_kv_heads_per_rank=1,
                           head_dim=8)
    attn = (q + k.repeat_interleave(2, dim=1) * v.repeat_interleave(2, dim=1)).flatten(1)  # (T, 16)
    partial = attn @ w_o.T
    h, residual = ops.allreduce_residual_rmsnorm(partial, residual, norm_w, 1e-6, tp)
    y = ops.gemm_allreduce(h, w_gate, None, tp)
    return ops.all_gather(ops.all_reduce(y, tp), tp, dim=-1), residual


def _compile_rank(tp, inputs):
    torch._dynamo.reset()
    eager = _compiled_step(*inputs, tp)
    # Compile afresh: inductor's on-disk caches are keyed by the graph's code, not by the schemas of the custom
    # ops in it, so a graph cached before a schema change (all_reduce's `algo` became `backend`) was replayed
    # with the old keyword and failed.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = torch.compile(_compiled_step, fullgraph=True, backend="inductor")(*inputs, tp)
    return eager, compiled


def _compile_inputs():
    return (torch.randn(6, 16), torch.randn(6, 16), torch.randn(32, 16), reference.rope_cos_sin_cache(32, 8),
            torch.arange(6), torch.randn(16, 16), torch.randn(8, 16), torch.randn(16))


@pytest.mark.parametrize("world_size", [1, 2])
def test_torch_compile_fullgraph(world_size):
    inputs = _compile_inputs()
    if world_size == 1:
        results = [_compile_rank(TPGroup.single(), inputs)]
    else:
        results = spawn_ranks(world_size, _compile_rank, inputs)
    for eager, compiled in results:
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


# -- qkv_rope --------------------------------------------------------------------------------------------------
def _rope_by_complex(t, positions, rotary_dim, theta, style):
    """Independent RoPE: feature pairs as complex numbers times exp(i * pos * f)."""
    half = rotary_dim // 2
    freqs = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    rot = torch.polar(torch.ones(len(positions), half, dtype=torch.float64),
                      positions.double()[:, None] * freqs)[:, None, :]  # (T, 1, half)
    r = t[..., :rotary_dim].double()
    if style == "neox":
        z = torch.complex(r[..., :half], r[..., half:]) * rot
        rotated = torch.cat([z.real, z.imag], dim=-1)
    else:
        z = torch.complex(r[..., 0::2], r[..., 1::2]) * rot
        rotated = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    return torch.cat([rotated, t[..., rotary_dim:].double()], dim=-1)


@pytest.mark.parametrize("rope_style", ["neox", "gptj", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_qkv_rope_matches_independent_math(rope_style, dtype, rotary_dim):
    a = _qkv_args(n_tokens=7, dtype=dtype, rotary_dim=rotary_dim)
    q, k, v = ops.qkv_rope(**a, rope_style=rope_style)
    qkv = a["x"].double() @ a["w_qkv"].double().T + a["b_qkv"].double()  # (T, 64)
    q_ref, k_ref, v_ref = qkv.split([32, 16, 16], dim=-1)
    q_ref, k_ref, v_ref = q_ref.view(7, 4, 8), k_ref.view(7, 2, 8), v_ref.view(7, 2, 8)
    if rope_style != "none":
        q_ref = _rope_by_complex(q_ref, a["positions"], rotary_dim, 10000.0, rope_style)
        k_ref = _rope_by_complex(k_ref, a["positions"], rotary_dim, 10000.0, rope_style)
    for name, got, want in (("q", q, q_ref), ("k", k, k_ref), ("v", v, v_ref)):
        assert got.dtype == dtype and got.is_contiguous()
        assert_close(got, want, dtype, reduction_len=16, msg=name)


def test_qkv_rope_kv_cache_writes_only_its_slots():
    a = _qkv_args(n_tokens=4)
    k_cache, v_cache = torch.full((3, 16, 2, 8), float("nan")), torch.full((3, 16, 2, 8), float("nan"))
    batch_index, positions = torch.tensor([0, 2, 2, 1]), torch.tensor([5, 0, 1, 15])
    a["positions"] = positions
    q = ops.qkv_rope_kv_cache(a["x"], a["w_qkv"], a["b_qkv"], a["cos_sin_cache"], positions, batch_index, k_cache,
                              v_cache, n_heads_per_rank=4, n_kv_heads_per_rank=2, head_dim=8)
    q_ref, k_ref, v_ref = ops.qkv_rope(**a)
    torch.testing.assert_close(q, q_ref, atol=0, rtol=0)
    torch.testing.assert_close(k_cache[batch_index, positions], k_ref, atol=0, rtol=0)
    torch.testing.assert_close(v_cache[batch_index, positions], v_ref, atol=0, rtol=0)
    written = torch.zeros(3, 16, dtype=torch.bool)
    written[batch_index, positions] = True
    assert torch.isnan(k_cache[~written]).all() and torch.isnan(v_cache[~written]).all()


# -- gemm_allreduce, allreduce_residual_rmsnorm at several world sizes ------------------------------------------
def _gemm_rank(tp, xs, ws, bias, chunk_options):
    return [ops.gemm_allreduce(xs[tp.rank], ws[tp.rank], bias, tp, chunks) for chunks in chunk_options]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_allreduce_matches_reference(world_size, dtype):
    m, n, k_per_rank = 13, 9, 8  # odd M and N
    xs = [torch.randn(m, k_per_rank, dtype=dtype) for _ in range(world_size)]
    ws = [torch.randn(n, k_per_rank, dtype=dtype) for _ in range(world_size)]
    chunk_options = [None, 1, 2, 3, 8, 20]  # 20 > M: at most M chunks
    for bias in (torch.randn(n, dtype=dtype), None):
        expected = reference.gemm_allreduce([x.double() for x in xs], [w.double() for w in ws],
                                            None if bias is None else bias.double())
        for rank, outs in enumerate(spawn_ranks(world_size, _gemm_rank, xs, ws, bias, chunk_options)):
            for chunks, y in zip(chunk_options, outs):
                assert_close(y, expected, dtype, reduction_len=k_per_rank * world_size,
                             msg=f"rank {rank} chunks={chunks} bias={bias is not None}")


def _fused_norm_rank(tp, xs, residual, weight):
    return ops.allreduce_residual_rmsnorm(xs[tp.rank], residual, weight, 1e-5, tp)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_residual_rmsnorm_matches_reference(world_size, dtype):
    xs = [torch.randn(3, 33, dtype=dtype) for _ in range(world_size)]
    residual, weight = torch.randn(3, 33, dtype=dtype), torch.randn(33, dtype=dtype)
    normed_ref, residual_ref = reference.allreduce_residual_rmsnorm([x.double() for x in xs], residual.double(),
                                                                    weight.double(), 1e-5)
    for normed, new_residual in spawn_ranks(world_size, _fused_norm_rank, xs, residual, weight):
        assert_close(new_residual, residual_ref, dtype, reduction_len=world_size + 1)
        assert_close(normed, normed_ref, dtype, reduction_len=33)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (5, 33), (2, 3, 7)])
def test_add_rmsnorm_kernel(dtype, shape):
    x, residual = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    weight = torch.randn(shape[-1], dtype=dtype)
    normed, new_residual = ops.add_rmsnorm(x, residual, weight, 1e-6)
    # the residual is rounded once to dtype; the norm is of that rounded value
    ref_residual = (x.double() + residual.double()).to(dtype)
    assert torch.equal(new_residual, ref_residual)
    h = ref_residual.double()
    ref_normed = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert_close(normed, ref_normed, dtype, reduction_len=1)


# -- bad input -------------------------------------------------------------------------------------------------
def test_qkv_rope_bad_input_names_the_argument():
    a = _qkv_args()
    cases = [
        (dict(x=a["x"][None]), r"x must be 2-D \(T, hidden\)"),
        (dict(w_qkv=a["w_qkv"][:-1]), r"w_qkv must be \(\(n_heads_per_rank \+ 2 \* n_kv_heads_per_rank\) \* head_dim"),
        (dict(w_qkv=a["w_qkv"].half()), "w_qkv must have the dtype of x"),
        (dict(b_qkv=a["b_qkv"][:-1]), r"b_qkv must be \(64,\)"),
        (dict(positions=a["positions"][:-1]), "positions must have one entry per token"),
        (dict(positions=a["positions"].float()), "positions must be int32 or int64"),
        (dict(cos_sin_cache=None), "cos_sin_cache is required for rope_style='neox'"),
        (dict(cos_sin_cache=reference.rope_cos_sin_cache(8, 16)), r"rotary_dim must be even and in \(0, head_dim=8\]"),
        (dict(n_kv_heads_per_rank=3, w_qkv=torch.randn(80, 16)), "must be a multiple of n_kv_heads_per_rank"),
        (dict(x=a["x"].int(), w_qkv=a["w_qkv"].int()), "x must have dtype in"),
    ]
    for override, pattern in cases:
        args = {**a, **override}
        with pytest.raises(ValueError, match=pattern):
            ops.qkv_rope(**args)
    with pytest.raises(ValueError, match="rope_style must be one of"):
        ops.qkv_rope(**a, rope_style="alibi")


def test_gemm_and_norm_bad_input_names_the_argument():
    tp = TPGroup.single()
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"w must be \(N, K=8\)"):
        ops.gemm_allreduce(x, torch.randn(3, 7), None, tp)
    with pytest.raises(ValueError, match=r"bias must be \(N,\) = \(3,\)"):
        ops.gemm_allreduce(x, w, torch.randn(4), tp)
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        ops.gemm_allreduce(x, w, None, tp, chunks=0)
    with pytest.raises(ValueError, match=r"x must be 2-D \(M, K\)"):
        ops.gemm_allreduce(x[None], w, None, tp)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.add_rmsnorm(x, torch.randn(4, 9), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match=r"weight must be \(hidden,\) = \(8,\)"):
        ops.allreduce_residual_rmsnorm(x, x, torch.randn(9), 1e-6, tp)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.add_rmsnorm(x, x, torch.randn(8), 0.0)
    with pytest.raises(TypeError, match="tp must be a TPGroup or a group name"):
        ops.all_reduce(x, 3)


def test_rope_cache_is_llama_rope():
    cache = reference.rope_cos_sin_cache(5, 4, theta=100.0, dtype=torch.float64)
    assert cache.shape == (5, 4)
    assert cache[3, 1].item() == pytest.approx(math.cos(3 * 100.0 ** (-2 / 4)))
    assert cache[3, 3].item() == pytest.approx(math.sin(3 * 100.0 ** (-2 / 4)))
