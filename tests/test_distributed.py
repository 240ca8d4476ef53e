"""TPGroup and the all-reduce chain at world sizes 1, 2 and 4 on CPU ranks (gloo)."""
import pytest
import torch

from conftest import assert_close, spawn_ranks
from tp_kernels import ops, reference
from tp_kernels.distributed import TPGroup, resolve


def _all_reduce_rank(tp, xs, algo):
    return ops.all_reduce(xs[tp.rank], tp, algo), xs[tp.rank]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_reduce_matches_sum(world_size, dtype):
    xs = [torch.randn(3, 37, dtype=dtype) for _ in range(world_size)]
    expected = reference.all_reduce([x.double() for x in xs])
    results = spawn_ranks(world_size, _all_reduce_rank, xs, "auto")
    for rank, (y, x_after) in enumerate(results):
        assert_close(y, expected, dtype, reduction_len=world_size, msg=f"rank {rank}")
        assert torch.equal(x_after, xs[rank]), "all_reduce must not modify its input"
    # every rank holds the same bits
    assert all(torch.equal(results[0][0], y) for y, _ in results)


def _group_facts(tp):
    return tp.rank, tp.world_size, resolve(tp.name) is tp, TPGroup.from_group() is tp


@pytest.mark.parametrize("world_size", [2, 4])
def test_from_group_is_one_object_per_process_group(world_size):
    facts = spawn_ranks(world_size, _group_facts)
    assert [f[0] for f in facts] == list(range(world_size))
    assert all(f[1] == world_size and f[2] and f[3] for f in facts)


def test_single_group_is_identity():
    tp = TPGroup.single()
    x = torch.randn(4, 5)
    y = ops.all_reduce(x, tp)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert torch.equal(ops.all_gather(x, tp, dim=1), x)


def test_unknown_group_name_raises():
    with pytest.raises(ValueError, match="not a known TPGroup"):
        ops.all_reduce(torch.ones(2), "no-such-group")


def test_unknown_algo_raises():
    with pytest.raises(ValueError, match="algo must be 'auto' or one of"):
        ops.all_reduce(torch.ones(2), TPGroup.single(), algo="carrier-pigeon")


def _all_gather_rank(tp, xs, dim):
    return ops.all_gather(xs[tp.rank], tp, dim)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_all_gather_concatenates_in_rank_order(world_size, dim):
    xs = [torch.randn(3, 5, 2) for _ in range(world_size)]
    for y in spawn_ranks(world_size, _all_gather_rank, xs, dim):
        assert torch.equal(y, torch.cat(xs, dim=dim))
