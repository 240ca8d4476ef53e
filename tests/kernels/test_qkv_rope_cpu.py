"""The C++ CPU kernels of qkv_rope / qkv_rope_kv_cache (csrc/cpu/qkv_rope.cpp) against the float64
reference (tp_kernels.reference.qkv_rope / write_kv_cache), and their argument checks against the Python
ones the fake implementation runs (tp_kernels.ops.checks): same exception type, same message.
test_ops.py holds the opcheck cases and an independent RoPE check; test_skip_position.py the -1 contract."""
import pytest
import torch

from conftest import assert_close
from tp_kernels import reference
from tp_kernels._extension import _C

pytestmark = pytest.mark.skipif(_C is None, reason="tp_kernels._C (the CPU kernels) is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _op(name):
    import tp_kernels.ops  # noqa: F401  (fake implementations, so the dispatcher knows the whole op)

    return getattr(torch.ops.tp_kernels, name).default


def _inputs(dtype, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, bias, max_position=64, hidden=48):
    rows = (n_heads + 2 * n_kv_heads) * head_dim
    x = torch.randn(n_tokens, hidden, dtype=dtype)
    w_qkv = (torch.randn(rows, hidden) / hidden ** 0.5).to(dtype)
    b_qkv = torch.randn(rows, dtype=dtype) if bias else None
    cos_sin = reference.rope_cos_sin_cache(max_position, rotary_dim) if rotary_dim else None
    positions = torch.randint(0, max_position, (n_tokens,))
    return x, w_qkv, b_qkv, cos_sin, positions


def _expected(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, rope_style):
    return reference.qkv_rope(x.double(), w_qkv.double(), None if b_qkv is None else b_qkv.double(),
                              None if cos_sin is None else cos_sin.double(), positions, n_heads, n_kv_heads,
                              head_dim, rope_style)


# (rope_style, head_dim, rotary_dim): partial rotation leaves features past rotary_dim as they are
SHAPES = [("neox", 16, 16), ("neox", 16, 8), ("gptj", 16, 16), ("gptj", 12, 4), ("none", 16, None)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_style, head_dim, rotary_dim", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_qkv_rope_matches_the_float64_reference(dtype, rope_style, head_dim, rotary_dim, bias):
    n_heads, n_kv_heads = 4, 2
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(dtype, 5, n_heads, n_kv_heads, head_dim, rotary_dim, bias)
    q, k, v = _op("qkv_rope")(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, rope_style)
    expected = _expected(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, rope_style)
    for name, got, want in zip("qkv", (q, k, v), expected):
        assert got.dtype == dtype and got.is_contiguous(), name
        assert_close(got, want, dtype, reduction_len=x.shape[1], msg=name)


def test_strided_inputs_int32_positions_and_a_16bit_table():
    """x a column slice, w_qkv a transposed view, positions int32, cos_sin bf16 for fp32 x (gathered and
    converted per token, as the reference's .to(float32) does)."""
    n_heads, n_kv_heads, head_dim = 2, 1, 16
    x_wide = torch.randn(3, 96)
    x = x_wide[:, 8:56]  # (3, 48), row stride 96
    w_qkv = torch.randn(48, (n_heads + 2 * n_kv_heads) * head_dim).t() / 48 ** 0.5  # (64, 48), column-major
    cos_sin = reference.rope_cos_sin_cache(32, head_dim, dtype=torch.bfloat16)
    positions = torch.tensor([31, 0, 7], dtype=torch.int32)
    q, k, v = _op("qkv_rope")(x, w_qkv, None, cos_sin, positions, n_heads, n_kv_heads, head_dim, "neox")
    expected = _expected(x, w_qkv, None, cos_sin, positions.long(), n_heads, n_kv_heads, head_dim, "neox")
    for name, got, want in zip("qkv", (q, k, v), expected):
        assert_close(got, want, torch.float32, reduction_len=48, msg=name)


def test_many_tokens_split_across_threads():
    """Prefill-sized T: the tokens are split over threads (a grain of 32768 outputs / 64 per token = 512)."""
    n_heads, n_kv_heads, head_dim = 2, 1, 16
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(torch.float32, 1500, n_heads, n_kv_heads, head_dim, head_dim,
                                                  True, max_position=2048)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = _op("qkv_rope")(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, "gptj")
    finally:
        torch.set_num_threads(threads)
    expected = _expected(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, "gptj")
    for name, got, want in zip("qkv", (q, k, v), expected):
        assert_close(got, want, torch.float32, reduction_len=x.shape[1], msg=name)


def test_empty_batch():
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(torch.float32, 0, 2, 1, 16, 16, True)
    q, k, v = _op("qkv_rope")(x, w_qkv, b_qkv, cos_sin, positions, 2, 1, 16, "neox")
    assert q.shape == (0, 2, 16) and k.shape == (0, 1, 16) and v.shape == (0, 1, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "heads_outer"])
def test_kv_cache_variant_writes_exactly_its_slots(dtype, layout):
    """k and v land at [cache_batch_index[t], positions[t]] of caches in any layout (heads_outer: a
    (batch, heads, seq, dim) buffer seen as (batch, seq, heads, dim)), a -1 token writes nothing and is
    rotated as position 0, and every other slot keeps its NaN poison."""
    n_heads, n_kv_heads, head_dim, batch, max_seq = 4, 2, 16, 3, 10
    x, w_qkv, b_qkv, _, _ = _inputs(dtype, 5, n_heads, n_kv_heads, head_dim, head_dim, True)
    cos_sin = reference.rope_cos_sin_cache(max_seq, head_dim)
    positions, batch_index = torch.tensor([4, -1, 0, 9, 4]), torch.tensor([0, 7, 2, 2, 1])
    if layout == "contiguous":
        caches = [torch.full((batch, max_seq, n_kv_heads, head_dim), float("nan"), dtype=dtype) for _ in range(2)]
    else:
        caches = [torch.full((batch, n_kv_heads, max_seq, head_dim), float("nan"), dtype=dtype).transpose(1, 2)
                  for _ in range(2)]
    q = _op("qkv_rope_kv_cache")(x, w_qkv, b_qkv, cos_sin, positions, batch_index, *caches, n_heads, n_kv_heads,
                                 head_dim, "neox")
    q_ref, k_ref, v_ref = _expected(x, w_qkv, b_qkv, cos_sin, positions.clamp(min=0), n_heads, n_kv_heads,
                                    head_dim, "neox")
    assert_close(q, q_ref, dtype, reduction_len=x.shape[1], msg="q")
    written = positions != reference.SKIP_POSITION
    for cache, ref in zip(caches, (k_ref, v_ref)):
        assert_close(cache[batch_index[written], positions[written]], ref[written], dtype,
                     reduction_len=x.shape[1])
        slots = torch.zeros(batch, max_seq, dtype=torch.bool)
        slots[batch_index[written], positions[written]] = True
        assert torch.isnan(cache[~slots]).all(), "a cache slot outside the tokens' was written"
    # the two ops give the same bits
    q_alone = _op("qkv_rope")(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, "neox")[0]
    assert torch.equal(q, q_alone)


# -- the checks: the C++ kernel raises what tp_kernels.ops.checks (the fake implementation) raises -----------
def _qkv_kwargs():
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(torch.float32, 5, 4, 2, 8, 8, True, hidden=16)
    return dict(x=x, w_qkv=w_qkv, b_qkv=b_qkv, cos_sin_cache=cos_sin, positions=positions, n_heads_per_rank=4,
                n_kv_heads_per_rank=2, head_dim=8, rope_style="neox")


def _cache_kwargs():
    return dict(cache_batch_index=torch.zeros(5, dtype=torch.long), k_cache=torch.zeros(3, 64, 2, 8),
                v_cache=torch.zeros(3, 64, 2, 8))


BAD_QKV = {
    "x 3-D": dict(x=torch.randn(1, 5, 16)),
    "x int": dict(x=torch.ones(5, 16, dtype=torch.int32), w_qkv=torch.ones(64, 16, dtype=torch.int32)),
    "w_qkv dtype": dict(w_qkv=torch.randn(64, 16, dtype=torch.float16)),
    "w_qkv rows": dict(w_qkv=torch.randn(63, 16)),
    "w_qkv 1-D": dict(w_qkv=torch.randn(64)),
    "heads < 1": dict(n_kv_heads_per_rank=0),
    "heads not a multiple": dict(n_kv_heads_per_rank=3, w_qkv=torch.randn(80, 16)),
    "b_qkv dtype": dict(b_qkv=torch.randn(64, dtype=torch.float64)),
    "b_qkv shape": dict(b_qkv=torch.randn(63)),
    "rope_style": dict(rope_style="alibi"),
    "positions 2-D": dict(positions=torch.zeros(5, 1, dtype=torch.long)),
    "positions count": dict(positions=torch.zeros(4, dtype=torch.long)),
    "positions float": dict(positions=torch.zeros(5)),
    "no table": dict(cos_sin_cache=None),
    "table 1-D": dict(cos_sin_cache=torch.randn(64)),
    "rotary_dim odd": dict(cos_sin_cache=torch.randn(64, 7)),
    "rotary_dim > head_dim": dict(cos_sin_cache=torch.randn(64, 16)),
    "integer table": dict(cos_sin_cache=torch.arange(64 * 8).reshape(64, 8)),
}
BAD_CACHE = {
    "cache_batch_index 2-D": dict(cache_batch_index=torch.zeros(5, 1, dtype=torch.long)),
    "cache_batch_index count": dict(cache_batch_index=torch.zeros(4, dtype=torch.long)),
    "k_cache 3-D": dict(k_cache=torch.zeros(3, 64, 16)),
    "v_cache heads": dict(v_cache=torch.zeros(3, 64, 1, 8)),
    "k_cache dtype": dict(k_cache=torch.zeros(3, 64, 2, 8, dtype=torch.float64)),
    "caches differ": dict(v_cache=torch.zeros(3, 32, 2, 8)),
}


def _message(fn, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(**kwargs)
    return str(info.value)


def _python_message(kv_cache: bool, **kwargs) -> str:
    """What the fake implementation raises: check_qkv_rope, then (for the cache variant) check_kv_cache."""
    from tp_kernels.ops import checks

    qkv_names = ("x", "w_qkv", "b_qkv", "cos_sin_cache", "positions", "n_heads_per_rank", "n_kv_heads_per_rank",
                 "head_dim", "rope_style")
    cache_names = ("x", "positions", "cache_batch_index", "k_cache", "v_cache", "n_kv_heads_per_rank", "head_dim")

    def both():
        checks.check_qkv_rope(**{k: kwargs[k] for k in qkv_names})
        if kv_cache:
            checks.check_kv_cache(**{k: kwargs[k] for k in cache_names})

    return _message(both)


@pytest.mark.parametrize("case", sorted(BAD_QKV) + sorted(BAD_CACHE))
def test_checks_say_what_the_python_checks_say(case):
    qkv_kwargs = {**_qkv_kwargs(), **BAD_QKV.get(case, {})}
    if case in BAD_QKV:
        assert _message(_op("qkv_rope"), **qkv_kwargs) == _python_message(False, **qkv_kwargs)
    kwargs = {**qkv_kwargs, **_cache_kwargs(), **BAD_CACHE.get(case, {})}
    assert _message(_op("qkv_rope_kv_cache"), **kwargs) == _python_message(True, **kwargs)


def test_out_of_range_indices_raise_before_anything_is_written():
    kwargs = _qkv_kwargs()
    with pytest.raises(ValueError, match=r"positions must be in \[0, cos_sin_cache's max_position=64\) \(or the "
                                         r"position -1 that marks a padding token\), got values in \[-2, 64\]"):
        _op("qkv_rope")(**{**kwargs, "positions": torch.tensor([0, -2, 64, -1, 3])})
    caches = _cache_kwargs()
    before = [caches["k_cache"].clone(), caches["v_cache"].clone()]
    for positions, batch_index, pattern in (
            ([0, 1, 2, 3, 64], [0] * 5, r"positions must be in \[0, cos_sin_cache's max_position=64\)"),
            ([0, 1, 2, -1, 3], [0, 0, 3, 9, 0], r"cache_batch_index must be in \[0, 3\) for the tokens written to "
                                                r"the cache \(position -1 skips a token\), got values in \[0, 3\]"),
            ([0, 1, 2, -2, 3], [0] * 5, r"positions must be in \[0, cos_sin_cache's max_position=64\)")):
        with pytest.raises(ValueError, match=pattern):
            _op("qkv_rope_kv_cache")(**{**kwargs, **caches, "positions": torch.tensor(positions),
                                        "cache_batch_index": torch.tensor(batch_index)})
    with pytest.raises(ValueError, match="cache_batch_index must be int32 or int64, got torch.float32"):
        _op("qkv_rope_kv_cache")(**{**kwargs, **caches, "cache_batch_index": torch.zeros(5)})
    short = {**caches, "k_cache": torch.zeros(3, 8, 2, 8), "v_cache": torch.zeros(3, 8, 2, 8)}
    with pytest.raises(ValueError, match=r"positions must be in \[0, 8\) for the tokens written to the cache"):
        _op("qkv_rope_kv_cache")(**{**kwargs, **short, "positions": torch.tensor([0, 1, 2, 8, -1])})
    assert torch.equal(caches["k_cache"], before[0]) and torch.equal(caches["v_cache"], before[1])
