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


# ----------------------------------------------------------------------------------------------------------
# split-K (configs.split_k_for forced, since these hidden sizes are too small to split on their own): decode
# and, at T=33, the 32 x 64 tiles
# ----------------------------------------------------------------------------------------------------------
SPLIT_HIDDEN = 320  # 2 parts of the 16-bit 256-deep K blocks, 3 of the fp32 128-deep ones; the last part short


@pytest.mark.parametrize("write_kv_cache", [False, True], ids=["out", "kv-cache"])
@pytest.mark.parametrize("dtype, n_tokens, rope_style", [(torch.float32, 1, "neox"), (torch.float16, 3, "gptj"),
                                                        (torch.bfloat16, 1, "none"), (torch.float16, 33, "neox")],
                         ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else str(v))
def test_split_k_matches_reference_and_leaves_counters_zero(dtype, n_tokens, rope_style, write_kv_cache,
                                                            poisoned_outputs, monkeypatch):
    from tp_kernels.kernels import configs, launch

    monkeypatch.setattr(configs, "split_k_for", lambda *args: 4)
    n_heads, n_kv_heads, head_dim = 2, 1, 64
    x = torch.randn(n_tokens, SPLIT_HIDDEN).to(dtype)
    w_qkv = (torch.randn((n_heads + 2 * n_kv_heads) * head_dim, SPLIT_HIDDEN) / SPLIT_HIDDEN ** 0.5).to(dtype)
    b_qkv = torch.randn(w_qkv.shape[0]).to(dtype)
    cos_sin = reference.rope_cos_sin_cache(MAX_POSITION, head_dim)
    positions = torch.randperm(MAX_SEQ)[:n_tokens]  # distinct: each token owns its cache slot
    expected = reference.qkv_rope(x.double(), w_qkv.double(), b_qkv.double(), cos_sin.double(), positions, n_heads,
                                  n_kv_heads, head_dim, rope_style)
    for call in range(2):  # the second launch reuses the counters the first one left
        if write_kv_cache:
            caches = [torch.full((BATCH, MAX_SEQ, n_kv_heads, head_dim), float("nan")).to(dtype) for _ in range(2)]
            batch_index = torch.full((n_tokens,), BATCH - 1)
            q = qkv.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, positions, batch_index, *caches, n_heads,
                                      n_kv_heads, head_dim, rope_style)
            k, v = (cache[batch_index, positions] for cache in caches)
        else:
            q, k, v = qkv.qkv_rope(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, rope_style)
        for name, actual, ref in zip("qkv", (q, k, v), expected):
            assert_close(actual, ref, dtype, reduction_len=SPLIT_HIDDEN, msg=f"{name}, call {call}")
        counters = launch._counter_buffers[("cpu", 0)]
        assert not counters.any(), "the last part of a tile must put its arrival counter back to zero"


# ----------------------------------------------------------------------------------------------------------
# the -1 skip position and out-of-range cache indices
# ----------------------------------------------------------------------------------------------------------
def _guarded_caches(dtype, n_kv_heads, head_dim):
    """k and v caches (BATCH, MAX_SEQ, ...) inside buffers with a guard batch row before and after, all
    random, so that a write one batch row or one position outside the cache lands in a guard."""
    buffers = [torch.randn(BATCH + 2, MAX_SEQ, n_kv_heads, head_dim).to(dtype) for _ in range(2)]
    return buffers, [b[1:-1] for b in buffers]


@pytest.mark.parametrize("split_k", [1, 2], ids=["one-part", "split-k"])
def test_skip_and_out_of_range_indices_leave_the_cache_untouched(split_k, monkeypatch):
    """What the kernel does on a GPU, where the launcher does not check index ranges (the CPU check is
    switched off here): position -1 and every index outside the cache write nothing, the in-range
    token is written, cos/sin rows are clamped into the table, and q is still right for -1 (position 0)."""
    from tp_kernels.kernels import configs

    monkeypatch.setattr(qkv, "_check_index_range", lambda *args: None)
    monkeypatch.setattr(configs, "split_k_for", lambda *args: split_k)
    dtype, n_heads, n_kv_heads, head_dim = torch.float32, 2, 1, 64
    x, w_qkv, b_qkv, cos_sin, _ = _inputs(dtype, 7, n_heads, n_kv_heads, head_dim, head_dim, True)
    # token:                 ok  skip  pos=max_seq  pos>>max  pos<0  batch=BATCH  batch<0
    positions = torch.tensor([5, -1, MAX_SEQ, 10 ** 6, -3, 2, 4])
    batch_index = torch.tensor([1, 0, 0, 2, 1, BATCH, -1])
    buffers, (k_cache, v_cache) = _guarded_caches(dtype, n_kv_heads, head_dim)
    before = [b.clone() for b in buffers]

    q = qkv.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, positions, batch_index, k_cache, v_cache, n_heads,
                              n_kv_heads, head_dim, "neox")

    in_range = torch.tensor([True, True, False, False, False, True, True])  # positions inside the cos/sin table
    q_ref, k_ref, v_ref = _expected(x[in_range], w_qkv, b_qkv, cos_sin, positions[in_range], n_heads, n_kv_heads,
                                    head_dim, "neox")
    assert_close(q[in_range], q_ref, dtype, reduction_len=HIDDEN, msg="q of the tokens inside the table")
    assert torch.isfinite(q).all(), "a clamped cos/sin row must still give finite q"
    assert_close(k_cache[1, 5], k_ref[0], dtype, reduction_len=HIDDEN, msg="k of the in-range token")
    assert_close(v_cache[1, 5], v_ref[0], dtype, reduction_len=HIDDEN, msg="v of the in-range token")
    for buffer, old in zip(buffers, before):
        changed = (buffer != old).any(dim=-1).any(dim=-1).nonzero().tolist()  # (batch row, position) pairs
        assert changed == [[2, 5]], f"cache slots written besides the in-range token's [1, 5]: {changed}"


def test_the_cpu_launcher_accepts_the_skip_position_and_raises_on_other_out_of_range_indices():
    dtype, n_heads, n_kv_heads, head_dim = torch.float32, 2, 1, 64
    x, w_qkv, b_qkv, cos_sin, _ = _inputs(dtype, 2, n_heads, n_kv_heads, head_dim, head_dim, True)
    buffers, (k_cache, v_cache) = _guarded_caches(dtype, n_kv_heads, head_dim)
    before = [b.clone() for b in buffers]
    # the skipped token's batch index may be anything: it is not used
    q = qkv.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, torch.tensor([-1, 3]), torch.tensor([BATCH + 5, 0]),
                              k_cache, v_cache, n_heads, n_kv_heads, head_dim, "neox")
    q_ref = _expected(x, w_qkv, b_qkv, cos_sin, torch.tensor([0, 3]), n_heads, n_kv_heads, head_dim, "neox")[0]
    assert_close(q, q_ref, dtype, reduction_len=HIDDEN, msg="q (position -1 rotates as position 0)")
    for buffer, old in zip(buffers, before):
        assert (buffer != old).any(dim=-1).any(dim=-1).nonzero().tolist() == [[1, 3]]
    written = [b.clone() for b in buffers]
    with pytest.raises(ValueError, match=r"positions must be in \[0, cos_sin_cache's max_position=96\) \(or the "
                                         r"position -1 that marks a padding token\), got values in \[-2, 3\]"):
        qkv.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, torch.tensor([-2, 3]), torch.tensor([0, 0]), k_cache,
                              v_cache, n_heads, n_kv_heads, head_dim, "neox")
    with pytest.raises(ValueError, match=r"cache_batch_index must be in \[0, the caches' batch=3\)"):
        qkv.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, torch.tensor([2, 3]), torch.tensor([0, BATCH]), k_cache,
                              v_cache, n_heads, n_kv_heads, head_dim, "neox")
    assert all(torch.equal(b, old) for b, old in zip(buffers, written)), "a call that raised wrote the cache"
