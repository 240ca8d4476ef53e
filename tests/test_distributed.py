"""TPGroup and the all-reduce chain at world sizes 1, 2 and 4 on CPU ranks (gloo)."""
import pytest
import torch

from conftest import assert_close, spawn_ranks
from tp_kernels import ops, reference
from tp_kernels.distributed import TPGroup, resolve


def _all_reduce_rank(tp, xs, backend):
    return ops.all_reduce(xs[tp.rank], tp, backend), xs[tp.rank]


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


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match=r"backend must be one of \['identity', 'torch'\]"):
        ops.all_reduce(torch.ones(2), TPGroup.single(), backend="carrier-pigeon")


def _all_gather_rank(tp, xs, dim):
    return ops.all_gather(xs[tp.rank], tp, dim)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_all_gather_concatenates_in_rank_order(world_size, dim):
    xs = [torch.randn(3, 5, 2) for _ in range(world_size)]
    for y in spawn_ranks(world_size, _all_gather_rank, xs, dim):
        assert torch.equal(y, torch.cat(xs, dim=dim))


# -- the chain: fixed at construction, forced only by use_backend ---------------------------------------------
def test_chain_cannot_be_assigned():
    tp = TPGroup.single()
    assert isinstance(tp.communicators, tuple)
    with pytest.raises(AttributeError, match="use_backend"):
        tp.communicators = tp.communicators[:1]


def test_backends_argument_is_checked():
    with pytest.raises(ValueError, match="backends must name each of"):
        TPGroup(rank=0, world_size=1, name="test_distributed.bad", backends=("torch", "carrier-pigeon"))
    with pytest.raises(TypeError, match="sequence of backend names"):
        TPGroup(rank=0, world_size=1, name="test_distributed.bad", backends="torch")


class _CountingTorchCalls:
    """Counts the calls that reach torch.distributed's all_reduce and flat all-gather in this process
    (all_gather_single; torch 2.11 has only all_gather_into_tensor)."""

    def __init__(self):
        import torch.distributed as dist

        gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        self.dist, self.counts = dist, {"all_reduce": 0, "all_gather": 0}
        self.originals = {"all_reduce": ("all_reduce", dist.all_reduce), "all_gather": (gather, getattr(dist, gather))}

    def __enter__(self):
        for key, (name, fn) in self.originals.items():
            def counted(*args, _fn=fn, _key=key, **kwargs):
                self.counts[_key] += 1
                return _fn(*args, **kwargs)
            setattr(self.dist, name, counted)
        return self.counts

    def __exit__(self, *exc):
        for name, fn in self.originals.values():
            setattr(self.dist, name, fn)


def _use_backend_rank(tp):
    """Which backend serves ops.all_reduce / all_gather / allreduce_residual_rmsnorm (C++ kernel or Python),
    by counting torch.distributed calls and shm steps, with and without use_backend."""
    shm = next(c for c in tp.communicators if c.name == "shm")
    x = torch.full((4, 8), float(tp.rank + 1))
    residual, weight = torch.zeros(4, 8), torch.ones(8)
    seen = {}

    def run(label):
        steps_before = shm.sequence
        with _CountingTorchCalls() as counts:
            total = ops.all_reduce(x, tp)
            gathered = ops.all_gather(x, tp, dim=0)
            normed, new_residual = ops.allreduce_residual_rmsnorm(x, residual, weight, 1e-6, tp)
        seen[label] = (dict(counts), shm.sequence - steps_before, total[0, 0].item(), tuple(gathered.shape),
                       new_residual[0, 0].item())

    run("default")
    with tp.use_backend("torch") as forced:
        assert forced.name == "torch" and tp.forced_backend == "torch"
        run("torch")
        with tp.use_backend("shm"):
            run("shm inside torch")
        run("torch again")
        with pytest.raises(ValueError, match=r"backend='shm' conflicts with use_backend\('torch'\)"):
            ops.all_reduce(x, tp, backend="shm")
    assert tp.forced_backend is None
    run("after")
    with pytest.raises(ValueError, match="backend must be one of"):
        with tp.use_backend("carrier-pigeon"):
            pass
    with tp.use_backend("shm"):
        with pytest.raises(RuntimeError, match="forced to 'shm' by use_backend"):
            ops.all_reduce(x.double(), tp)  # shm has no float64: raises instead of falling through to gloo
    return seen


def test_use_backend_is_honoured_by_every_path():
    for seen in spawn_ranks(2, _use_backend_rank):
        shm_only = ({"all_reduce": 0, "all_gather": 0}, 3, 3.0, (8, 8), 3.0)
        torch_only = ({"all_reduce": 2, "all_gather": 1}, 0, 3.0, (8, 8), 3.0)
        assert seen == {"default": shm_only, "torch": torch_only, "shm inside torch": shm_only,
                        "torch again": torch_only, "after": shm_only}, seen


def _chain_names_rank(tp, backends):
    import torch.distributed as dist

    group = TPGroup.from_group(dist.new_group(list(range(tp.world_size))), backends=backends)
    try:
        return [c.name for c in group.communicators]
    finally:
        group.close()


def test_from_group_builds_the_named_chain():
    assert spawn_ranks(2, _chain_names_rank, ("torch",)) == [["identity", "torch"]] * 2
    assert spawn_ranks(2, _chain_names_rank, ("shm", "torch")) == [["identity", "shm", "torch"]] * 2
