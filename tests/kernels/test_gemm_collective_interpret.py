"""The fused GEMM + collective kernels (tp_kernels/kernels/gemm_collective*.py) under TRITON_INTERPRET=1,
across real CPU rank processes that map each other's symmetric buffers (tp_kernels.comm.symmetric).

- every op (reduce-scatter, one-shot and two-shot all-reduce, all-gather) at 2 and 4 ranks against the
  float64 reference: fp32, fp16 and bf16 (upcast after the load), odd M, N and K, M = 1, a second
  column tile, one-row and empty owner blocks, with and without bias; the all-reduce holds the same bits
  on every rank;
- 200 back-to-back calls with changing ops and shapes (no reset between calls: epoch-tagged signals,
  alternating buffer halves), every output checked and rank-identical where it must be;
- a rank that never arrives, and a rank called with other shapes, make the others raise naming it after
  the timeout, and the buffer refuses further calls.

Outputs are poisoned: the ranks run under torch's deterministic mode, whose fill_uninitialized_memory
fills the launchers' new_empty outputs with NaN, so an unwritten element fails assert_close. Shapes are
tiny because the interpreter costs tens of milliseconds per program and 4 ranks share 2 cores.
"""
import time

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (absent with the CPU-only torch)")
if not triton.knobs.runtime.interpret:
    pytest.skip("TRITON_INTERPRET=0: these check the kernels in the interpreter on CPU ranks "
                "(tests/gpu/test_gemm_collective_gpu.py checks them compiled)", allow_module_level=True)

from conftest import assert_close, spawn_ranks  # noqa: E402
from gemm_collective_cases import call, check, make_case, poisoned_empty  # noqa: E402
from tp_kernels import reference  # noqa: E402
from tp_kernels.comm.symmetric import SymmetricBuffer, SymmetricBufferError  # noqa: E402
from tp_kernels.kernels import gemm_collective  # noqa: E402

TIMEOUT_S = 120.0  # the parity tests: generous, 4 interpreted ranks on 2 loaded cores
# The fault tests. A present rank must always publish within it, also when 4 interpreted ranks share 2
# loaded cores: at 1 s a present rank 2 was once named in place of the absent rank 3 (load average 9).
SHORT_TIMEOUT_S = 4.0


def _run_cases_rank(tp, cases, timeout_s):
    buf = SymmetricBuffer.create(tp, timeout_s=timeout_s, register=False)
    try:
        with poisoned_empty():
            return [call(buf, op, xs[tp.rank], ws[tp.rank], biases[tp.rank]) for op, _, xs, ws, biases in cases]
    finally:
        buf.close()


# (op, rows, N, K, dtype, bias). rows: M (a multiple of p for reduce_scatter, which gets 1, 3 or 5 rows per
# rank) or the gather's rows per rank. N = 67, 70 take a second 64-column tile; K is odd. Two-shot M = 5
# at 4 ranks leaves the last owner block empty, M = 1 all but one.
def _parity_cases(world_size):
    p = world_size
    specs = [("reduce_scatter", 3 * p, 67, 11, torch.float32, True),
             ("reduce_scatter", 1 * p, 9, 7, torch.float16, False),
             ("reduce_scatter", 5 * p, 9, 13, torch.bfloat16, True),
             ("one_shot", 1, 9, 11, torch.float32, True),
             ("one_shot", 5, 12, 7, torch.float16, False),
             ("one_shot", 3, 70, 9, torch.bfloat16, True),
             ("two_shot", 5, 9, 11, torch.float32, True),
             ("two_shot", 1, 12, 7, torch.float16, False),
             ("two_shot", 7, 9, 9, torch.bfloat16, True),
             ("allgather", 1, 9, 11, torch.float32, True),
             ("allgather", 3, 67, 7, torch.float16, False),
             ("allgather", 2, 9, 13, torch.bfloat16, True)]
    return [make_case(op, rows, n, k, dtype, bias, p) for op, rows, n, k, dtype, bias in specs]


@pytest.mark.parametrize("world_size", [2, 4])
def test_fused_ops_match_reference(world_size):
    cases = _parity_cases(world_size)
    check(cases, spawn_ranks(world_size, _run_cases_rank, cases, TIMEOUT_S))


def test_back_to_back_calls_with_changing_shapes():
    """200 calls, no pass between them: each call's signals carry its epoch and the buffer halves
    alternate, so stale words of call e never satisfy call e + 1, and a fast rank never overwrites what a
    slow one is still reading. The shapes keep each call at one or two programs per rank."""
    ops = ("one_shot", "reduce_scatter", "two_shot", "allgather")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    cases = []
    for i in range(200):
        op = ops[i % 4]
        rows = 2 * (1 + i % 3) if op == "reduce_scatter" else 1 + i % 5
        cases.append(make_case(op, rows, 3 + i % 13, 2 + i % 7, dtypes[i % 3], i % 2 == 0, 2))
    check(cases, spawn_ranks(2, _run_cases_rank, cases, TIMEOUT_S), label="back-to-back ")


# ----------------------------------------------------------------------------------------------------------
# faults: a rank that does not arrive, a rank called with other shapes
# ----------------------------------------------------------------------------------------------------------
def _fault_rank(tp, op, absent, mismatched, timeout_s):
    """Every rank makes a private buffer (collectively); rank `absent` then makes no call, rank
    `mismatched` calls with one more output column. Returns (first error, seconds waited, second error)."""
    buf = SymmetricBuffer.create(tp, timeout_s=timeout_s, register=False)
    try:
        if tp.rank == absent:
            return None
        n = 10 if tp.rank == mismatched else 9
        x, w = torch.randn(2 * tp.world_size, 5), torch.randn(n, 5)
        start = time.monotonic()
        with pytest.raises(SymmetricBufferError) as first:
            call(buf, op, x, w, None)
        waited = time.monotonic() - start
        with pytest.raises(SymmetricBufferError) as again:
            call(buf, op, x, w, None)
        return str(first.value), waited, str(again.value)
    finally:
        buf.close()  # a barrier: the absent rank waits here for the others to give up


@pytest.mark.parametrize("world_size,op", [(2, "reduce_scatter"), (4, "two_shot"), (4, "allgather")])
def test_rank_that_never_arrives_is_named(world_size, op):
    absent = world_size - 1
    results = spawn_ranks(world_size, _fault_rank, op, absent, None, SHORT_TIMEOUT_S)
    for rank, result in enumerate(results):
        if rank == absent:
            continue
        first, waited, again = result
        assert f"rank {absent} did not arrive within {SHORT_TIMEOUT_S:g} s" in first, f"rank {rank}: {first}"
        assert "TP_KERNELS_COMM_TIMEOUT" in first
        # relayed waits (two-shot) have twice the patience; the interpreter adds seconds on loaded cores
        assert SHORT_TIMEOUT_S <= waited < 2 * SHORT_TIMEOUT_S + 30, f"rank {rank} raised after {waited:.1f} s"
        assert "unusable after an earlier failure" in again and f"rank {absent}" in again


def test_rank_called_with_other_shapes_is_named():
    """Rank 1 asks for 10 output columns, rank 0 for 9: the signatures in their signals differ, so each
    times out naming the other instead of summing tiles of different shapes."""
    first0, _, _ = spawn_ranks(2, _fault_rank, "one_shot", None, 1, SHORT_TIMEOUT_S)[0]
    results = spawn_ranks(2, _fault_rank, "reduce_scatter", None, 1, SHORT_TIMEOUT_S)
    assert "rank 1 did not arrive" in first0 and "called with different arguments" in first0
    assert "rank 1 did not arrive" in results[0][0]
    assert "rank 0 did not arrive" in results[1][0]


# ----------------------------------------------------------------------------------------------------------
# one process: world size 1, argument checks, plans
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_buffer():
    from tp_kernels.distributed import TPGroup

    buf = SymmetricBuffer.create(TPGroup.single(), timeout_s=TIMEOUT_S, register=False)
    yield buf
    buf.close()


@pytest.mark.parametrize("op", ["reduce_scatter", "one_shot", "two_shot", "allgather"])
def test_world_size_one_is_the_linear_layer(single_buffer, op):
    x, w, bias = torch.randn(3, 10, dtype=torch.float16), torch.randn(5, 10, dtype=torch.float16), None
    if op != "two_shot":
        bias = torch.randn(5, dtype=torch.float16)
    with poisoned_empty():
        y = call(single_buffer, op, x, w, bias)
    expected = reference.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert_close(y, expected, torch.float16, 10)


def test_bad_arguments_raise_naming_them(single_buffer):
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"w must be \(N, K=8\)"):
        gemm_collective.gemm_all_reduce(x, torch.randn(6, 9), None, single_buffer)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        gemm_collective.gemm_all_reduce(x.double(), w.double(), None, single_buffer)
    with pytest.raises(ValueError, match="algo must be None or one of"):
        gemm_collective.gemm_all_reduce(x, w, None, single_buffer, "three_shot")
    with pytest.raises(ValueError, match="does not fit the group's symmetric buffer"):
        gemm_collective.gemm_all_reduce(torch.randn(1024, 8), torch.randn(1024, 8), None, single_buffer)
    with pytest.raises(TypeError, match="buffer must be a SymmetricBuffer"):
        gemm_collective.allgather_gemm(x, w, None, "group")


def test_plans_pick_the_algorithm_and_size_the_buffer():
    cpu = torch.device("cpu")
    # 2 ranks: one-shot always (the CUDA IPC all-reduce's rule: both move N bytes, one-shot waits once)
    assert gemm_collective.plan_gemm_reduce("all_reduce", 4096, 8192, 2, torch.bfloat16, cpu, False).mode == \
        gemm_collective.ONE_SHOT
    # 4 ranks: two-shot once the output passes the modeled crossover (1.5 MB on H100 constants)
    assert gemm_collective.plan_gemm_reduce("all_reduce", 1, 8192, 4, torch.bfloat16, cpu, False).mode == \
        gemm_collective.ONE_SHOT
    big = gemm_collective.plan_gemm_reduce("all_reduce", 4096, 8192, 4, torch.bfloat16, cpu, False)
    assert big.mode == gemm_collective.TWO_SHOT
    # two-shot holds a slot per source for its block of ceil(M / p) rows, plus the relayed (M, N)
    assert big.data_bytes == (4 * 1024 * 8192 + 4096 * 8192) * 2
    rs = gemm_collective.plan_gemm_reduce("reduce_scatter", 8, 9, 4, torch.float32, cpu, True)
    assert (rs.rows, rs.grid, rs.data_bytes) == (2, 4, 4 * 2 * 9 * 4)
    ag = gemm_collective.plan_allgather_gemm(3, 70, 11, 2, torch.float16, cpu)
    assert (ag.n_publish, ag.grid, ag.data_bytes) == (1, 1 + 2 * 2, 3 * 11 * 2)
    # what the ranks must agree on changes the signature; this rank's own N does not for the gather
    a = gemm_collective.plan_gemm_reduce("reduce_scatter", 8, 9, 4, torch.float32, cpu, True)
    assert a.signature != gemm_collective.plan_gemm_reduce("reduce_scatter", 8, 10, 4, torch.float32, cpu,
                                                             True).signature
    assert ag.signature == gemm_collective.plan_allgather_gemm(3, 71, 11, 2, torch.float16, cpu).signature


# ----------------------------------------------------------------------------------------------------------
# the ops' choice (tp_kernels/ops/gemm_collective_path.py), device-agnostic, run here on CPU ranks
# ----------------------------------------------------------------------------------------------------------
def _path_rank(tp, cases):
    from tp_kernels.perf import calibration, cost_model
    from tp_kernels.ops import gemm_collective_path as path

    calibration.set_hardware(tp, cost_model.HARDWARE["H100"])  # no CPU calibration: plan as on an H100
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    reasons = {"none": path.fused_reason(tp, x, w, None, None, "all_reduce")}
    buf = SymmetricBuffer.create(tp, timeout_s=TIMEOUT_S)  # registered: the group's buffers now
    try:
        reasons["chunks"] = path.fused_reason(tp, x, w, None, 2, "all_reduce")
        with tp.use_backend("torch"):
            reasons["forced"] = path.fused_reason(tp, x, w, None, None, "all_reduce")
        reasons["dtype"] = path.fused_reason(tp, x.double(), w.double(), None, None, "all_reduce")
        reasons["capacity"] = path.fused_reason(tp, torch.randn(4096, 8), torch.randn(4096, 8), None, None,
                                                "all_reduce")
        collectives = {"allgather": "all_gather", "reduce_scatter": "reduce_scatter", "two_shot": "all_reduce"}
        with poisoned_empty():
            outs = [path.fused_call(tp, xs[tp.rank], ws[tp.rank], biases[tp.rank], None, collectives[op])
                    for op, _, xs, ws, biases in cases]
        return reasons, outs
    finally:
        buf.close()
        calibration.set_hardware(tp, None)


def test_ops_take_the_fused_kernel_when_the_group_has_buffers():
    """2 ranks: the all-reduce of a small output is one-shot (the check compares with the reference
    either way), the reduce-scatter and the gather their own kernels; each result equals the op's."""
    cases = [make_case("two_shot", 6, 12, 9, torch.float16, True, 2),
             make_case("reduce_scatter", 4, 12, 9, torch.float32, True, 2),
             make_case("allgather", 3, 12, 9, torch.bfloat16, False, 2)]
    per_rank = spawn_ranks(2, _path_rank, cases)
    check(cases, [outs for _, outs in per_rank])
    reasons = per_rank[0][0]
    assert reasons["none"] == "the group has no symmetric buffers"
    assert reasons["chunks"] == "chunks=2 was asked for"
    assert reasons["forced"] == "use_backend('torch') forces the group's collectives"
    assert "dtype torch.float64" in reasons["dtype"]
    assert "needs" in reasons["capacity"] and "symmetric buffer" in reasons["capacity"]
