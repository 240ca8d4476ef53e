"""The CUDA pipelines of the overlapped ops (tp_kernels.ops.overlap_cuda): correctness of the two-stream
schedule for every chunk count, CUDA-graph capture and replay, (with 2+ GPUs) NCCL ranks against the
float64 reference, and the CUDA IPC all-reduce serving the pipeline's chunks, eager and captured (on any
number of GPUs, one included: tests/gpu/ranks.py). Skipped without CUDA; run on a GPU node with
`pytest tests/gpu -q`.

Outputs are poisoned: deterministic mode makes torch.empty fill the ops' output buffers with NaN.
"""
import datetime
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from conftest import assert_close, requires_cuda
from ranks import run_on_gpus
from tp_kernels import ops, reference
from tp_kernels.comm.base import Communicator, IdentityCommunicator, TorchCommunicator
from tp_kernels.distributed import TPGroup

pytestmark = [pytest.mark.gpu, requires_cuda]
OPS = ("gemm_allreduce", "gemm_reduce_scatter", "allgather_gemm")


@pytest.fixture(autouse=True)
def _poison_empty():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous)


def _expected_single(op, x, w, b):
    x64, w64, b64 = x.double(), w.double(), None if b is None else b.double()
    if op == "allgather_gemm":
        return reference.allgather_gemm([x64], w64, b64)
    return reference.gemm_allreduce([x64], [w64], b64)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_streams_pipeline_matches_reference(op, dtype):
    tp = TPGroup.single()
    m, n, k = 37, 96, 128  # odd M: chunks of unequal size
    for chunks in (1, 2, 3, 8, None):
        for with_bias in (True, False):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            w = torch.randn(n, k, dtype=dtype, device="cuda")
            b = torch.randn(n, dtype=dtype, device="cuda") if with_bias else None
            y = getattr(ops, op)(x, w, b, tp, chunks)
            torch.cuda.synchronize()
            assert_close(y.cpu(), _expected_single(op, x, w, b).cpu(), dtype, k, msg=f"{op} chunks={chunks}")


@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_capture_and_replay(op):
    tp = TPGroup.single()
    x = torch.randn(64, 128, device="cuda")
    w = torch.randn(96, 128, device="cuda")
    b = torch.randn(96, device="cuda")
    fn = getattr(ops, op)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
        fn(x, w, b, tp, 4)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn(x, w, b, tp, 4)
    for _ in range(2):
        x.copy_(torch.randn_like(x))  # new values in the captured input
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y.cpu(), _expected_single(op, x, w, b).cpu(), torch.float32, 128, msg=f"{op} graph replay")


def _nccl_rank(rank, world_size, init_file, cases, results):
    torch.cuda.set_device(rank)
    tp = TPGroup.init(rank=rank, world_size=world_size, backend="nccl", init_method=f"file://{init_file}")
    torch.use_deterministic_algorithms(True, warn_only=True)
    outs = []
    for op, chunks, xs, ws, bs in cases:
        y = getattr(ops, op)(xs[rank].cuda(), ws[rank].cuda(), None if bs[rank] is None else bs[rank].cuda(),
                             tp, chunks)
        outs.append(y.cpu())
    results.put((rank, outs))
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs for NCCL ranks")
def test_nccl_ranks_match_reference():
    world_size = min(4, torch.cuda.device_count())
    cases = []
    for op in OPS:
        for chunks in (1, 3, None):
            rows = 5 * world_size
            xs = [torch.randn(rows, 64) for _ in range(world_size)]
            ws = [torch.randn(48, 64) for _ in range(world_size)]
            bias = torch.randn(48)
            bs = [torch.randn(48) for _ in range(world_size)] if op == "allgather_gemm" else [bias] * world_size
            cases.append((op, chunks, xs, ws, bs))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_nccl_rank, args=(r, world_size, os.path.join(tmp, "init"), cases, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outs = dict(results.get(timeout=datetime.timedelta(minutes=5).total_seconds()) for _ in procs)
        for p in procs:
            p.join()
    for rank in range(world_size):
        for (op, chunks, xs, ws, bs), y in zip(cases, outs[rank]):
            x64, w64 = [x.double() for x in xs], [w.double() for w in ws]
            if op == "gemm_allreduce":
                expected = reference.gemm_allreduce(x64, w64, bs[rank].double())
            elif op == "gemm_reduce_scatter":
                expected = reference.gemm_reduce_scatter(x64, w64, bs[rank].double())[rank]
            else:
                expected = reference.allgather_gemm(x64, w64[rank], bs[rank].double())
            assert_close(y, expected, torch.float32, 64 * world_size, msg=f"{op} rank {rank} chunks={chunks}")


class _Counting(Communicator):
    """Forwards to a communicator and counts its all-reduces: proves which backend served the pipeline."""

    def __init__(self, inner):
        self.inner, self.calls, self.name = inner, 0, inner.name

    def applies(self, x):
        return self.inner.applies(x)

    def all_reduce(self, x):
        self.calls += 1
        return self.inner.all_reduce(x)

    def close(self):
        self.inner.close()


def _ipc_under_overlap(rank):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # torch.empty fills NaN: unwritten rows show
    try:
        ipc = _Counting(rank.ipc_communicator())
        fallback = TorchCommunicator(rank.nccl if rank.nccl is not None else rank.tp.process_group)
        tp = TPGroup(rank=rank.rank, world_size=rank.world_size, name=f"ipc-overlap-{rank.world_size}",
                     process_group=rank.tp.process_group,
                     communicators=[IdentityCommunicator(rank.world_size), ipc, fallback])
        m, n, k, chunks = 64, 256, 128, 4  # k: this rank's shard of the input features
        g = torch.Generator().manual_seed(rank.rank)
        x = torch.randn(m, k, generator=g).to(rank.device)
        w = torch.randn(n, k, generator=g).to(rank.device)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(99)).to(rank.device)

        def check(y, msg):
            expected = reference.gemm_allreduce([xi.double() for xi in rank.gather(x)],
                                                [wi.double() for wi in rank.gather(w)], bias.double())
            assert_close(y, expected, torch.float32, k * rank.world_size, msg=f"{msg} rank {rank.rank}")

        check(ops.gemm_allreduce(x, w, bias, tp, chunks), "eager")
        eager_calls = ipc.calls
        graph = torch.cuda.CUDAGraph()
        with ipc.inner.capture():  # the chunks' all-reduces run on the communication stream, captured
            with torch.cuda.graph(graph):
                y = ops.gemm_allreduce(x, w, bias, tp, chunks)
        captured_slots = ipc.inner._graphs.next_slot - 1
        for step in range(2):
            x.copy_(torch.randn(m, k, generator=g).to(rank.device))
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            check(y, f"replay {step}")
        ipc.inner.release_graph_buffers()  # the peers unmap this graph's memory before it is freed
        del graph
        tp.close()  # closes the IPC communicator (collective)
        return eager_calls, captured_slots
    finally:
        torch.use_deterministic_algorithms(previous)  # the rank processes are pooled


@pytest.mark.parametrize("world_size", [2, 4])
def test_ipc_all_reduce_under_the_overlap_pipeline(world_size):
    # one IPC all-reduce per chunk, eager and captured (each captured call in a slot of its own)
    assert run_on_gpus(world_size, _ipc_under_overlap) == [(4, 4)] * world_size
