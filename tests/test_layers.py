"""Every parallel layer at world sizes 1, 2 and 4 on CPU ranks equals the unsharded torch module."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_close, spawn_ranks
from tp_kernels import layers
from tp_kernels.distributed import TPGroup

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _linear(in_features, out_features, bias, dtype):
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():  # non-trivial biases (nn.Linear's are tiny) so a bias added twice would show
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def _ref_linear(lin, x):
    return F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())


# -- rank functions (module level: they are pickled to the ranks) ------------------------------------------
def _column_rank(tp, lin, x, gather):
    layer = layers.ColumnParallelLinear.from_linear(lin, tp, gather_output=gather)
    return layer(x)


def _row_rank(tp, lin, x, input_is_parallel):
    layer = layers.RowParallelLinear.from_linear(lin, tp, input_is_parallel=input_is_parallel)
    if input_is_parallel:
        x = x.chunk(tp.world_size, dim=-1)[tp.rank]
    return layer(x)


def _merged_rank(tp, lins, x):
    layer = layers.MergedColumnParallelLinear.from_linears(lins, tp)
    return layer.split(layer(x))


def _qkv_rank(tp, q, k, v, x, head_dim):
    layer = layers.QKVParallelLinear.from_linears(q, k, v, tp, head_dim=head_dim)
    fused = layers.QKVParallelLinear.from_linear(
        _stack([q, k, v]), tp, head_dim=head_dim, n_heads=layer.n_heads, n_kv_heads=layer.n_kv_heads)
    assert torch.equal(layer.weight, fused.weight), "from_linears and from_linear must keep the same shard"
    return layer.split_heads(layer(x)), layer.kv_head_start


def _stack(lins):
    fused = nn.Linear(lins[0].in_features, sum(lin.out_features for lin in lins), bias=lins[0].bias is not None)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in lins]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in lins]))
    return fused.to(lins[0].weight.dtype)


def _embedding_rank(tp, emb, ids):
    return layers.VocabParallelEmbedding.from_embedding(emb, tp)(ids)


def _lm_head_rank(tp, lin, emb, x):
    head = layers.ParallelLMHead.from_linear(lin, tp)
    tied = layers.ParallelLMHead.tied_to(layers.VocabParallelEmbedding.from_embedding(emb, tp))
    return head(x), tied(x)


def _block_rank(tp, block, x):
    from transformer_block import ParallelBlock

    return ParallelBlock.from_reference(block, tp)(x)


# -- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_column_parallel(world_size, dtype):
    lin = _linear(24, 8 * world_size + 4 * world_size, True, dtype)  # out not a power of two
    x = torch.randn(3, 5, 24, dtype=dtype)
    expected = _ref_linear(lin, x)
    results = spawn_ranks(world_size, _column_rank, lin, x, True)
    for y in results:
        assert_close(y, expected, dtype, reduction_len=24)
    shards = spawn_ranks(world_size, _column_rank, lin, x, False)
    assert_close(torch.cat(shards, dim=-1), expected, dtype, reduction_len=24)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_row_parallel(world_size, dtype, bias):
    in_features = 12 * world_size
    lin = _linear(in_features, 7, bias, dtype)  # odd out_features
    x = torch.randn(5, in_features, dtype=dtype)  # odd M
    expected = _ref_linear(lin, x)
    for input_is_parallel in (True, False):
        for y in spawn_ranks(world_size, _row_rank, lin, x, input_is_parallel):
            assert_close(y, expected, dtype, reduction_len=in_features, msg=f"input_is_parallel={input_is_parallel}")


def _row_decode_rank(tp, lin, x):
    """A decode-sized call (one row) under no_grad and with grad on: the output of each, and how many
    gemm_allreduce calls each made (no_grad: none, the layer reduces its partial sum in place)."""
    from tp_kernels.layers import linear

    layer = layers.RowParallelLinear.from_linear(lin, tp)
    x = x.chunk(tp.world_size, dim=-1)[tp.rank]
    calls = []
    original = linear.ops.gemm_allreduce
    linear.ops.gemm_allreduce = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.no_grad():
            y_no_grad = layer(x)
        no_grad_calls = len(calls)
        with torch.enable_grad():  # spawn_ranks runs rank functions under no_grad
            y_grad = layer(x)
            y_grad.sum().backward()
    finally:
        linear.ops.gemm_allreduce = original
    return y_no_grad, no_grad_calls, y_grad.detach(), len(calls) - no_grad_calls, layer.weight.grad is not None


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_row_parallel_decode_reduces_in_place_with_the_same_bits(world_size, shape):
    lin = _linear(8 * world_size, 7, True, torch.float32)
    x = torch.randn(*shape, 8 * world_size)
    expected = _ref_linear(lin, x)
    for y_no_grad, no_grad_calls, y_grad, grad_calls, has_grad in spawn_ranks(world_size, _row_decode_rank, lin, x):
        assert (no_grad_calls, grad_calls, has_grad) == (0, 1, True)
        assert_close(y_no_grad, expected, torch.float32, reduction_len=8 * world_size)
        assert torch.equal(y_no_grad, y_grad)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_merged_column_parallel(world_size):
    gate, up = _linear(16, 20 * world_size, True, torch.float32), _linear(16, 12 * world_size, True, torch.float32)
    x = torch.randn(3, 16)
    results = spawn_ranks(world_size, _merged_rank, [gate, up], x)
    gate_parts = torch.cat([r[0] for r in results], dim=-1)
    up_parts = torch.cat([r[1] for r in results], dim=-1)
    assert_close(gate_parts, _ref_linear(gate, x), torch.float32, 16)
    assert_close(up_parts, _ref_linear(up, x), torch.float32, 16)


@pytest.mark.parametrize("world_size,n_heads,n_kv_heads", [(1, 4, 2), (2, 4, 2), (4, 8, 2), (2, 4, 1), (4, 4, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_qkv_parallel_shards_by_heads_and_replicates_kv(world_size, n_heads, n_kv_heads, bias):
    head_dim, hidden = 6, 20
    q = _linear(hidden, n_heads * head_dim, bias, torch.float32)
    k = _linear(hidden, n_kv_heads * head_dim, bias, torch.float32)
    v = _linear(hidden, n_kv_heads * head_dim, bias, torch.float32)
    x = torch.randn(4, hidden)
    q_full = _ref_linear(q, x).view(4, n_heads, head_dim)
    k_full = _ref_linear(k, x).view(4, n_kv_heads, head_dim)
    v_full = _ref_linear(v, x).view(4, n_kv_heads, head_dim)
    results = spawn_ranks(world_size, _qkv_rank, q, k, v, x, head_dim)
    n_heads_per_rank = n_heads // world_size
    for rank, ((q_r, k_r, v_r), kv_start) in enumerate(results):
        heads = slice(rank * n_heads_per_rank, (rank + 1) * n_heads_per_rank)
        assert_close(q_r, q_full[:, heads], torch.float32, hidden)
        # the KV heads this rank holds are the ones its query heads attend with (GQA grouping)
        group = n_heads // n_kv_heads
        assert kv_start == (rank * n_heads_per_rank) // group
        kv = slice(kv_start, kv_start + k_r.shape[1])
        assert_close(k_r, k_full[:, kv], torch.float32, hidden)
        assert_close(v_r, v_full[:, kv], torch.float32, hidden)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("vocab_size", [37, 64])
def test_vocab_parallel_embedding(world_size, vocab_size):
    emb = nn.Embedding(vocab_size, 8)
    ids = torch.cat([torch.tensor([0, vocab_size - 1]), torch.randint(0, vocab_size, (9,))]).view(1, 11)
    for y in spawn_ranks(world_size, _embedding_rank, emb, ids):
        assert torch.equal(y, emb(ids).detach()), "an embedding lookup plus zeros must be exact"


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_lm_head(world_size, dtype):
    vocab_size, dim = 51, 16  # 51 is not divisible by 2 or 4: padding is exercised
    lin = _linear(dim, vocab_size, False, dtype)
    emb = nn.Embedding(vocab_size, dim).to(dtype)
    x = torch.randn(2, 3, dim, dtype=dtype)
    for logits, tied_logits in spawn_ranks(world_size, _lm_head_rank, lin, emb, x):
        assert logits.shape == (2, 3, vocab_size)
        assert_close(logits, _ref_linear(lin, x), dtype, dim)
        assert_close(tied_logits, x.double() @ emb.weight.double().T, dtype, dim)


@pytest.mark.parametrize("world_size", [2, 4])
def test_transformer_block_equals_unsharded(world_size):
    from transformer_block import ReferenceBlock

    block = ReferenceBlock()
    x = torch.randn(2, 5, 64)
    expected = block(x).detach()
    for y in spawn_ranks(world_size, _block_rank, block, x):
        assert_close(y, expected.double(), torch.float32, 64)


def test_tied_head_shares_the_embedding_parameter():
    tp = TPGroup.single()
    emb = layers.VocabParallelEmbedding(10, 4, tp)
    head = layers.ParallelLMHead.tied_to(emb)
    assert head.weight is emb.weight


# -- errors ----------------------------------------------------------------------------------------------------
def _error_rank(tp):
    errors = {}
    cases = {
        "column_out": lambda: layers.ColumnParallelLinear(8, 7, True, tp),
        "row_in": lambda: layers.RowParallelLinear(7, 8, True, tp),
        "merged_part": lambda: layers.MergedColumnParallelLinear(8, [4, 5], True, tp),
        "qkv_heads": lambda: layers.QKVParallelLinear(8, 4, 3, 3, False, tp),
        "qkv_kv_replication": lambda: layers.QKVParallelLinear(8, 4, 6, 3, False, tp),
    }
    for name, make in cases.items():
        try:
            make()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    return errors


def test_sizes_not_divisible_by_tp_raise_naming_the_numbers():
    errors = spawn_ranks(2, _error_rank)[0]
    assert "out_features (7) across tp=2 ranks: 7 is not divisible by 2" in errors["column_out"]
    assert "in_features (7) across tp=2 ranks" in errors["row_in"]
    assert "out_features[1] (5) across tp=2 ranks" in errors["merged_part"]
    assert "n_heads (3) across tp=2 ranks" in errors["qkv_heads"]
    assert "n_heads (6) across tp=2 ranks" not in (errors["qkv_kv_replication"] or "")
    assert "n_kv_heads (3) across tp=2 ranks" in errors["qkv_kv_replication"]


def test_wrong_input_shape_dtype_device_raise():
    tp = TPGroup.single()
    col = layers.ColumnParallelLinear(8, 4, True, tp)
    with pytest.raises(ValueError, match=r"input must be \(\.\.\., 8\), got shape \(2, 7\)"):
        col(torch.randn(2, 7))
    with pytest.raises(ValueError, match="input dtype torch.float16 does not match the weight dtype torch.float32"):
        col(torch.randn(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="input is on meta but the weight is on cpu"):
        col(torch.randn(2, 8, device="meta"))
    row = layers.RowParallelLinear(8, 4, False, tp)
    with pytest.raises(ValueError, match=r"RowParallelLinear: input must be \(\.\.\., 8\)"):
        row(torch.randn(3, 4))
    emb = layers.VocabParallelEmbedding(10, 4, tp)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\), got \[0, 10\]"):
        emb(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="ids must be int32 or int64"):
        emb(torch.tensor([0.0]))
    with pytest.raises(TypeError, match="tp must be a tp_kernels.TPGroup"):
        layers.ColumnParallelLinear(8, 4, True, "not a group")


def test_load_full_checks_the_full_shape():
    tp = TPGroup.single()
    col = layers.ColumnParallelLinear(8, 4, True, tp)
    with pytest.raises(ValueError, match=r"weight must have the full unsharded shape \(4, 8\), got \(4, 9\)"):
        col.load_full(torch.randn(4, 9), torch.randn(4))
    with pytest.raises(ValueError, match="bias given: False"):
        col.load_full(torch.randn(4, 8))
    qkv = layers.QKVParallelLinear(8, 2, 4, 2, False, tp)
    with pytest.raises(ValueError, match=r"k_weight must have the full unsharded shape \(4, 8\)"):
        qkv.load_full_qkv(torch.randn(8, 8), torch.randn(5, 8), torch.randn(4, 8))
