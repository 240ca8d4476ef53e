"""The shared-memory communicator (tp_kernels.comm.shm) at 2 and 4 CPU ranks: sums against the float64
reference for every dtype, one-shot and two-shot, messages larger than a slot, the same bits on every
rank, the fused all-reduce + residual + RMSNorm, opcheck of both ops, and 10,000 back-to-back calls.

Inputs are generated inside each rank from (seed, rank) and regenerated here for the reference, so large
messages are not shipped to every rank. A private communicator with 4 KiB slots makes messages of a few
thousand elements span several slots; the group's default communicator (256 KiB slots) is used through
the ops.
"""
import pytest
import torch

from conftest import assert_close, poison_like, spawn_ranks
from tp_kernels import ops, reference
from tp_kernels.comm.shm import ShmCommunicator

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL_SLOT_BYTES = 4096
# 4 KiB slots hold 1024 fp32 / 2048 half elements: sizes around and well past one slot, odd counts
SIZES = (0, 1, 3, 17, 255, 1023, 1024, 1025, 2049, 3 * 2048 + 7, 4 * 4096 + 3)
ALGOS = {"one-shot": 1 << 40, "two-shot": 0}  # one_shot_max_bytes forcing each algorithm
# all_reduce's two-shot also comes with non-temporal stores for its output (large messages) and for what
# it publishes in its slot: (one_shot_max_bytes, stream_min_bytes, publish_stores) forcing each variant
SUM_ALGOS = {
    "one-shot": (1 << 40, 1 << 40, "ordinary"),
    "two-shot": (0, 1 << 40, "ordinary"),
    "two-shot, streamed output": (0, 0, "ordinary"),
    "two-shot, non-temporal publishing": (0, 1 << 40, "non-temporal"),
    "two-shot, both non-temporal": (0, 0, "non-temporal"),
}


def _input(seed: int, rank: int, shape, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def _small_slot_comm(tp) -> ShmCommunicator:
    return ShmCommunicator(tp.process_group, tp.rank, tp.world_size, f"{tp.name}/test-small-slots",
                           slot_bytes=SMALL_SLOT_BYTES)


def _sums_rank(tp, seed, cases, big_numel):
    comm = _small_slot_comm(tp)
    try:
        results = []
        for case, (algo, dtype, numel) in enumerate(cases):
            comm.one_shot_max_bytes, comm.stream_min_bytes, comm.publish_stores = SUM_ALGOS[algo]
            x = _input(seed + case, tp.rank, (numel,), dtype)
            out = poison_like(torch.empty(numel + 1, dtype=dtype))[1:]  # not 16-byte aligned
            y = comm.all_reduce(x, out)
            assert y.data_ptr() == out.data_ptr()
            # in place (out aliasing x; two-shot reads this rank's own part from x) gives the same bits
            x_again = x.clone()
            in_place = comm.all_reduce(x_again, x_again)
            assert torch.equal(in_place, y), f"in place differs: {algo} {dtype} n={numel}"
            results.append(y)
    finally:
        comm.close()
    # the group's own chain: auto picks shm for CPU floats; a message over several default 256 KiB slots
    x = _input(seed - 1, tp.rank, (big_numel,), torch.float32)
    chosen = tp.communicator_for(x).name
    y_auto = ops.all_reduce(x, tp)
    y_shm = ops.all_reduce(x, tp, backend="shm")
    y_torch = ops.all_reduce(x, tp, backend="torch")
    return results, chosen, y_auto, y_shm, y_torch


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_matches_reference(world_size, seed):
    cases = [(algo, dtype, n) for algo in SUM_ALGOS for dtype in DTYPES for n in SIZES]
    big_numel = (1 << 18) + 12_345  # > 1 MiB of fp32
    results = spawn_ranks(world_size, _sums_rank, seed, cases, big_numel)
    for case, (algo, dtype, numel) in enumerate(cases):
        xs = [_input(seed + case, r, (numel,), dtype) for r in range(world_size)]
        expected = reference.all_reduce([x.double() for x in xs])
        for rank in range(world_size):
            y = results[rank][0][case]
            assert_close(y, expected, dtype, reduction_len=world_size, msg=f"{algo} n={numel} rank {rank}")
            # same bits on every rank, and the same as fp32 accumulation in rank order rounded once
            assert torch.equal(y, results[0][0][case]), f"{algo} {dtype} n={numel}: rank {rank} differs from rank 0"
        assert torch.equal(results[0][0][case], reference.all_reduce(xs)), f"{algo} {dtype} n={numel}"
    xs = [_input(seed - 1, r, (big_numel,), torch.float32) for r in range(world_size)]
    expected = reference.all_reduce([x.double() for x in xs])
    for rank, (_, chosen, y_auto, y_shm, y_torch) in enumerate(results):
        assert chosen == "shm"
        assert torch.equal(y_auto, y_shm) and torch.equal(y_shm, results[0][3])
        assert_close(y_shm, expected, torch.float32, reduction_len=world_size, msg=f"big, rank {rank}")
        assert_close(y_torch, expected, torch.float32, reduction_len=world_size, msg=f"gloo, rank {rank}")


def _fused_rank(tp, seed, cases, eps):
    comm = _small_slot_comm(tp)
    try:
        fused = []
        for case, (algo, dtype, shape) in enumerate(cases):
            comm.one_shot_max_bytes = ALGOS[algo]
            x = _input(seed + case, tp.rank, shape, dtype)
            residual = _input(seed + case, 100, shape, dtype)  # the same on every rank, as in a model
            weight = _input(seed + case, 101, shape[-1:], dtype)
            fused.append(comm.allreduce_residual_rmsnorm(x, residual, weight, eps))
        # rows of 8 KiB exceed the 4 KiB slot: summed in slot-sized steps, then normalized
        x = _input(seed, tp.rank, (2, 2048), torch.float32)
        residual = _input(seed, 100, (2, 2048), torch.float32)
        weight = _input(seed, 101, (2048,), torch.float32)
        too_wide = comm.allreduce_residual_rmsnorm(x, residual, weight, eps)
    finally:
        comm.close()
    # through the op (the group's default communicator), and the unfused steps it replaces
    through_op, unfused = [], []
    for case, (algo, dtype, shape) in enumerate(cases[:len(cases) // 2]):
        x = _input(seed + case, tp.rank, shape, dtype)
        residual = _input(seed + case, 100, shape, dtype)
        weight = _input(seed + case, 101, shape[-1:], dtype)
        through_op.append(ops.allreduce_residual_rmsnorm(x, residual, weight, eps, tp))
        unfused.append(ops.add_rmsnorm(ops.all_reduce(x, tp), residual, weight, eps))
    return fused, through_op, unfused, too_wide


@pytest.mark.parametrize("world_size", [2, 4])
def test_allreduce_residual_rmsnorm_matches_reference(world_size, seed):
    # with 4 KiB slots: a (1, 1024) fp32 row fills a slot; (5, 1000) fp32 takes 5 one-row steps; 257 is
    # odd; (2, 3, 64) has two leading dims; (3, 2048) half rows fill slots (8 KiB fp32 rows do not fit)
    shapes = ((1, 1024), (16, 96), (5, 1000), (3, 257), (2, 3, 64), (3, 2048))
    cases = [(algo, dtype, shape) for algo in ALGOS for dtype in DTYPES for shape in shapes
             if shape[-1] * torch.tensor([], dtype=dtype).element_size() <= SMALL_SLOT_BYTES]
    eps = 1e-5
    fused, through_op, unfused, too_wide = zip(*spawn_ranks(world_size, _fused_rank, seed, cases, eps))
    for case, (algo, dtype, shape) in enumerate(cases):
        xs = [_input(seed + case, r, shape, dtype) for r in range(world_size)]
        residual = _input(seed + case, 100, shape, dtype)
        weight = _input(seed + case, 101, shape[-1:], dtype)
        normed_ref, residual_ref = reference.allreduce_residual_rmsnorm(
            [x.double() for x in xs], residual.double(), weight.double(), eps)
        for rank in range(world_size):
            normed, new_residual = fused[rank][case]
            msg = f"{algo} {tuple(shape)} rank {rank}"
            assert_close(new_residual, residual_ref, dtype, reduction_len=world_size + 1, msg=msg)
            assert_close(normed, normed_ref, dtype, reduction_len=world_size + 1, msg=msg)
            assert torch.equal(normed, fused[0][case][0]) and torch.equal(new_residual, fused[0][case][1]), msg
            # the new residual is rounded exactly as all_reduce then add does it
            assert torch.equal(new_residual, reference.add_rmsnorm(reference.all_reduce(xs), residual, weight,
                                                                   eps)[1]), msg
    xs = [_input(seed, r, (2, 2048), torch.float32) for r in range(world_size)]
    normed_ref, residual_ref = reference.allreduce_residual_rmsnorm(
        [x.double() for x in xs], _input(seed, 100, (2, 2048), torch.float32).double(),
        _input(seed, 101, (2048,), torch.float32).double(), eps)
    for rank, (normed, new_residual) in enumerate(too_wide):
        assert_close(normed, normed_ref, torch.float32, reduction_len=world_size + 1, msg=f"wide rows, rank {rank}")
        assert_close(new_residual, residual_ref, torch.float32, reduction_len=world_size + 1, msg=f"rank {rank}")
    for case in range(len(through_op[0])):
        dtype = cases[case][1]
        for rank in range(world_size):
            (normed, new_residual), (normed_u, new_residual_u) = through_op[rank][case], unfused[rank][case]
            assert torch.equal(new_residual, new_residual_u)
            assert_close(normed, normed_u.double(), dtype, msg=f"fused vs unfused op, case {case}")


def _opcheck_rank(tp, seed):
    x = _input(seed, tp.rank, (3, 40), torch.float32)
    residual = _input(seed, 100, (3, 40), torch.float32)
    weight = _input(seed, 101, (40,), torch.float32)
    torch.library.opcheck(torch.ops.tp_kernels.all_reduce.default, (x, tp.name, "shm"))
    torch.library.opcheck(torch.ops.tp_kernels.allreduce_residual_rmsnorm.default, (x, residual, weight, 1e-6, tp.name))
    return tp.communicator_for(x).name


def test_opcheck_through_shm(seed):
    assert spawn_ranks(2, _opcheck_rank, seed) == ["shm", "shm"]


def _back_to_back_rank(tp, seed, n_calls):
    """n_calls all-reduces of sizes and dtypes drawn from a generator seeded alike on every rank (so the
    ranks agree on each call), with integer-valued inputs whose sums are exact in every dtype: any lost,
    stale or misplaced element shows as a wrong value."""
    comm = _small_slot_comm(tp)
    comm.one_shot_max_bytes = 2048  # both algorithms, and multi-slot messages, in the mix
    comm.stream_min_bytes = 6000  # and two-shot calls with ordinary and with non-temporal output stores
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 3000, (n_calls,), generator=g).tolist()
    kinds = torch.randint(0, len(DTYPES), (n_calls,), generator=g).tolist()
    pattern = torch.arange(3000, dtype=torch.float32) % 13
    failures = []
    try:
        for call, (numel, kind) in enumerate(zip(sizes, kinds)):
            dtype, offset = DTYPES[kind], call % 7
            x = (pattern[:numel] + (offset + tp.rank)).to(dtype)
            expected = (pattern[:numel] * tp.world_size + (offset * tp.world_size +
                                                           tp.world_size * (tp.world_size - 1) // 2)).to(dtype)
            if not torch.equal(comm.all_reduce(x), expected):
                failures.append((call, numel, str(dtype)))
        return failures, comm.sequence
    finally:
        comm.close()


def test_ten_thousand_back_to_back_calls(seed):
    n_calls = 10_000
    results = spawn_ranks(2, _back_to_back_rank, seed, n_calls)
    for rank, (failures, steps) in enumerate(results):
        assert failures == [], f"rank {rank}: {len(failures)} wrong results, first {failures[:5]}"
        assert steps > n_calls  # some calls spanned several slots


def _native_path_rank(tp, seed):
    """Which calls the C++ CPU kernels serve themselves and which they hand to the Python chain: spies
    replace the Python implementations for the duration."""
    from tp_kernels._extension import _C
    from tp_kernels.comm.base import IdentityCommunicator, TorchCommunicator
    from tp_kernels.distributed import TPGroup
    from tp_kernels.ops import native

    handed_to_python = []

    def spy_all_reduce(x, group, backend):
        handed_to_python.append(("all_reduce", group == tp.name, backend, str(x.dtype)))
        return native._all_reduce(x, group, backend)

    def spy_inplace(x, group, backend):
        handed_to_python.append(("all_reduce_", group == tp.name, backend, str(x.dtype)))
        return native._all_reduce_inplace(x, group, backend)

    def spy_fused(x, residual, weight, eps, group):
        handed_to_python.append(("fused", group == tp.name, x.shape[-1]))
        return native._allreduce_residual_rmsnorm(x, residual, weight, eps, group)

    x = _input(seed, tp.rank, (3, 50), torch.float32)
    residual = _input(seed, 100, (3, 50), torch.float32)
    weight = _input(seed, 101, (50,), torch.float32)
    wide = tp.communicators[1].slot_bytes // 4 + 1  # fp32 rows one element wider than a slot
    gloo_only = TPGroup(rank=tp.rank, world_size=tp.world_size, name=f"{tp.name}/gloo-only",
                        process_group=tp.process_group,
                        communicators=[IdentityCommunicator(tp.world_size), TorchCommunicator(tp.process_group)])
    seen = {}
    _C.set_cpu_collective_fallbacks(spy_all_reduce, spy_inplace, spy_fused)
    try:
        native_sum = ops.all_reduce(x, tp)
        native_inplace = ops.all_reduce_(x.clone(), tp)
        native_fused = ops.allreduce_residual_rmsnorm(x, residual, weight, 1e-6, tp)
        seen["shm group, plain calls"] = list(handed_to_python)
        ops.all_reduce(x, tp, backend="torch")
        ops.all_reduce_(x.clone(), tp, backend="torch")
        with tp.use_backend("torch"):
            ops.all_reduce(x, tp)
        ops.all_reduce(x.double(), tp)
        ops.all_reduce(x, gloo_only)
        seen["wide rows"] = ops.allreduce_residual_rmsnorm(torch.ones(1, wide), torch.ones(1, wide), torch.ones(wide),
                                                           1e-6, tp)[1].tolist() == [[float(tp.world_size + 1)] * wide]
        with pytest.raises(ValueError, match="weight"):
            ops.allreduce_residual_rmsnorm(x, residual, weight[:-1], 1e-6, tp)
        seen["all"] = list(handed_to_python)
    finally:
        _C.set_cpu_collective_fallbacks(native._all_reduce, native._all_reduce_inplace,
                                        native._allreduce_residual_rmsnorm)
        gloo_only.close()
    python_sum = tp.communicator_for(x).all_reduce(x)
    python_fused = tp.communicator_for(x).allreduce_residual_rmsnorm(x, residual, weight, 1e-6)
    same = (torch.equal(native_sum, python_sum) and torch.equal(native_inplace, python_sum)
            and all(map(torch.equal, native_fused, python_fused)))
    return seen, same


def test_cpu_ops_skip_python_for_shm_groups(seed):
    """all_reduce / all_reduce_ / allreduce_residual_rmsnorm on a group whose chain picks shm run in C++
    (csrc/cpu/shm_ops.cpp); everything else (another backend named or forced) reaches the Python chain,
    errors included."""
    for rank, (seen, same) in enumerate(spawn_ranks(2, _native_path_rank, seed)):
        assert seen["shm group, plain calls"] == [], f"rank {rank}: plain shm calls went through Python"
        assert seen["all"] == [("all_reduce", True, "torch", "torch.float32"),
                               ("all_reduce_", True, "torch", "torch.float32"),
                               ("all_reduce", True, "auto", "torch.float32"),  # inside use_backend("torch")
                               ("all_reduce", True, "auto", "torch.float64"),
                               ("all_reduce", False, "auto", "torch.float32"),
                               ("fused", True, 50)], f"rank {rank}: {seen['all']}"
        assert seen["wide rows"], f"rank {rank}: rows wider than a slot (served in C++ too) summed wrong"
        assert same, f"rank {rank}: the C++ path and the Python chain disagree"


def _learned_stores_rank(tp, seed, n_calls):
    """Two-shot calls large enough to be timed, with publish_stores="auto": rank 0 must measure both kinds
    of stores, and every result must be exact while the ranks switch (integer-valued inputs)."""
    comm = ShmCommunicator(tp.process_group, tp.rank, tp.world_size, f"{tp.name}/test-learned-stores",
                           slot_bytes=64 << 10)
    assert comm.publish_stores == "auto"
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(16 << 10, 32 << 10, (n_calls,), generator=g).tolist()  # fp32: 64-128 KiB, one class
    wrong = 0
    try:
        for call, numel in enumerate(sizes):
            x = (torch.arange(numel, dtype=torch.float32) % 31) + (call % 5 + tp.rank)
            expected = (torch.arange(numel, dtype=torch.float32) % 31) * tp.world_size + (
                (call % 5) * tp.world_size + tp.world_size * (tp.world_size - 1) // 2)
            wrong += not torch.equal(comm.all_reduce(x), expected)
        return wrong, comm._native.store_estimates(64 << 10)
    finally:
        comm.close()


@pytest.mark.parametrize("world_size", [2, 4])
def test_learned_store_kind_is_exact_and_measures_both(world_size, seed):
    results = spawn_ranks(world_size, _learned_stores_rank, seed, 64)
    for rank, (wrong, _) in enumerate(results):
        assert wrong == 0, f"rank {rank}: {wrong} wrong results"
    ordinary, non_temporal = results[0][1]
    assert ordinary > 0 and non_temporal > 0, "rank 0 must have timed both kinds of stores"
