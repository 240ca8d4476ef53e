"""The fused GEMM + collective Triton kernels compiled on a GPU, over CUDA-IPC symmetric buffers: parity
with the float64 reference (every op, fp32/fp16/bf16, decode and prefill shapes, 2 and 4 ranks) and with
NCCL, 1,000 back-to-back calls, a CUDA graph capture replayed with fresh inputs, and the timeout of a rank
that never arrives (its waits give up, the output is NaN, the next check raises naming it, and the CUDA
context stays usable: the kernels do not trap), and the ops taking the fused kernel for a group with
symmetric buffers.

Runs on one GPU too: the ranks are processes (conftest.spawn_ranks) on device rank % device_count,
mapping each other's buffers through CUDA IPC, which works between processes on the same device. Kernels
of different processes on one GPU time-slice rather than run at once, so a wait may last a context switch:
slow, the same protocol. Parity with NCCL needs one GPU per rank (NCCL refuses two ranks on one device).

    python -m pytest tests/gpu/test_gemm_collective_gpu.py -q
"""
import pytest
import torch
import torch.distributed as dist

from conftest import spawn_ranks
from gemm_collective_cases import OPS, call, check, make_case, poisoned_empty, rank_inputs

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TIMEOUT_S = 30.0


@pytest.fixture(autouse=True)
def _needs_cuda_and_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton", reason="the fused kernels are Triton kernels")


def _buffer(tp, timeout_s=TIMEOUT_S):
    from tp_kernels.comm.symmetric import SymmetricBuffer

    torch.cuda.set_device(tp.rank % torch.cuda.device_count())
    return SymmetricBuffer.create(tp, device="cuda", timeout_s=timeout_s, register=False)


def _run_cases_rank(tp, cases):
    buf = _buffer(tp)
    try:
        outs = []
        with poisoned_empty():
            for case in cases:
                outs.append(call(buf, case[0], *rank_inputs(case, tp.rank, "cuda")).cpu())
        buf.check()  # synchronizes; raises if any wait gave up
        return outs
    finally:
        buf.close()


def _parity_cases(world_size):
    """Every op and dtype, shapes rotating through the tile buckets (decode M = 1, M = 40, prefill M = 200),
    odd N and K, bias on every other case. Every launch has the same 8 rank lanes, so the 4-rank cases
    reuse the 2-rank compiles: each distinct case is a Triton compile (~1-3 s), which the GPU check's
    budget counts."""
    cases = []
    for i, (op, dtype) in enumerate((op, dtype) for op in OPS for dtype in DTYPES):
        if world_size > 2 and dtype != torch.bfloat16:
            continue
        rows = (1, 40, 200)[i % 3] * (world_size if op == "reduce_scatter" else 1)
        cases.append(make_case(op, rows, 300, 520, dtype, i % 2 == 0, world_size))
    return cases


@pytest.mark.parametrize("world_size", [2, 4])
def test_fused_ops_match_reference(world_size):
    cases = _parity_cases(world_size)
    check(cases, spawn_ranks(world_size, _run_cases_rank, cases))


def test_back_to_back_calls():
    """1,000 calls with changing ops and shapes, no reset pass between them. One dtype and shapes whose
    sizes share their divisibility, so that the 1,000 calls need 8 compiles (4 ops x 2 row buckets)."""
    cases = []
    for i in range(1000):
        op = OPS[i % 4]
        rows = (8, 24, 40, 56)[(i // 4) % 4] * (2 if op == "reduce_scatter" else 1)
        cases.append(make_case(op, rows, (64, 128)[(i // 16) % 2], (64, 128)[(i // 32) % 2], torch.bfloat16,
                               True, 2))
    check(cases, spawn_ranks(2, _run_cases_rank, cases), label="back-to-back ")


def _nccl_rank(tp, cases):
    """The fused all-reduce and reduce-scatter against NCCL's on the same partials (rounded to the
    dtype, summed in fp32), so the two differ only in the order of the fp32 sums."""
    buf = _buffer(tp)
    nccl = dist.new_group(list(range(tp.world_size)), backend="nccl")
    try:
        diffs = []
        for case in cases:
            op = case[0]
            x, w, bias = rank_inputs(case, tp.rank, "cuda")
            fused = call(buf, op, x, w, bias)
            partial = (x.float() @ w.float().T).to(x.dtype).float()
            dist.all_reduce(partial, group=nccl)
            if bias is not None:
                partial += bias.float()
            if op == "reduce_scatter":
                rows = partial.shape[0] // tp.world_size
                partial = partial[tp.rank * rows:(tp.rank + 1) * rows]
            diffs.append((fused.float() - partial.to(x.dtype).float()).abs().max().item())
        buf.check()
        return diffs
    finally:
        buf.close()
        dist.destroy_process_group(nccl)


def test_parity_with_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one GPU per rank (it refuses two ranks on one device)")
    cases = [make_case(op, 64, 256, 512, dtype, True, 2) for op in ("reduce_scatter", "one_shot", "two_shot")
             for dtype in DTYPES]
    for diffs in spawn_ranks(2, _nccl_rank, cases):
        for (op, dtype, *_), diff in zip(cases, diffs):
            # the same rounded partials: at most a couple of ulps of the output apart (sum order)
            assert diff <= {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 0.25}[dtype], (op, dtype, diff)


def _graph_rank(tp, cases, replays):
    """Capture one call of each op in a CUDA graph, replay it with fresh inputs copied in: the epochs live
    on the device, so every replay is a new call to the protocol."""
    buf = _buffer(tp)
    try:
        static = [rank_inputs(case, tp.rank, "cuda") for case in cases[0]]
        for case, (x, w, bias) in zip(cases[0], static):  # compile, and warm the allocator, outside capture
            call(buf, case[0], x, w, bias)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [call(buf, case[0], x, w, bias) for case, (x, w, bias) in zip(cases[0], static)]
        results = []
        for replay_cases in cases[1:replays + 1]:
            for case, (x, w, bias) in zip(replay_cases, static):
                new_x, new_w, new_bias = rank_inputs(case, tp.rank, "cuda")
                x.copy_(new_x)
                w.copy_(new_w)
                if bias is not None:
                    bias.copy_(new_bias)
            graph.replay()
            results.append([o.cpu() for o in outs])
        buf.check()
        return results
    finally:
        buf.close()


def test_cuda_graph_capture_and_replay():
    replays = 5

    def one_set():
        return [make_case("reduce_scatter", 8, 96, 64, torch.bfloat16, True, 2),
                make_case("one_shot", 3, 96, 64, torch.float16, True, 2),
                make_case("two_shot", 5, 70, 64, torch.float32, False, 2),
                make_case("allgather", 4, 96, 64, torch.bfloat16, True, 2)]

    cases = [one_set() for _ in range(replays + 1)]
    per_rank = spawn_ranks(2, _graph_rank, cases, replays)
    for r in range(replays):
        check(cases[r + 1], [per_rank[rank][r] for rank in range(2)], label=f"replay {r} ")


def _timeout_rank(tp, timeout_s):
    from tp_kernels.comm.symmetric import SymmetricBufferError

    buf = _buffer(tp, timeout_s)
    try:
        if tp.rank == 1:
            return None  # never arrives
        x, w = torch.randn(3, 64, device="cuda"), torch.randn(32, 64, device="cuda")
        y = call(buf, "one_shot", x, w, None)  # asynchronous: the kernel gives up after the timeout
        with pytest.raises(SymmetricBufferError, match="rank 1 did not arrive") as failure:
            buf.check()
        with pytest.raises(SymmetricBufferError, match="unusable after an earlier failure"):
            call(buf, "one_shot", x, w, None)
        usable = torch.ones(4, device="cuda").add_(1).sum().item()  # no trap: the context still works
        return str(failure.value), bool(torch.isnan(y.cpu()).all()), usable
    finally:
        buf.close()


def test_rank_that_never_arrives_is_named_and_the_context_survives():
    message, all_nan, usable = spawn_ranks(2, _timeout_rank, 2.0)[0]
    assert "TP_KERNELS_COMM_TIMEOUT" in message
    assert all_nan, "tiles that waited in vain must be NaN, not partial sums"
    assert usable == 8.0


def _ops_rank(tp, cases):
    """The ops on CUDA with the group's buffers registered: the fused kernel serves them (the buffer
    counts its calls) where the cost model prefers it, which it does at these prefill shapes."""
    from tp_kernels import ops
    from tp_kernels.comm.symmetric import SymmetricBuffer

    torch.cuda.set_device(tp.rank % torch.cuda.device_count())
    buf = SymmetricBuffer.create(tp, device="cuda", timeout_s=TIMEOUT_S)  # registered under tp.name
    try:
        fns = {"two_shot": ops.gemm_allreduce, "reduce_scatter": ops.gemm_reduce_scatter,
               "allgather": ops.allgather_gemm}
        outs, fused_calls = [], []
        for case in cases:
            before = buf.calls
            outs.append(fns[case[0]](*rank_inputs(case, tp.rank, "cuda"), tp).cpu())
            fused_calls.append(buf.calls - before)
        buf.check()
        return outs, fused_calls
    finally:
        buf.close()


def test_ops_take_the_fused_kernel_on_cuda():
    cases = [make_case("two_shot", 1024, 1024, 512, torch.bfloat16, True, 2),
             make_case("reduce_scatter", 1024, 1024, 512, torch.float16, True, 2),
             make_case("allgather", 512, 1024, 1024, torch.bfloat16, True, 2)]
    per_rank = spawn_ranks(2, _ops_rank, cases)
    check(cases, [outs for outs, _ in per_rank])
    assert all(calls == [1, 1, 1] for _, calls in per_rank), per_rank[0][1]
