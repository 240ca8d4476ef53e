"""Cases, calls and checks shared by the fused GEMM + collective kernel tests: the interpreter ones
(tests/kernels/test_gemm_collective_interpret.py) and the GPU ones (tests/gpu/test_gemm_collective_gpu.py).

A case is (op, dtype, xs, ws, biases): every rank's inputs, so that each rank calls with its own and the
test process compares every rank's output with the float64 reference of the whole group."""
import contextlib

import torch

from conftest import assert_close
from tp_kernels import reference

OPS = ("reduce_scatter", "one_shot", "two_shot", "allgather")


def call(buf, op, x, w, bias):
    """One fused call on this rank: op is one of OPS (the all-reduce's algorithm forced)."""
    from tp_kernels.kernels import gemm_collective

    if op == "reduce_scatter":
        return gemm_collective.gemm_reduce_scatter(x, w, bias, buf)
    if op in ("one_shot", "two_shot"):
        return gemm_collective.gemm_all_reduce(x, w, bias, buf, op)
    return gemm_collective.allgather_gemm(x, w, bias, buf)


def make_case(op, rows, n, k, dtype, with_bias, world_size):
    """rows: M for the reductions (a multiple of world_size for reduce_scatter), rows per rank for the
    gather. The reductions' bias is the same on every rank (added once); the gather's is each rank's."""
    xs = [torch.randn(rows, k).to(dtype) for _ in range(world_size)]
    ws = [torch.randn(n, k).to(dtype) for _ in range(world_size)]
    if op == "allgather":
        biases = [torch.randn(n).to(dtype) if with_bias else None for _ in range(world_size)]
    else:
        bias = torch.randn(n).to(dtype) if with_bias else None
        biases = [bias] * world_size
    return op, dtype, xs, ws, biases


def rank_inputs(case, rank, device):
    """(x, w, bias) of one rank, on device."""
    _, _, xs, ws, biases = case
    bias = biases[rank]
    return xs[rank].to(device), ws[rank].to(device), None if bias is None else bias.to(device)


def expected(op, rank, xs, ws, biases):
    """(float64 reference of rank's output, reduction length for the tolerance)."""
    bias = None if biases[rank] is None else biases[rank].double()
    if op == "allgather":
        return reference.allgather_gemm([x.double() for x in xs], ws[rank].double(), bias), xs[0].shape[1]
    xs64, ws64 = [x.double() for x in xs], [w.double() for w in ws]
    k_total = sum(x.shape[1] for x in xs)
    if op == "reduce_scatter":
        return reference.gemm_reduce_scatter(xs64, ws64, bias)[rank], k_total
    return reference.gemm_allreduce(xs64, ws64, bias), k_total


def check(cases, per_rank, label=""):
    """Every rank's output of every case within the dtype's tolerance of the float64 reference; the
    all-reduce's outputs bit-identical across ranks."""
    for rank, outs in enumerate(per_rank):
        for i, ((op, dtype, xs, ws, biases), y) in enumerate(zip(cases, outs)):
            want, reduction_len = expected(op, rank, xs, ws, biases)
            assert y.dtype == dtype
            assert_close(y.cpu(), want, dtype, reduction_len,
                         msg=f"{label}call {i} {op} rank {rank}/{len(per_rank)} bias={biases[rank] is not None}")
    for i, (op, *_) in enumerate(cases):
        if op in ("one_shot", "two_shot"):
            assert all(torch.equal(per_rank[0][i], outs[i]) for outs in per_rank[1:]), f"call {i} {op} differs"


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty and new_empty return NaN-filled memory inside this block (torch's deterministic mode,
    fill_uninitialized_memory), so an output element a kernel does not write fails the checks."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
