"""The Triton kernels compiled and run on a GPU: bf16 parity of the ops (through the CUDA dispatch) and
of the plain GEMM with the float64 reference, opcheck on CUDA tensors, and torch.compile.

On a GPU node conftest leaves TRITON_INTERPRET unset, so `make test` runs these with the compiled
kernels (interpreted kernels would copy CUDA tensors to the host, testing nothing here):

    .venv/bin/python -m pytest tests/gpu/test_triton_gpu.py -q

The interpreter tests (tests/kernels/test_*_interpret.py) skip in such a session, and these skip in an
interpreting one.
"""
import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (absent with the CPU-only torch)")

from conftest import assert_close, poison_like  # noqa: E402
from tp_kernels import ops, reference  # noqa: E402
from tp_kernels.kernels.matmul import matmul  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; see README, 'GPU tests'"),
    pytest.mark.skipif(triton.knobs.runtime.interpret,
                       reason="TRITON_INTERPRET=1 would interpret the kernels; run with TRITON_INTERPRET=0"),
]

HIDDEN = 512
MAX_POSITION = 4096


def _inputs(dtype, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, with_bias):
    n_rows = (n_heads + 2 * n_kv_heads) * head_dim
    x = torch.randn(n_tokens, HIDDEN, device="cuda").to(dtype)
    w_qkv = (torch.randn(n_rows, HIDDEN, device="cuda") / HIDDEN ** 0.5).to(dtype)
    b_qkv = torch.randn(n_rows, device="cuda").to(dtype) if with_bias else None
    cos_sin = reference.rope_cos_sin_cache(MAX_POSITION, rotary_dim, device="cuda")
    positions = torch.randint(0, MAX_POSITION, (n_tokens,), device="cuda")
    return x, w_qkv, b_qkv, cos_sin, positions


def _expected(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, rope_style):
    return reference.qkv_rope(x.double(), w_qkv.double(), None if b_qkv is None else b_qkv.double(),
                              cos_sin.double(), positions, n_heads, n_kv_heads, head_dim, rope_style)


# (n_tokens, n_heads_per_rank, n_kv_heads_per_rank, head_dim, rotary_dim, rope_style, with_bias): every
# M bucket, every supported head_dim, partial rotary, GQA and MQA
CASES = [
    (1, 8, 2, 128, 128, "neox", False),
    (7, 4, 4, 64, 64, "gptj", True),
    (16, 4, 1, 80, 80, "neox", True),
    (33, 6, 2, 96, 32, "neox", True),
    (100, 2, 1, 256, 256, "gptj", False),
    (300, 4, 2, 128, 64, "none", True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-q{}kv{}-hd{}-rd{}-{}".format(*c[:6]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
def test_qkv_rope_op_on_cuda_matches_reference(dtype, case):
    n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, rope_style, with_bias = case
    inputs = _inputs(dtype, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, with_bias)
    q, k, v = ops.qkv_rope(*inputs, n_heads_per_rank=n_heads, n_kv_heads_per_rank=n_kv_heads, head_dim=head_dim,
                           rope_style=rope_style)
    for name, actual, ref in zip("qkv", (q, k, v), _expected(*inputs, n_heads, n_kv_heads, head_dim, rope_style)):
        assert actual.is_cuda and actual.is_contiguous(), name
        assert_close(actual.cpu(), ref.cpu(), dtype, reduction_len=HIDDEN, msg=name)


@pytest.mark.parametrize("n_tokens", [1, 40])
def test_qkv_rope_kv_cache_op_on_cuda_writes_only_its_slots(n_tokens):
    dtype, n_heads, n_kv_heads, head_dim, batch, max_seq = torch.bfloat16, 8, 2, 128, 4, 64
    x, w_qkv, b_qkv, cos_sin, _ = _inputs(dtype, n_tokens, n_heads, n_kv_heads, head_dim, head_dim, True)
    slots = torch.randperm(batch * max_seq, device="cuda")[:n_tokens]
    cache_batch_index, positions = slots // max_seq, slots % max_seq
    k_cache = torch.randn(batch, max_seq, n_kv_heads, head_dim, device="cuda").to(dtype)
    v_cache = torch.randn_like(k_cache)
    k_cache[cache_batch_index, positions] = float("nan")
    v_cache[cache_batch_index, positions] = float("nan")
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q = ops.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, positions, cache_batch_index, k_cache, v_cache,
                              n_heads_per_rank=n_heads, n_kv_heads_per_rank=n_kv_heads, head_dim=head_dim)
    q_ref, k_ref, v_ref = _expected(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, "neox")
    assert_close(q.cpu(), q_ref.cpu(), dtype, reduction_len=HIDDEN, msg="q")
    assert_close(k_cache[cache_batch_index, positions].cpu(), k_ref.cpu(), dtype, reduction_len=HIDDEN, msg="k")
    assert_close(v_cache[cache_batch_index, positions].cpu(), v_ref.cpu(), dtype, reduction_len=HIDDEN, msg="v")
    untouched = torch.ones(batch, max_seq, dtype=torch.bool, device="cuda")
    untouched[cache_batch_index, positions] = False
    assert torch.equal(k_cache[untouched], k_before[untouched])
    assert torch.equal(v_cache[untouched], v_before[untouched])


@pytest.mark.parametrize("shape", [(1, 4096, 512), (77, 1000, 520), (512, 512, 512)],
                         ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_matmul_on_cuda_matches_reference(shape):
    m, n, k = shape
    a = torch.randn(m, k, device="cuda").bfloat16()
    b = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    bias = torch.randn(n, device="cuda").bfloat16()
    c = matmul(a, b, bias)
    expected = reference.linear(a.double(), b.double(), bias.double())
    assert_close(c.cpu(), expected.cpu(), torch.bfloat16, reduction_len=k)


def test_opcheck_on_cuda():
    n_heads, n_kv_heads, head_dim = 4, 2, 64
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(torch.bfloat16, 5, n_heads, n_kv_heads, head_dim, head_dim, True)
    torch.library.opcheck(torch.ops.tp_kernels.qkv_rope.default,
                          (x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, "neox"))
    k_cache = torch.zeros(2, 16, n_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    batch_index = torch.tensor([0, 1, 0, 1, 0], device="cuda")
    torch.library.opcheck(torch.ops.tp_kernels.qkv_rope_kv_cache.default,
                          (x, w_qkv, b_qkv, cos_sin, positions % 16, batch_index, k_cache, torch.zeros_like(k_cache),
                           n_heads, n_kv_heads, head_dim, "gptj"))


def _qkv_step(x, w_qkv, b_qkv, cos_sin, positions, cache_batch_index, k_cache, v_cache):
    q, k, v = ops.qkv_rope(x, w_qkv, b_qkv, cos_sin, positions, n_heads_per_rank=4, n_kv_heads_per_rank=2,
                           head_dim=128)
    q2 = ops.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, positions, cache_batch_index, k_cache, v_cache,
                               n_heads_per_rank=4, n_kv_heads_per_rank=2, head_dim=128)
    return q, q2, k, v


def test_torch_compile_matches_eager_and_writes_the_caches():
    torch._dynamo.reset()
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(torch.bfloat16, 9, 4, 2, 128, 128, True)
    positions = positions % 32
    cache_batch_index = torch.arange(9, device="cuda") % 2
    caches_eager = [poison_like(torch.empty(2, 32, 2, 128, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    caches_compiled = [c.clone() for c in caches_eager]
    eager = _qkv_step(x, w_qkv, b_qkv, cos_sin, positions, cache_batch_index, *caches_eager)
    compiled_fn = torch.compile(_qkv_step, fullgraph=True)
    compiled = compiled_fn(x, w_qkv, b_qkv, cos_sin, positions, cache_batch_index, *caches_compiled)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # same kernel, same inputs: the same bits
    for a, b in zip(caches_compiled, caches_eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    written = caches_compiled[0][cache_batch_index, positions]
    assert torch.isfinite(written).all(), "the compiled graph did not write the KV cache"


def test_float64_runs_the_native_implementation_with_a_warning():
    import tp_kernels.ops.triton_impls as triton_impls

    triton_impls._warned_float64 = False
    x, w_qkv, b_qkv, cos_sin, positions = _inputs(torch.float64, 3, 2, 1, 64, 64, True)
    with pytest.warns(RuntimeWarning, match="running the torch-native implementation"):
        q, k, v = ops.qkv_rope(x, w_qkv, b_qkv, cos_sin, positions, n_heads_per_rank=2, n_kv_heads_per_rank=1,
                               head_dim=64)
    for actual, ref in zip((q, k, v), _expected(x, w_qkv, b_qkv, cos_sin, positions, 2, 1, 64, "neox")):
        assert_close(actual, ref, torch.float64, reduction_len=HIDDEN)


# ----------------------------------------------------------------------------------------------------------
# decode split-K, the -1 skip position, CUDA graphs (issue 18, items 10, 12, 15)
# ----------------------------------------------------------------------------------------------------------
def _llama70b_tp8_decode(n_tokens, dtype=torch.bfloat16):
    """One rank of Llama-70B at TP=8: hidden 8192, 8 q heads and 1 KV head of 128 (QKV N = 1280)."""
    torch.manual_seed(0)
    hidden, n_heads, n_kv_heads, head_dim = 8192, 8, 1, 128
    x = torch.randn(n_tokens, hidden, device="cuda").to(dtype)
    w_qkv = (torch.randn((n_heads + 2 * n_kv_heads) * head_dim, hidden, device="cuda") / hidden ** 0.5).to(dtype)
    cos_sin = reference.rope_cos_sin_cache(MAX_POSITION, head_dim, device="cuda")
    positions = torch.randint(0, 64, (n_tokens,), device="cuda")
    return x, w_qkv, None, cos_sin, positions, n_heads, n_kv_heads, head_dim


@pytest.mark.parametrize("n_tokens", [1, 128])
def test_split_k_fills_the_sms_and_matches_reference(n_tokens):
    from tp_kernels.kernels import configs, launch

    x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim = _llama70b_tp8_decode(n_tokens)
    config = configs.qkv_config(x.device, x.dtype, n_tokens)
    n_tiles = -(-n_tokens // config.block_m) * (n_heads + 2 * n_kv_heads) * head_dim // config.block_n
    n_sms = configs.sm_count(x.device)
    split = configs.split_k_for(n_tiles, x.shape[1], config.block_k, n_sms)
    assert n_tiles * split >= n_sms, (n_tiles, split, n_sms)
    expected = _expected(x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim, "neox")
    first = ops.qkv_rope(x, w_qkv, b_qkv, cos_sin, positions, n_heads_per_rank=n_heads,
                         n_kv_heads_per_rank=n_kv_heads, head_dim=head_dim)
    for name, actual, ref in zip("qkv", first, expected):
        assert_close(actual.cpu(), ref.cpu(), torch.bfloat16, reduction_len=x.shape[1], msg=name)
    for _ in range(50):  # the partials are summed in part order: the same bits every call
        again = ops.qkv_rope(x, w_qkv, b_qkv, cos_sin, positions, n_heads_per_rank=n_heads,
                             n_kv_heads_per_rank=n_kv_heads, head_dim=head_dim)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.cuda.synchronize()
    assert not any(buffer.any() for buffer in launch._counter_buffers.values()), "arrival counters left non-zero"


def test_split_k_on_two_streams_at_once():
    """Each stream gets its own lane of arrival counters: interleaved launches on two streams agree with
    launches on one."""
    x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim = _llama70b_tp8_decode(2)
    kwargs = dict(n_heads_per_rank=n_heads, n_kv_heads_per_rank=n_kv_heads, head_dim=head_dim)
    expected = ops.qkv_rope(x, w_qkv, b_qkv, cos_sin, positions, **kwargs)[0]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outputs = []
    for _ in range(20):
        for stream in streams:
            with torch.cuda.stream(stream):
                outputs.append(ops.qkv_rope(x, w_qkv, b_qkv, cos_sin, positions, **kwargs)[0])
    torch.cuda.synchronize()
    assert all(torch.equal(out, expected) for out in outputs)


def test_out_of_range_cache_indices_on_cuda_write_nothing():
    x, w_qkv, b_qkv, cos_sin, _, n_heads, n_kv_heads, head_dim = _llama70b_tp8_decode(6)
    batch, max_seq = 3, 16
    positions = torch.tensor([5, -1, max_seq, 10 ** 6, -3, 2], device="cuda")
    batch_index = torch.tensor([1, 0, 0, 2, 1, batch], device="cuda")
    buffers = [torch.randn(batch + 2, max_seq, n_kv_heads, head_dim, device="cuda").bfloat16() for _ in range(2)]
    before = [b.clone() for b in buffers]
    q = ops.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, positions, batch_index, buffers[0][1:-1], buffers[1][1:-1],
                              n_heads_per_rank=n_heads, n_kv_heads_per_rank=n_kv_heads, head_dim=head_dim)
    torch.cuda.synchronize()
    assert torch.isfinite(q).all()
    for buffer, old in zip(buffers, before):
        changed = (buffer != old).any(dim=-1).any(dim=-1).nonzero().tolist()
        assert changed == [[2, 5]], changed


def test_split_k_in_a_captured_cuda_graph_matches_eager():
    x, w_qkv, b_qkv, cos_sin, positions, n_heads, n_kv_heads, head_dim = _llama70b_tp8_decode(1)
    kwargs = dict(n_heads_per_rank=n_heads, n_kv_heads_per_rank=n_kv_heads, head_dim=head_dim)
    static_x, static_positions = x.clone(), positions.clone()
    ops.qkv_rope(static_x, w_qkv, b_qkv, cos_sin, static_positions, **kwargs)  # warm-up: compile, counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_q = ops.qkv_rope(static_x, w_qkv, b_qkv, cos_sin, static_positions, **kwargs)[0]
    for step in range(5):
        static_x.copy_(torch.randn_like(x))
        static_positions.fill_(step)
        graph.replay()
        eager_q = ops.qkv_rope(static_x, w_qkv, b_qkv, cos_sin, static_positions, **kwargs)[0]
        torch.cuda.synchronize()
        assert torch.equal(static_q, eager_q), f"replay {step} differs from eager"


def _reduce_overhead_skips(k_cache, v_cache):
    """Inductor's count of graphs that reduce-overhead left without a CUDA graph, for a compiled decode
    step that writes k_cache and v_cache (batch >= 2, n_kv_heads, head_dim taken from them)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _, max_seq, n_kv_heads, head_dim = k_cache.shape
    n_heads = 2 * n_kv_heads
    x, w_qkv, b_qkv, cos_sin, _ = _inputs(k_cache.dtype, 2, n_heads, n_kv_heads, head_dim, head_dim, True)

    def step(x, positions, batch_index, k_cache, v_cache):
        return ops.qkv_rope_kv_cache(x, w_qkv, b_qkv, cos_sin, positions, batch_index, k_cache, v_cache,
                                     n_heads_per_rank=n_heads, n_kv_heads_per_rank=n_kv_heads, head_dim=head_dim)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for position in range(min(4, max_seq)):
        compiled(x, torch.full((2,), position, device="cuda"), torch.arange(2, device="cuda"), k_cache, v_cache)
    torch.cuda.synchronize()
    return counters["inductor"]["cudagraph_skips"]


def test_reduce_overhead_keeps_cuda_graphs_with_the_kv_cache():
    from tp_kernels import TPGroup
    from tp_kernels.models import GPT

    model = GPT.from_preset("tiny", TPGroup.single(), dtype=torch.bfloat16, device="cuda")
    cache = model.new_cache(2, 16)
    assert _reduce_overhead_skips(cache.k[0], cache.v[0]) == 0, "reduce-overhead skipped CUDA graphs"
    plain = [torch.zeros_like(cache.k[0]) for _ in range(2)]  # the control: caches not marked static
    assert _reduce_overhead_skips(*plain) > 0, "the unmarked control should be skipped: else this check cannot fail"
