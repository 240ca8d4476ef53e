"""The CUDA IPC all-reduce kernels on a GPU machine, one GPU included (ranks then share it: tests/gpu/ranks.py):
parity with the float64 reference (and NCCL where every rank has its own GPU) for sizes (odd ones, both
algorithms, up to the buffer) and dtypes; the fused residual + RMSNorm epilogue with rows whole and split over
blocks; back-to-back mixed calls; ranks made to lag; CUDA graphs (several, uneven allocations between ranks,
staged and in-place inputs mixed, capture outside capture(), replay on a side stream, re-capture after
release); a replay after release trapping with the slot named; and the barrier timeout with the peer alive.

Run on a GPU machine:  python -m pytest tests/gpu/test_cuda_ipc.py -q
Outputs are poisoned: deterministic mode makes torch.empty fill new tensors with NaN.
"""
import functools
import random
import time

import pytest
import torch
import torch.distributed as dist

from conftest import assert_close
from ranks import run_on_gpus
from tp_kernels import reference
from tp_kernels.comm import ipc_plan
from tp_kernels.comm.ipc_plan import ONE_SHOT, TWO_SHOT

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WORLD_SIZES = [2, 4]
EPS = 1e-6


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


def _inputs(seed, numel, dtype, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g, dtype=torch.float32).to(dtype).to(device)


def _check_same_bits(rank, t, msg):
    assert all(torch.equal(t, other) for other in rank.gather(t)), f"{msg}: ranks hold different bits"


# ----------------------------------------------------------------------------------------------------------
# plain all-reduce: both algorithms, many sizes, every dtype; vs the fp64 reference and NCCL
# ----------------------------------------------------------------------------------------------------------
SIZES = [1, 7, 37, 4096, 4096 + 3, 65_536 + 1, 2**20 + 5]


@nan_filled_empty
def _all_reduce_cases(rank):
    comm = rank.ipc_communicator()
    # the chain's predicate: what the buffer holds goes to IPC, anything larger to NCCL
    fits = torch.empty(ipc_plan.DEFAULT_BUFFER_BYTES // 4, device=rank.device)
    assert comm.applies(fits) and not comm.applies(torch.empty(fits.numel() + 1, device=rank.device))
    assert not comm.applies(fits.double()[:16]) and not comm.applies(fits.cpu())
    n_cases, case = 0, 0
    for dtype in DTYPES:
        max_numel = ipc_plan.DEFAULT_BUFFER_BYTES // torch.empty((), dtype=dtype).element_size()
        for numel in SIZES + [max_numel]:
            for algo in (None, ONE_SHOT, TWO_SHOT):
                case += 1
                msg = f"{numel} x {dtype} algo={algo} rank {rank.rank}"
                x = _inputs(1000 * case + rank.rank, numel, dtype, rank.device)
                y = comm.all_reduce(x, algo)  # NaN until written (nan_filled_empty)
                expected = reference.all_reduce([xi.double() for xi in rank.gather(x)])
                assert_close(y, expected, dtype, reduction_len=rank.world_size, msg=msg)
                _check_same_bits(rank, y, msg)
                if rank.nccl is not None:
                    y_nccl = x.float()
                    dist.all_reduce(y_nccl, group=rank.nccl)
                    assert_close(y_nccl.to(dtype), expected, dtype, reduction_len=rank.world_size, msg=msg + " NCCL")
                n_cases += 1
    comm.close()
    return n_cases


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_reduce_matches_reference(world_size):
    expected_cases = len(DTYPES) * (len(SIZES) + 1) * 3
    assert run_on_gpus(world_size, _all_reduce_cases) == [expected_cases] * world_size


# ----------------------------------------------------------------------------------------------------------
# fused residual + RMSNorm epilogue, rows whole (split 1) and split over blocks
# ----------------------------------------------------------------------------------------------------------
FUSED_SHAPES = [(1, 4096), (1, 8192), (5, 1024), (16, 4096), (129, 2048)]


@nan_filled_empty
def _fused_cases(rank):
    comm = rank.ipc_communicator()
    n_cases, case, splits_seen = 0, 0, set()
    for dtype in DTYPES:
        for n_rows, hidden in FUSED_SHAPES:
            for algo in (ONE_SHOT, TWO_SHOT):
                for split in (None, 1):
                    case += 1
                    plan = ipc_plan.plan_fused(n_rows, hidden, torch.empty((), dtype=dtype).element_size(),
                                               rank.world_size, algo=algo, split=split,
                                               max_blocks=comm.max_blocks)  # the plan the call gets
                    splits_seen.add(plan.split)
                    msg = f"({n_rows}, {hidden}) {dtype} algo={algo} split={plan.split} rank {rank.rank}"
                    x = _inputs(1000 * case + rank.rank, n_rows * hidden, dtype, rank.device).view(n_rows, hidden)
                    residual = _inputs(1000 * case + 99, n_rows * hidden, dtype, rank.device).view(n_rows, hidden)
                    weight = _inputs(1000 * case + 98, hidden, dtype, rank.device)
                    normed, new_residual = comm.allreduce_residual_rmsnorm(x, residual, weight, EPS, algo, split)
                    normed_ref, residual_ref = reference.allreduce_residual_rmsnorm(
                        [xi.double() for xi in rank.gather(x)], residual.double(), weight.double(), EPS)
                    assert_close(new_residual, residual_ref, dtype, reduction_len=rank.world_size,
                                 msg=msg + " new_residual")
                    assert_close(normed, normed_ref, dtype, reduction_len=rank.world_size, msg=msg + " normed")
                    _check_same_bits(rank, normed, msg)
                    n_cases += 1
    comm.close()
    assert max(splits_seen) > 1, f"no case split a row over blocks: {splits_seen}"
    return n_cases


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fused_epilogue_matches_reference(world_size):
    expected_cases = len(DTYPES) * len(FUSED_SHAPES) * 2 * 2
    assert run_on_gpus(world_size, _fused_cases) == [expected_cases] * world_size


# ----------------------------------------------------------------------------------------------------------
# many back-to-back calls of every kind, and ranks that lag
# ----------------------------------------------------------------------------------------------------------
def _mixed_call(comm, rank, i, numel, kind, lag_cycles):
    """Call i of a back-to-back sequence: rank r contributes r + i % 64 (small integers: fp32 sums are exact).
    Returns the number of wrong output elements, on the GPU (no host sync per call)."""
    value = float(rank.rank + i % 64)
    total = float(sum(r + i % 64 for r in range(rank.world_size)))
    if lag_cycles:
        torch.cuda._sleep(lag_cycles)  # this rank's kernel starts late: the peers wait at [B1]
    if kind in (ONE_SHOT, TWO_SHOT):
        x = torch.full((numel,), value, device=rank.device)
        return (comm.all_reduce(x, kind) != total).sum()
    hidden = 1024
    x = torch.full((max(1, numel // hidden), hidden), value, device=rank.device)
    residual = torch.full_like(x, 1.0)
    weight = torch.full((hidden,), 2.0, device=rank.device)
    normed, new_residual = comm.allreduce_residual_rmsnorm(x, residual, weight, EPS, split=kind)
    # every element of a row is total + 1, so rmsnorm gives weight * sign: 2.0 up to fp32 rounding
    return (new_residual != total + 1).sum() + ((normed - 2.0).abs() > 1e-5).sum()


@nan_filled_empty
def _back_to_back(rank, n_calls, lag):
    comm = rank.ipc_communicator()
    shared = random.Random(7)  # the same sequence of calls on every rank
    own = random.Random(100 + rank.rank)  # which calls this rank is late for: its own
    calls = [(shared.randint(1, 300_000), shared.choice([ONE_SHOT, TWO_SHOT, 1, 4])) for _ in range(n_calls)]
    wrong = torch.zeros(n_calls, dtype=torch.int64, device=rank.device)
    with torch.enable_grad():  # the communicator does not depend on grad mode; run it with grad mode on
        for i, (numel, kind) in enumerate(calls):
            lag_cycles = own.choice([0, 0, 0, 200_000, 2_000_000]) if lag else 0
            if lag and own.random() < 0.05:
                time.sleep(0.002)  # the host lags too: the peers' kernels wait with nothing queued here
            wrong[i] = _mixed_call(comm, rank, i, numel, kind, lag_cycles)
    bad = torch.nonzero(wrong).flatten().tolist()
    comm.close()
    return bad


def _n_calls(base, world_size):
    """Ranks that share a GPU (without MPS) run time-sliced: a rank's kernel waiting at a barrier holds the GPU
    until its time slice ends (2 ms SHORT to 30 ms LONG, `nvidia-smi compute-policy --set-timeslice`), so a
    barrier costs up to one slice per rank and a call (2-3 barriers) ~2-3 x world_size slices: 10,000 calls at
    4 ranks would take minutes to an hour. A fiftieth there (200 back-to-back, 40 lagging) still reuses every
    flag, counter and row-group barrier many times over, which is what one GPU can check (the ranks never run
    at the same time there, so races need 2 GPUs)."""
    return base if torch.cuda.device_count() >= world_size else base // 50


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_back_to_back_mixed_calls(world_size):
    # TWO_SHOT is forced at 2 ranks too, where the planner alone would always pick one-shot
    for rank, bad in enumerate(run_on_gpus(world_size, _back_to_back, _n_calls(10_000, world_size), False)):
        assert bad == [], f"rank {rank}: wrong results at calls {bad}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ranks_lagging_at_random_calls(world_size):
    for rank, bad in enumerate(run_on_gpus(world_size, _back_to_back, _n_calls(2_000, world_size), True)):
        assert bad == [], f"rank {rank}: wrong results at calls {bad}"


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------------------
HIDDEN = 1024


def _graph_inputs(rank, step, tensors):
    """New values in the captured inputs for replay `step` (seeded by rank and step)."""
    for k, t in enumerate(tensors):
        t.copy_(_inputs(10_000 * step + 100 * k + rank.rank, t.numel(), t.dtype, rank.device).view_as(t))


def _expect_sum(rank, y, x, dtype, msg):
    expected = reference.all_reduce([xi.double() for xi in rank.gather(x)])
    assert_close(y, expected, dtype, reduction_len=rank.world_size, msg=msg)


@nan_filled_empty
def _graph_cases(rank):
    comm = rank.ipc_communicator()
    dtype, device = torch.bfloat16, rank.device
    # uneven allocations: the ranks' inputs live at different addresses, and the call below that rank 0
    # reads in place (aligned) rank 1 stages (2 bytes past a boundary), and the other way round
    padding = torch.empty(4096 * (rank.rank + 1) + 16 * rank.rank, dtype=torch.uint8, device=device)
    x = torch.zeros(8, HIDDEN, dtype=dtype, device=device)
    backing = torch.zeros(8 * HIDDEN + 1, dtype=dtype, device=device)
    odd = (backing[1:] if rank.rank % 2 else backing[:-1]).view(8, HIDDEN)
    residual = torch.zeros_like(x)
    weight = torch.ones(HIDDEN, dtype=dtype, device=device)
    inputs = (x, odd, residual)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graph requires
        comm.all_reduce(x)
        comm.all_reduce(odd, TWO_SHOT)
        comm.allreduce_residual_rmsnorm(x, residual, weight, EPS)
    torch.cuda.current_stream().wait_stream(side)

    graph_a, graph_b, graph_bare = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with comm.capture():  # graph A: three calls, in place and staged mixed across ranks
        with torch.cuda.graph(graph_a):
            y = comm.all_reduce(x)
            y_odd = comm.all_reduce(odd, TWO_SHOT)
            normed, new_residual = comm.allreduce_residual_rmsnorm(x, residual, weight, EPS)
    slots_a = comm._graphs.next_slot - 1
    with comm.capture():  # graph B: its input is made inside the graph (the graph's private pool)
        with torch.cuda.graph(graph_b):
            y_double = comm.all_reduce(x * 2, TWO_SHOT)
    with torch.cuda.graph(graph_bare):  # captured outside capture(): staged through the staging buffer
        y_bare = comm.all_reduce(x)
    assert comm._graphs.next_slot - 1 == slots_a + 1 == 4, "one slot per call captured inside capture()"

    for step in range(3):
        _graph_inputs(rank, step, inputs)
        for out in (y, y_odd, normed, new_residual, y_double, y_bare):
            out.fill_(float("nan"))  # a replay that writes nothing shows
        graph_a.replay()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # replay on another stream, ordered with the others
            graph_b.replay()
        torch.cuda.current_stream().wait_stream(side)
        graph_bare.replay()
        torch.cuda.synchronize()
        msg = f"replay {step} rank {rank.rank}"
        _expect_sum(rank, y, x, dtype, msg)
        _expect_sum(rank, y_odd, odd, dtype, msg + " staged/in place mixed")
        _expect_sum(rank, y_double, x * 2, dtype, msg + " input made in the graph, side stream")
        _expect_sum(rank, y_bare, x, dtype, msg + " captured outside capture()")
        normed_ref, residual_ref = reference.allreduce_residual_rmsnorm(
            [xi.double() for xi in rank.gather(x)], residual.double(), weight.double(), EPS)
        assert_close(new_residual, residual_ref, dtype, reduction_len=rank.world_size, msg=msg + " new_residual")
        assert_close(normed, normed_ref, dtype, reduction_len=rank.world_size, msg=msg + " normed")

    # re-capture after free: unmap the peers' graph memory, free the graphs, capture again
    comm.release_graph_buffers()
    del graph_a, graph_b, y, y_odd, normed, new_residual, y_double
    torch.cuda.empty_cache()
    graph_c = torch.cuda.CUDAGraph()
    with comm.capture():
        with torch.cuda.graph(graph_c):
            y_again = comm.all_reduce(x + 1)
    assert comm._graphs.next_slot - 1 == 5, "slots are never reused"
    _graph_inputs(rank, 7, inputs)
    y_again.fill_(float("nan"))
    graph_c.replay()
    torch.cuda.synchronize()
    _expect_sum(rank, y_again, x + 1, dtype, f"re-captured after release, rank {rank.rank}")
    comm.close()  # before the graphs go: their memory is mapped by the peers until every rank closed
    del graph_c, graph_bare, padding
    return slots_a


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_cuda_graphs(world_size):
    assert run_on_gpus(world_size, _graph_cases) == [3] * world_size


def _replay_after_release(rank):
    comm = rank.ipc_communicator()
    x = torch.ones(4096, device=rank.device)
    comm.all_reduce(x)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with comm.capture():
        with torch.cuda.graph(graph):
            comm.all_reduce(x)
    comm.release_graph_buffers()
    graph.replay()  # every rank replays: all pass [B1], then find the emptied slot and trap
    try:
        torch.cuda.synchronize()
        synchronized = True
    except RuntimeError:
        synchronized = False
    try:
        comm.all_reduce(x)
        message = None
    except RuntimeError as error:
        message = str(error)
    comm.close()  # after a trap: no CUDA work, but the teardown's barrier with the peers
    return synchronized, message


def test_replay_after_release_traps_naming_the_slot():
    # fresh ranks: the trap leaves each rank's CUDA context unusable
    for synchronized, message in run_on_gpus(2, _replay_after_release, fresh=True):
        assert not synchronized, "the replay of a released slot must not complete"
        assert message is not None and "slot 1 held no peer pointers" in message


# ----------------------------------------------------------------------------------------------------------
# a rank that never arrives, while it stays alive with its buffer mapped
# ----------------------------------------------------------------------------------------------------------
def _one_rank_absent(rank):
    comm = rank.ipc_communicator()
    comm.timeout_ms = 2000
    x = torch.ones(1024, device=rank.device)  # allocated before the trap: afterwards no CUDA call works
    if rank.rank == 1:
        dist.barrier(group=rank.tp.process_group)  # [A] alive, its buffer mapped, until rank 0 saw the trap
        comm.close()
        return "absent", None
    start = time.monotonic()
    comm.all_reduce(x)  # waits at [B1] for rank 1, which never launches, and traps after 2 s
    try:
        torch.cuda.synchronize()
        outcome = "completed"
    except RuntimeError:
        outcome = f"trapped after {time.monotonic() - start:.1f} s"
    try:
        comm.all_reduce(x)
        message = None
    except RuntimeError as error:
        message = str(error)
    dist.barrier(group=rank.tp.process_group)  # [A]
    comm.close()
    return outcome, message


def test_barrier_times_out_naming_the_missing_rank():
    # fresh ranks: the trapped kernel leaves rank 0's CUDA context unusable
    (outcome, message), absent = run_on_gpus(2, _one_rank_absent, fresh=True)
    assert absent == ("absent", None)
    assert outcome.startswith("trapped after"), outcome
    assert message is not None and "rank 1 did not arrive at a barrier within 2 s" in message
