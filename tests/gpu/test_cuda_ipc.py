"""The CUDA IPC all-reduce kernels on a multi-GPU node: parity with NCCL and the float64 reference for
sizes (odd ones, both algorithms, up to the buffer) and dtypes, the fused residual + RMSNorm epilogue,
CUDA-graph capture and replay (registered and staged inputs), back-to-back calls, and the barrier timeout.

Run on a node with >= 2 GPUs:  .venv/bin/python -m pytest tests/gpu/test_cuda_ipc.py -q
Each test spawns CPU (gloo) ranks with conftest.spawn_ranks; rank r uses cuda:r and an NCCL group for
the comparison.
"""
import functools

import pytest
import torch
import torch.distributed as dist

from conftest import assert_close, spawn_ranks
from tp_kernels import _extension, reference
from tp_kernels.comm import ipc_plan
from tp_kernels.comm.cuda_ipc import CudaIpcCommunicator
from tp_kernels.comm.ipc_plan import ONE_SHOT, TWO_SHOT

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_NCCL = {}  # per rank process: the NCCL group over the same ranks


def _world_sizes():
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [w for w in (2, 4) if w <= n_gpus]


@pytest.fixture(autouse=True)
def _needs_gpus_and_build():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs >= 2 CUDA GPUs on one node")
    if not _extension.built_with_cuda():
        pytest.skip("tp_kernels._C was built without CUDA")


def nan_filled_empty(fn):
    """Run a rank function in deterministic mode, where torch.empty fills new tensors with NaN, so an
    output element a kernel does not write shows; restored afterwards (the rank processes are pooled)."""

    @functools.wraps(fn)
    def wrapper(*args):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return fn(*args)
        finally:
            torch.use_deterministic_algorithms(previous)

    return wrapper


def _setup(tp):
    """This rank's device, IPC communicator and NCCL group (made once per rank process)."""
    torch.cuda.set_device(tp.rank)
    if tp.world_size not in _NCCL:
        _NCCL[tp.world_size] = dist.new_group(list(range(tp.world_size)), backend="nccl")
    comm = CudaIpcCommunicator.create(tp)
    if comm is None:
        raise RuntimeError("CudaIpcCommunicator.create declined on a multi-GPU node (see the warning)")
    return comm, _NCCL[tp.world_size]


def _inputs(rank, case, numel, dtype):
    g = torch.Generator().manual_seed(1000 * case + rank)
    return torch.randn(numel, generator=g, dtype=torch.float32).to(dtype)


def _gather(t, nccl):
    """Every rank's t, rank order (to build the reference and compare bits inside the ranks: shipping
    the tensors of every case back to the test process would move gigabytes)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(nccl))]
    dist.all_gather(parts, t.contiguous(), group=nccl)
    return parts


# ----------------------------------------------------------------------------------------------------------
# plain all-reduce: both algorithms, many sizes, every dtype; vs NCCL and the fp64 reference
# ----------------------------------------------------------------------------------------------------------
SIZES = [1, 7, 37, 4096, 4096 + 3, 65_536 + 1, 2**20 + 5]


@nan_filled_empty
def _all_reduce_cases(tp):
    comm, nccl = _setup(tp)
    # the chain's predicate: what the buffer holds goes to IPC, anything larger to NCCL
    fits = torch.empty(ipc_plan.DEFAULT_BUFFER_BYTES // 4, device="cuda")
    assert comm.applies(fits) and not comm.applies(torch.empty(fits.numel() + 1, device="cuda"))
    assert not comm.applies(fits.double()[:16]) and not comm.applies(fits.cpu())
    n_cases, case = 0, 0
    for dtype in DTYPES:
        max_numel = ipc_plan.DEFAULT_BUFFER_BYTES // torch.empty((), dtype=dtype).element_size()
        for numel in SIZES + [max_numel]:
            for algo in (None, ONE_SHOT, TWO_SHOT):
                case += 1
                msg = f"{numel} x {dtype} algo={algo} rank {tp.rank}"
                x = _inputs(tp.rank, case, numel, dtype).cuda()
                y = comm.all_reduce(x, algo)  # its output is NaN until written (nan_filled_empty)
                y_nccl = x.float()
                dist.all_reduce(y_nccl, group=nccl)
                expected = reference.all_reduce([xi.double() for xi in _gather(x, nccl)])
                assert_close(y, expected, dtype, reduction_len=tp.world_size, msg=msg)
                assert_close(y_nccl.to(dtype), expected, dtype, reduction_len=tp.world_size, msg=msg + " (NCCL)")
                assert all(torch.equal(y, yr) for yr in _gather(y, nccl)), f"{msg}: ranks hold different bits"
                n_cases += 1
    comm.close()
    return n_cases


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_matches_nccl_and_reference(world_size):
    if world_size not in _world_sizes():
        pytest.skip(f"needs {world_size} GPUs")
    expected_cases = len(DTYPES) * (len(SIZES) + 1) * 3
    assert spawn_ranks(world_size, _all_reduce_cases) == [expected_cases] * world_size


# ----------------------------------------------------------------------------------------------------------
# fused residual + RMSNorm epilogue
# ----------------------------------------------------------------------------------------------------------
FUSED_SHAPES = [(1, 4096), (5, 1024), (16, 4096), (129, 2048)]


@nan_filled_empty
def _fused_cases(tp):
    comm, nccl = _setup(tp)
    n_cases, case = 0, 0
    for dtype in DTYPES:
        for n_rows, hidden in FUSED_SHAPES:
            for algo in (ONE_SHOT, TWO_SHOT):
                case += 1
                msg = f"({n_rows}, {hidden}) {dtype} algo={algo} rank {tp.rank}"
                x = _inputs(tp.rank, case, n_rows * hidden, dtype).view(n_rows, hidden).cuda()
                residual = _inputs(99, case, n_rows * hidden, dtype).view(n_rows, hidden).cuda()
                weight = _inputs(98, case, hidden, dtype).cuda()
                normed, new_residual = comm.allreduce_residual_rmsnorm(x, residual, weight, 1e-6, algo)
                normed_ref, residual_ref = reference.allreduce_residual_rmsnorm(
                    [xi.double() for xi in _gather(x, nccl)], residual.double(), weight.double(), 1e-6)
                assert_close(new_residual, residual_ref, dtype, reduction_len=tp.world_size, msg=msg + " new_residual")
                assert_close(normed, normed_ref, dtype, reduction_len=tp.world_size, msg=msg + " normed")
                n_cases += 1
    comm.close()
    return n_cases


@pytest.mark.parametrize("world_size", [2, 4])
def test_fused_epilogue_matches_reference(world_size):
    if world_size not in _world_sizes():
        pytest.skip(f"needs {world_size} GPUs")
    expected_cases = len(DTYPES) * len(FUSED_SHAPES) * 2
    assert spawn_ranks(world_size, _fused_cases) == [expected_cases] * world_size


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------------------
@nan_filled_empty
def _graph_cases(tp):
    comm, _ = _setup(tp)
    hidden = 2048
    static_x = torch.zeros(8, hidden, dtype=torch.bfloat16, device="cuda")
    backing = torch.zeros(8 * hidden + 1, dtype=torch.bfloat16, device="cuda")
    misaligned = backing[1:].view(8, hidden)  # 2 bytes past a boundary: staged even under capture
    residual = torch.zeros_like(static_x)
    weight = torch.ones(hidden, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graph requires
        comm.all_reduce(static_x)
        comm.all_reduce(misaligned)
        comm.allreduce_residual_rmsnorm(static_x, residual, weight, 1e-6)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with comm.capture():
        with torch.cuda.graph(graph):
            y = comm.all_reduce(static_x)
            y_staged = comm.all_reduce(misaligned)
            normed, new_residual = comm.allreduce_residual_rmsnorm(static_x, residual, weight, 1e-6)
    results = []
    for step in range(3):
        static_x.copy_(_inputs(tp.rank, step, static_x.numel(), torch.bfloat16).view_as(static_x))
        misaligned.copy_(_inputs(tp.rank, 100 + step, static_x.numel(), torch.bfloat16).view_as(static_x))
        residual.copy_(_inputs(99, step, static_x.numel(), torch.bfloat16).view_as(static_x))
        for out in (y, y_staged, normed, new_residual):
            out.fill_(float("nan"))  # poison: a replay that writes nothing shows
        graph.replay()
        torch.cuda.synchronize()
        results.append(tuple(t.cpu().clone() for t in (static_x, misaligned, residual, y, y_staged, normed,
                                                        new_residual)))
    registered = comm._impl.n_registered_buffers()
    del graph
    comm.close()
    return results, registered


def test_graph_capture_and_replay():
    world_size = 2
    per_rank = spawn_ranks(world_size, _graph_cases)
    for rank, (_, registered) in enumerate(per_rank):
        assert registered == 1, f"rank {rank}: static_x should be the one registered address, got {registered}"
    for step in range(3):
        steps = [r[0][step] for r in per_rank]
        expected = reference.all_reduce([s[0].double() for s in steps])
        expected_staged = reference.all_reduce([s[1].double() for s in steps])
        normed_ref, residual_ref = reference.allreduce_residual_rmsnorm(
            [s[0].double() for s in steps], steps[0][2].double(), torch.ones(2048, dtype=torch.float64), 1e-6)
        for rank, s in enumerate(steps):
            msg = f"replay {step} rank {rank}"
            assert_close(s[3], expected, torch.bfloat16, reduction_len=world_size, msg=msg)
            assert_close(s[4], expected_staged, torch.bfloat16, reduction_len=world_size, msg=msg + " staged")
            assert_close(s[5], normed_ref, torch.bfloat16, reduction_len=world_size, msg=msg + " normed")
            assert_close(s[6], residual_ref, torch.bfloat16, reduction_len=world_size, msg=msg + " residual")


# ----------------------------------------------------------------------------------------------------------
# many back-to-back calls, and a rank that never arrives
# ----------------------------------------------------------------------------------------------------------
@nan_filled_empty
def _back_to_back(tp, n_calls):
    comm, _ = _setup(tp)
    g = torch.Generator().manual_seed(7)  # the same size sequence on every rank
    sizes = torch.randint(1, 300_000, (n_calls,), generator=g).tolist()
    wrong = torch.zeros(n_calls, dtype=torch.int64, device="cuda")  # counted on the GPU: no sync per call
    for i, numel in enumerate(sizes):
        # rank r contributes r + i % 64: small integers, so the fp32 sum is exact
        x = torch.full((numel,), float(tp.rank + i % 64), device="cuda")
        expected = float(sum(r + i % 64 for r in range(tp.world_size)))
        wrong[i] = (comm.all_reduce(x) != expected).sum()
    bad = torch.nonzero(wrong).flatten().tolist()
    comm.close()
    return bad


def test_ten_thousand_back_to_back_calls():
    for rank, bad in enumerate(spawn_ranks(2, _back_to_back, 10_000)):
        assert bad == [], f"rank {rank}: corrupted results at calls {bad}"


def _one_rank_missing(tp):
    comm, _ = _setup(tp)
    comm.timeout_ms = 2000
    if tp.rank == 1:
        return "absent"
    comm.all_reduce(torch.ones(1024, device="cuda"))
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        pass  # the kernel trapped; the message that names the rank comes from the communicator
    with pytest.raises(RuntimeError, match="rank 1 did not arrive") as excinfo:
        comm.all_reduce(torch.ones(1024, device="cuda"))
    return str(excinfo.value)


def test_barrier_times_out_naming_the_missing_rank():
    # fresh ranks: the trapped kernel leaves rank 0's CUDA context unusable
    results = spawn_ranks(2, _one_rank_missing, fresh=True)
    assert results[1] == "absent" and "rank 1 did not arrive" in results[0]
