"""The overlapped GEMM + collective ops (gemm_allreduce, gemm_reduce_scatter, allgather_gemm) on CPU ranks
at world sizes 1, 2 and 4: every chunk count 1..8 and None, odd M, with and without bias, fp32/fp16/bf16,
against the float64 reference; opcheck; bad input; the communication thread's error handling.

Outputs are poisoned: the ops run with torch's deterministic mode, whose fill_uninitialized_memory fills
every torch.empty (the ops' output buffers) with NaN, so a row a chunk forgets to write fails
assert_close's finiteness check.
"""
import contextlib
import os

import pytest
import torch

from conftest import assert_close, spawn_ranks
from tp_kernels import ops, reference
from tp_kernels.perf import calibration
from tp_kernels.comm.base import Communicator, IdentityCommunicator
from tp_kernels.distributed import TPGroup
from tp_kernels.ops import overlap_plan

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNKS = (1, 2, 3, 5, 8, None)
OPS = ("gemm_allreduce", "gemm_reduce_scatter", "allgather_gemm")


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty returns NaN-filled memory inside this block (see the module docstring)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _cases(world_size, op):
    """(dtype, chunks, bias?, M, inputs) cases; M is odd when the op allows it (M per rank for the
    gather, M divisible by p for the scatter)."""
    cases = []
    n, k_per_rank = 12, 24
    for dtype in DTYPES:
        for chunks in CHUNKS:
            for with_bias in (True, False):
                rows = 7 if op != "gemm_reduce_scatter" else 7 * world_size  # odd rows per rank
                if op == "allgather_gemm":
                    xs = [torch.randn(rows, k_per_rank, dtype=dtype) for _ in range(world_size)]
                    ws = [torch.randn(n, k_per_rank, dtype=dtype) for _ in range(world_size)]
                    biases = [torch.randn(n, dtype=dtype) if with_bias else None for _ in range(world_size)]
                else:
                    xs = [torch.randn(rows, k_per_rank, dtype=dtype) for _ in range(world_size)]
                    ws = [torch.randn(n, k_per_rank, dtype=dtype) for _ in range(world_size)]
                    bias = torch.randn(n, dtype=dtype) if with_bias else None
                    biases = [bias] * world_size
                cases.append((dtype, chunks, xs, ws, biases))
    return cases


def _run_cases_rank(tp, op, cases, cache_dir):
    os.environ[calibration.CACHE_ENV] = cache_dir  # a calibration would write here: the test checks none does
    fn = getattr(ops, op)
    outs = []
    with poisoned_empty():
        for dtype, chunks, xs, ws, biases in cases:
            outs.append(fn(xs[tp.rank], ws[tp.rank], biases[tp.rank], tp, chunks))
    return outs


def _expected(op, world_size, rank, xs, ws, biases):
    xs64 = [x.double() for x in xs]
    bias64 = None if biases[rank] is None else biases[rank].double()
    if op == "gemm_allreduce":
        return reference.gemm_allreduce(xs64, [w.double() for w in ws], bias64), xs[0].shape[1] * world_size
    if op == "gemm_reduce_scatter":
        blocks = reference.gemm_reduce_scatter(xs64, [w.double() for w in ws], bias64)
        return blocks[rank], xs[0].shape[1] * world_size
    return reference.allgather_gemm(xs64, ws[rank].double(), bias64), xs[0].shape[1]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference(world_size, op, tmp_path):
    cases = _cases(world_size, op)
    per_rank = spawn_ranks(world_size, _run_cases_rank, op, cases, str(tmp_path))
    for rank, outs in enumerate(per_rank):
        for (dtype, chunks, xs, ws, biases), y in zip(cases, outs):
            expected, reduction_len = _expected(op, world_size, rank, xs, ws, biases)
            assert y.dtype == dtype
            assert_close(y, expected, dtype, reduction_len,
                         msg=f"{op} rank {rank}/{world_size} chunks={chunks} bias={biases[rank] is not None}")
    assert os.listdir(tmp_path) == [], "chunks=None must not calibrate (no file written)"
    # the reductions hold the same bits on every rank
    if op == "gemm_allreduce":
        for outs in per_rank[1:]:
            assert all(torch.equal(a, b) for a, b in zip(per_rank[0], outs))


def _errors_rank(tp):
    """Bad input raises the same ValueError on every rank, before any collective."""
    x, w = torch.randn(5, 8), torch.randn(6, 8)
    messages = []
    for call in (lambda: ops.gemm_reduce_scatter(x, w, None, tp),  # 5 rows over 2 ranks
                 lambda: ops.gemm_allreduce(x, w, None, tp, 0),
                 lambda: ops.allgather_gemm(x, torch.randn(6, 9), None, tp),
                 lambda: ops.gemm_allreduce(x, w, torch.randn(7), tp, 2),
                 lambda: ops.allgather_gemm(x, w.half(), None, tp, 2)):
        with pytest.raises(ValueError) as info:
            call()
        messages.append(str(info.value))
    # the group still works afterwards: no collective was left half-issued
    y = ops.gemm_allreduce(x, w, None, tp, 3)
    return messages, y


def test_bad_input_raises_clear_errors():
    (messages, y), _ = spawn_ranks(2, _errors_rank)
    assert "divisible by the world size 2" in messages[0] and "M = 5" in messages[0]
    assert "chunks must be >= 1" in messages[1]
    assert "w must be (N, K=8)" in messages[2]
    assert "bias must be (N,) = (6,)" in messages[3]
    assert "w must have the dtype of x" in messages[4]
    assert torch.isfinite(y).all()


def _opcheck_rank(tp, chunk_counts):
    x, w, b = torch.randn(6, 8), torch.randn(5, 8), torch.randn(5)
    for op in OPS:
        for chunks in chunk_counts:
            torch.library.opcheck(getattr(torch.ops.tp_kernels, op), (x, w, b, tp.name, chunks))
    return True


def test_opcheck_single_rank():
    _opcheck_rank(TPGroup.single(), (None, 3))


def test_opcheck_two_ranks():
    # rank 1's outputs are where a view into a shared buffer would show (opcheck is ~1 s per op and
    # chunk count on these cores, so one pipelined count)
    assert spawn_ranks(2, _opcheck_rank, (3,)) == [True, True]


def test_chunk_bounds_cover_rows_without_gaps():
    for n_rows in (1, 7, 64):
        for n_chunks in range(1, min(n_rows, 8) + 1):
            bounds = overlap_plan.chunk_bounds(n_rows, n_chunks)
            assert bounds[0][0] == 0 and bounds[-1][1] == n_rows and len(bounds) == n_chunks
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


class _FailingCommunicator(Communicator):
    """Fails its second all-reduce; records how many ran to completion."""

    name = "failing"

    def __init__(self):
        self.calls, self.finished = 0, 0

    def applies(self, x):
        return True

    def all_reduce(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("injected failure of chunk 2")
        self.finished += 1
        return x.clone()


def test_comm_thread_error_propagates_after_every_chunk_finished():
    failing = _FailingCommunicator()
    tp = TPGroup(rank=0, world_size=1, name="test_overlap.failing", communicators=[failing])
    try:
        with pytest.raises(RuntimeError, match="injected failure of chunk 2"):
            ops.gemm_allreduce(torch.randn(8, 4), torch.randn(3, 4), None, tp, 4)
        # all four chunks were run (the error waited for the others), none is pending
        assert failing.calls == 4 and failing.finished == 3
        y = ops.gemm_allreduce(torch.ones(8, 4), torch.ones(3, 4), None, tp, 4)
        assert torch.equal(y, torch.full((8, 3), 4.0))
    finally:
        tp.close()


def test_world_size_one_chunks_none_is_one_chunk_and_exact():
    tp = TPGroup(rank=0, world_size=1, name="test_overlap.single", communicators=[IdentityCommunicator(1)])
    try:
        x = torch.randn(9, 16, dtype=torch.float64)
        w = torch.randn(4, 16, dtype=torch.float64)
        assert overlap_plan.plan_chunks(None, tp, x, 9, 4, 16, 9, "all_reduce") == 1
        torch.testing.assert_close(ops.gemm_allreduce(x, w, None, tp), x @ w.T, rtol=0, atol=1e-12)
    finally:
        tp.close()
