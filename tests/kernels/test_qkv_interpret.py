"""The fused QKV + bias + RoPE + head split launchers (tp_kernels.kernels.qkv) under TRITON_INTERPRET=1 on
CPU tensors, against the float64 reference (tp_kernels.reference.qkv_rope / write_kv_cache).

Shapes are tiny because the interpreter runs each program in numpy (~0.1 s per program here); they
still cover every M bucket of the config table (T=1, 5 | 33 | 70), T not a multiple of the tile, head
tiles narrower than the head (decode cuts 128-wide heads into 4), padded heads (80, 96), GQA and MQA.
"""
import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (absent with the CPU-only torch)")
if not triton.knobs.runtime.interpret:
    pytest.skip("TRITON_INTERPRET=0: these check the kernels in the interpreter on CPU tensors "
                "(tests/gpu/test_triton_gpu.py checks them compiled)", allow_module_level=True)

from conftest import assert_close  # noqa: E402
from poisoned_outputs import poisoned_outputs  # noqa: E402,F401  (fixture)
from tp_kernels import reference  # noqa: E402
from tp_kernels.kernels import qkv  # noqa: E402

HIDDEN = 64
MAX_POSITION = 96


def _inputs(dtype, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, with_bias, cache_dtype=torch.float32):
    n_rows = (n_heads + 2 * n_kv_heads) * head_dim
    x = torch.randn(n_tokens, HIDDEN).to(dtype)
    w_qkv = (torch.randn(n_rows, HIDDEN) / HIDDEN ** 0.5).to(dtype)
    b_qkv = torch.randn(n_rows).to(dtype) if with_bias else None
    cos_sin = reference.rope_cos_sin_cache(MAX_POSITION, rotary_dim, dtype=cache_dtype)
    positions = torch.randint(0, MAX_POSITION, (n_tokens,))
    return x, w_qkv, b_qkv, cos_sin, positions


def _expected(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, rope_style):
    return reference.qkv_rope(x.double(), w_qkv.double(), None if b_qkv is None else b_qkv.double(),
                              cos_sin.double(), positions, n_heads, n_kv_heads, head_dim, rope_style)


# (dtype, n_tokens, n_heads_per_rank, n_kv_heads_per_rank, head_dim, rotary_dim, rope_style, with_bias)
CASES = [
    (torch.float32, 1, 4, 2, 64, 64, "neox", True),  # decode, GQA
    (torch.float16, 1, 2, 1, 128, 128, "gptj", True),  # decode tiles of 32 cut the head in 4
    (torch.bfloat16, 1, 2, 2, 80, 80, "neox", False),  # padded head, MHA
    (torch.float32, 5, 2, 1, 96, 32, "neox", True),  # partial rotary: features 32..95 pass through
    (torch.float16, 5, 4, 1, 128, 64, "gptj", False),  # MQA, partial rotary
    (torch.bfloat16, 5, 2, 1, 256, 256, "neox", True),  # widest head
    (torch.float32, 33, 2, 1, 80, 80, "gptj", True),  # M bucket <= 64, T not a multiple of 32
    (torch.bfloat16, 33, 2, 1, 64, 64, "none", True),
    (torch.float16, 70, 2, 1, 96, 96, "neox", True),  # large-M bucket, 64-row tiles, 2 tiles in T
    (torch.float32, 70, 1, 1, 64, 32, "none", False),
]


def _case_id(case):
    dtype, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, rope_style, with_bias = case
    return (f"{str(dtype)[6:]}-T{n_tokens}-q{n_heads}kv{n_kv_heads}-hd{head_dim}-rd{rotary_dim}-{rope_style}"
            f"{'-bias' if with_bias else ''}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_qkv_rope_matches_reference(case, poisoned_outputs):
    dtype, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, rope_style, with_bias = case
    inputs = _inputs(dtype, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, with_bias)
    q, k, v = qkv.qkv_rope(*inputs, n_heads, n_kv_heads, head_dim, rope_style)
    assert all(any(t is a for a in poisoned_outputs) for t in (q, k, v)), "outputs must be poisoned allocations"
    expected = _expected(*inputs, n_heads, n_kv_heads, head_dim, rope_style)
    for name, actual, ref in zip("qkv", (q, k, v), expected):
        assert actual.dtype == dtype and actual.is_contiguous(), name
        assert_close(actual, ref, dtype, reduction_len=HIDDEN, msg=name)


def test_qkv_rope_reads_strided_inputs_and_a_16bit_cos_sin_cache(poisoned_outputs):
    """x as a column slice of a wider tensor, w_qkv transposed in memory, cos/sin stored in bf16."""
    n_heads, n_kv_heads, head_dim = 2, 1, 64
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(torch.float16, 5, n_heads, n_kv_heads, head_dim, head_dim, True,
                                                  cache_dtype=torch.bfloat16)
    x_strided = torch.cat([x, torch.randn_like(x)], dim=1)[:, :HIDDEN]
    w_transposed = w_qkv.T.contiguous().T
    q, k, v = qkv.qkv_rope(x_strided, w_transposed, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim,
                           "neox")
    for name, actual, ref in zip("qkv", (q, k, v), _expected(x, w_qkv, b_qkv, cos_sin, positions, n_heads,
                                                             n_kv_heads, head_dim, "neox")):
        assert_close(actual, ref, torch.float16, reduction_len=HIDDEN, msg=name)


# (dtype, n_tokens, n_heads_per_rank, n_kv_heads_per_rank, head_dim, rope_style, with_bias, index dtype)
KV_CACHE_CASES = [
    (torch.float32, 1, 2, 1, 64, "neox", True, torch.int64),
    (torch.bfloat16, 5, 4, 2, 80, "gptj", False, torch.int32),
    (torch.float16, 33, 2, 2, 64, "none", True, torch.int64),
]
BATCH, MAX_SEQ = 3, 40


@pytest.mark.parametrize("case", KV_CACHE_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-T{c[1]}-hd{c[4]}-{c[5]}-{str(c[7])[6:]}")
def test_qkv_rope_kv_cache_writes_only_its_slots(case, poisoned_outputs):
    dtype, n_tokens, n_heads, n_kv_heads, head_dim, rope_style, with_bias, index_dtype = case
    x, w_qkv, b_qkv, cos_sin, _ = _inputs(dtype, n_tokens, n_heads, n_kv_heads, head_dim, head_dim, with_bias)
    # distinct (batch, position) slots, so each token owns its cache row
    slots = torch.randperm(BATCH * MAX_SEQ)[:n_tokens].to(index_dtype)
    cache_batch_index, positions = slots // MAX_SEQ, slots % MAX_SEQ
    k_cache = torch.randn(BATCH, MAX_SEQ, n_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(BATCH, MAX_SEQ, n_kv_heads, head_dim).to(dtype)
    k_cache[cache_batch_index, positions] = float("nan")  # poison the slots the kernel must write
    v_cache[cache_batch_index, positions] = float("nan")
    k_before, v_before = k_cache.clone(), v_cache.clone()

    q = qkv.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, positions, cache_batch_index, k_cache, v_cache, n_heads,
                              n_kv_heads, head_dim, rope_style)

    q_ref, k_ref, v_ref = _expected(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, rope_style)
    assert_close(q, q_ref, dtype, reduction_len=HIDDEN, msg="q")
    assert_close(k_cache[cache_batch_index, positions], k_ref, dtype, reduction_len=HIDDEN, msg="k_cache")
    assert_close(v_cache[cache_batch_index, positions], v_ref, dtype, reduction_len=HIDDEN, msg="v_cache")
    untouched = torch.ones(BATCH, MAX_SEQ, dtype=torch.bool)
    untouched[cache_batch_index, positions] = False
    assert torch.equal(k_cache[untouched], k_before[untouched]), "a k_cache slot outside the tokens' changed"
    assert torch.equal(v_cache[untouched], v_before[untouched]), "a v_cache slot outside the tokens' changed"


def test_empty_batch_returns_empty_outputs():
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(torch.float32, 0, 2, 1, 64, 64, True)
    q, k, v = qkv.qkv_rope(x, w_qkv, b_qkv, cos_sin, positions, 2, 1, 64, "neox")
    assert q.shape == (0, 2, 64) and k.shape == (0, 1, 64) and v.shape == (0, 1, 64)


def test_bad_arguments_raise_value_errors():
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(torch.float32, 3, 2, 1, 64, 64, True)
    args = (x, w_qkv, b_qkv, cos_sin, positions, 2, 1, 64, "neox")
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32"):
        qkv.qkv_rope(x.double(), w_qkv.double(), b_qkv.double(), *args[3:])
    with pytest.raises(ValueError, match="w_qkv must be"):
        qkv.qkv_rope(x, w_qkv[:-1], *args[2:])
    with pytest.raises(ValueError, match=r"positions must be in \[0, cos_sin_cache's max_position=96\)"):
        qkv.qkv_rope(x, w_qkv, b_qkv, cos_sin, positions + MAX_POSITION, 2, 1, 64, "neox")
    with pytest.raises(ValueError, match="rope_style must be one of"):
        qkv.qkv_rope(*args[:-1], "alibi")
    with pytest.raises(ValueError, match="head_dim must be even"):
        x3, w3, b3, cs3, p3 = _inputs(torch.float32, 3, 1, 1, 63, 62, True)
        qkv.qkv_rope(x3, w3, b3, cs3, p3, 1, 1, 63, "neox")
    k_cache = torch.zeros(2, 8, 1, 64)
    batch_index = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"positions must be in \[0, the caches' max_seq=8\)"):
        qkv.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, torch.tensor([0, 1, 8]), batch_index, k_cache,
                              k_cache.clone(), 2, 1, 64, "neox")
    with pytest.raises(ValueError, match="cache_batch_index must be int32 or int64"):
        qkv.qkv_rope_kv_cache(*args[:5], batch_index.float(), k_cache, k_cache.clone(), 2, 1, 64, "neox")
    with pytest.raises(ValueError, match=r"cache_batch_index must be in \[0, the caches' batch=2\)"):
        qkv.qkv_rope_kv_cache(*args[:5], batch_index + 2, k_cache, k_cache.clone(), 2, 1, 64, "neox")
