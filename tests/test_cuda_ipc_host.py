"""Host-side logic of the CUDA IPC custom all-reduce, on CPU: algorithm choice, launch plans, limits,
argument checks, the fall-back predicate, and the communicator's wiring of plans into the launcher.
The kernels themselves run in tests/gpu/test_cuda_ipc.py."""
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_close, spawn_ranks
from tp_kernels import _extension, reference
from tp_kernels.comm import cuda_ipc, ipc_plan
from tp_kernels.comm.cuda_ipc import CudaIpcCommunicator
from tp_kernels.comm.ipc_plan import ONE_SHOT, TWO_SHOT
from tp_kernels.distributed import TPGroup
from tp_kernels.perf.cost_model import HARDWARE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------------------
# algorithm choice
# ----------------------------------------------------------------------------------------------------------
def test_two_ranks_always_use_one_shot():
    assert ipc_plan.one_shot_limit_bytes(2) == math.inf
    for nbytes in (0, 16, 2**20, ipc_plan.DEFAULT_BUFFER_BYTES):
        assert ipc_plan.choose_algorithm(nbytes, 2) == ONE_SHOT


@pytest.mark.parametrize("world_size", [3, 4, 6, 8])
def test_switch_to_two_shot_where_the_model_says_it_is_faster(world_size):
    hw = HARDWARE["H100"]
    limit = ipc_plan.one_shot_limit_bytes(world_size)
    below, above = math.floor(limit) - 1, math.ceil(limit) + 1
    assert ipc_plan.choose_algorithm(below, world_size) == ONE_SHOT
    assert ipc_plan.choose_algorithm(above, world_size) == TWO_SHOT

    def one_shot_s(n):
        return 2 * hw.link_latency_us * 1e-6 + (world_size - 1) * n / (hw.link_gbps * 1e9)

    def two_shot_s(n):
        return 3 * hw.link_latency_us * 1e-6 + 2 * (world_size - 1) * n / (world_size * hw.link_gbps * 1e9)

    assert one_shot_s(below) < two_shot_s(below) and two_shot_s(above) < one_shot_s(above)


def test_crossover_shrinks_with_world_size_and_fits_the_buffer():
    limits = [ipc_plan.one_shot_limit_bytes(w) for w in (3, 4, 6, 8)]
    assert limits == sorted(limits, reverse=True)
    # two-shot is reachable within the default buffer for every world size > 2
    assert all(limit < ipc_plan.DEFAULT_BUFFER_BYTES for limit in limits[1:])


@pytest.mark.parametrize("world_size", [0, ipc_plan.MAX_WORLD_SIZE + 1])
def test_world_size_out_of_range_raises(world_size):
    with pytest.raises(ValueError, match="world_size must be in"):
        ipc_plan.choose_algorithm(1024, world_size)


def test_negative_message_size_raises():
    with pytest.raises(ValueError, match="nbytes"):
        ipc_plan.choose_algorithm(-1, 4)


def test_unknown_forced_algorithm_raises():
    with pytest.raises(ValueError, match="algo must be"):
        ipc_plan.plan_all_reduce(64, 4, 2, algo="three_shot")


# ----------------------------------------------------------------------------------------------------------
# launch plans: executed here as the kernels execute them, on CPU tensors
# ----------------------------------------------------------------------------------------------------------
def _run_plain_plan(plan, xs):
    """The plain kernel's data movement, following the plan: each rank's chunk of packs (all packs in
    one-shot) reduced in rank order in fp32, the tail reduced by every rank, the chunks gathered."""
    per_pack = ipc_plan.pack_elems(xs[0].element_size())
    world_size = len(xs)
    outs = []
    for rank in (0, world_size - 1):  # the first and last rank: chunk boundaries differ only at the ends
        out = torch.full_like(xs[0], float("nan"))
        owners = range(world_size) if plan.two_shot else [rank]
        for owner in owners:
            lo = min(owner * plan.chunk, plan.n_packs) if plan.two_shot else 0
            hi = min(lo + plan.chunk, plan.n_packs)
            span = slice(lo * per_pack, hi * per_pack)
            out[span] = reference.all_reduce([x[span] for x in xs])
        tail = slice(plan.n_packs * per_pack, plan.n_packs * per_pack + plan.n_tail)
        out[tail] = reference.all_reduce([x[tail] for x in xs])
        outs.append(out)
    return outs


@pytest.mark.parametrize("world_size", [2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algo", [ONE_SHOT, TWO_SHOT])
def test_plain_plan_covers_every_element(world_size, dtype, algo):
    for numel in (1, 7, 37, 4099, 20_003):
        xs = [torch.randn(numel, dtype=dtype) for _ in range(world_size)]
        plan = ipc_plan.plan_all_reduce(numel, xs[0].element_size(), world_size, algo=algo)
        per_pack = ipc_plan.pack_elems(xs[0].element_size())
        assert plan.n_packs * per_pack + plan.n_tail == numel and 0 <= plan.n_tail < per_pack
        assert 1 <= plan.n_blocks <= ipc_plan.MAX_BLOCKS
        assert plan.n_tail <= ipc_plan.THREADS_PER_BLOCK  # block 0's threads take the tail
        expected = reference.all_reduce([x.double() for x in xs])
        for rank, out in zip((0, world_size - 1), _run_plain_plan(plan, xs)):
            assert_close(out, expected, dtype, reduction_len=world_size, msg=f"numel={numel} rank {rank}")


def test_grid_grows_with_the_work_up_to_the_limit():
    small = ipc_plan.plan_all_reduce(16, 4, 2)
    large = ipc_plan.plan_all_reduce(2**21, 4, 2)
    assert small.n_blocks == 1 and large.n_blocks == ipc_plan.MAX_BLOCKS
    two_shot = ipc_plan.plan_all_reduce(2**21, 4, 8)
    assert two_shot.algo == TWO_SHOT and two_shot.chunk == -(-two_shot.n_packs // 8)
    assert two_shot.n_blocks == min(ipc_plan.MAX_BLOCKS, -(-two_shot.chunk // ipc_plan.THREADS_PER_BLOCK))


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("algo", [ONE_SHOT, TWO_SHOT])
def test_fused_plan_gives_every_row_one_owner(world_size, algo):
    for n_rows in (1, 3, 16, 129):
        plan = ipc_plan.plan_fused(n_rows, 4096, 2, world_size, algo=algo)
        assert plan.packs_per_row == 4096 // 8 and plan.n_rows == n_rows
        assert 1 <= plan.n_blocks <= min(ipc_plan.MAX_BLOCKS, max(plan.chunk, 1))
        owners = range(world_size) if plan.two_shot else [0]
        rows = [r for q in owners for r in range(min(q * plan.chunk, n_rows), min((q + 1) * plan.chunk, n_rows))]
        assert rows == list(range(n_rows))


@pytest.mark.parametrize("element_size, hidden", [(2, 4100), (4, 4097), (2, 0)])
def test_fused_plan_needs_whole_packs_per_row(element_size, hidden):
    reason = ipc_plan.fused_fallback_reason(hidden, element_size)
    assert reason is not None and "hidden must be a positive multiple" in reason
    with pytest.raises(ValueError, match="hidden must be a positive multiple"):
        ipc_plan.plan_fused(4, hidden, element_size, 2)


def test_plans_refuse_messages_larger_than_the_buffer():
    with pytest.raises(ValueError, match="exceeds the IPC buffer"):
        ipc_plan.plan_all_reduce(2**20 + 1, 4, 2, buffer_bytes=4 * 2**20)
    with pytest.raises(ValueError, match="exceeds the IPC buffer"):
        ipc_plan.plan_fused(257, 4096, 4, 2, buffer_bytes=4 * 2**20)
    ipc_plan.plan_all_reduce(2**20, 4, 2, buffer_bytes=4 * 2**20)  # exactly full is fine


def test_pack_size_needs_a_supported_element_size():
    with pytest.raises(ValueError, match="element_size"):
        ipc_plan.pack_elems(8)


# ----------------------------------------------------------------------------------------------------------
# limits and argument checks
# ----------------------------------------------------------------------------------------------------------
def test_compiled_limits_match_the_plan():
    if not _extension.built_with_cuda():
        pytest.skip("tp_kernels._C was built without CUDA: the kernels' limits are not compiled in")
    assert _extension._C.cuda_ipc_limits() == {
        "max_world_size": ipc_plan.MAX_WORLD_SIZE, "max_blocks": ipc_plan.MAX_BLOCKS,
        "threads_per_block": ipc_plan.THREADS_PER_BLOCK, "pack_bytes": ipc_plan.PACK_BYTES,
        "ipc_handle_bytes": ipc_plan.IPC_HANDLE_BYTES, "buffer_record_bytes": ipc_plan.BUFFER_RECORD_BYTES,
        "max_registered_buffers": 4095}


@pytest.mark.parametrize("args, match", [
    ((0, 9, 2**20, 0), r"world_size must be in \[1, 8\], got 9"),
    ((2, 2, 2**20, 0), r"rank must be in \[0, 2\), got 2"),
    ((0, 2, 1000, 0), "max_bytes must be a positive multiple of 16, got 1000"),
])
def test_compiled_launcher_checks_its_arguments_before_touching_the_gpu(args, match):
    if not _extension.built_with_cuda():
        pytest.skip("tp_kernels._C was built without CUDA: there is no launcher")
    with pytest.raises(RuntimeError, match=match):
        _extension._C.CustomAllReduce(*args)


CPU = torch.device("cpu")


def test_check_input_accepts_supported_tensors():
    for dtype in DTYPES:
        ipc_plan.check_input(torch.zeros(5, 3, dtype=dtype), "x", CPU, 1024)


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(4, dtype=torch.float64), TypeError, "x must have dtype in"),
    (torch.zeros(4, dtype=torch.int32), TypeError, "x must have dtype in"),
    (torch.zeros(4, 6).t(), ValueError, "x must be contiguous"),
    (torch.zeros(257), ValueError, r"message \(1028 bytes\) exceeds the IPC buffer \(1024 bytes\)"),
    (torch.zeros(4, device="meta"), ValueError, "x must be on cpu"),
    ([1.0, 2.0], TypeError, "x must be a torch.Tensor"),
])
def test_check_input_rejects(bad, error, match):
    with pytest.raises(error, match=match):
        ipc_plan.check_input(bad, "x", CPU, 1024)


def test_check_aligned():
    ipc_plan.check_aligned("x", 0x7F0000001000)
    with pytest.raises(ValueError, match=r"x must be 16-byte aligned .* \(8 bytes past a boundary\)"):
        ipc_plan.check_aligned("x", 0x7F0000001008)


@pytest.mark.parametrize("buffer_bytes", [0, -16, 15, 1000])
def test_buffer_size_must_be_whole_packs(buffer_bytes):
    with pytest.raises(ValueError, match="buffer_bytes must be a positive multiple of 16"):
        ipc_plan.check_buffer_bytes(buffer_bytes)


def test_timeout_from_environment():
    assert ipc_plan.timeout_ms({}) == 60_000
    assert ipc_plan.timeout_ms({"TP_KERNELS_COMM_TIMEOUT": "2.5"}) == 2_500
    for bad in ("soon", "0", "-1", "inf", "nan"):
        with pytest.raises(ValueError, match="TP_KERNELS_COMM_TIMEOUT must be"):
            ipc_plan.timeout_ms({"TP_KERNELS_COMM_TIMEOUT": bad})


# ----------------------------------------------------------------------------------------------------------
# the fall-back predicate (NCCL is used when it gives a reason)
# ----------------------------------------------------------------------------------------------------------
def test_local_fallback_reason():
    assert "CUDA is not available" in ipc_plan.local_fallback_reason(False, True)
    assert "built without CUDA" in ipc_plan.local_fallback_reason(True, False)
    assert ipc_plan.local_fallback_reason(True, True) is None


def _all_reachable(n):
    return [[True] * n for _ in range(n)]


def _gpus(n):
    return [f"0000:{0x10 + r:02x}:00" for r in range(n)]


@pytest.mark.parametrize("world_size, local_reasons, hosts, gpus, access, match", [
    (1, [None], ["a"], _gpus(1), _all_reachable(1), "world size 1"),
    (9, [None] * 9, ["a"] * 9, _gpus(9), _all_reachable(9), "world size 9 exceeds the 8 ranks"),
    (4, [None, None, "CUDA is not available in this process", None], ["a"] * 4, [None, None, None, None],
     _all_reachable(4), "rank 2: CUDA is not available"),
    (2, [None, None], ["a", "b"], _gpus(2), _all_reachable(2), "different hosts"),
    (3, [None] * 3, ["a"] * 3, ["0000:10:00", "0000:11:00", "0000:10:00"], _all_reachable(3),
     "ranks 0 and 2 share the GPU 0000:10:00"),
    (3, [None] * 3, ["a"] * 3, _gpus(3), [[True, True, False], [True, True, True], [True, True, True]],
     "rank 0's GPU cannot access rank 2's GPU"),
])
def test_group_fallback_reason(world_size, local_reasons, hosts, gpus, access, match):
    assert match in ipc_plan.group_fallback_reason(world_size, local_reasons, hosts, gpus, access)


@pytest.mark.parametrize("world_size", [2, 8])
def test_group_without_obstacles_uses_ipc(world_size):
    assert ipc_plan.group_fallback_reason(world_size, [None] * world_size, ["a"] * world_size, _gpus(world_size),
                                          _all_reachable(world_size)) is None


def test_tensor_fallback_reason():
    meta = torch.device("meta")
    assert ipc_plan.tensor_fallback_reason(torch.empty(2**21, device=meta), meta, 2**23) is None
    assert "exceeds the 8388608-byte IPC buffer" in ipc_plan.tensor_fallback_reason(
        torch.empty(2**21 + 1, device=meta), meta, 2**23)
    assert "dtype torch.float64" in ipc_plan.tensor_fallback_reason(
        torch.empty(4, dtype=torch.float64, device=meta), meta, 2**23)
    assert "tensor is on cpu" in ipc_plan.tensor_fallback_reason(torch.empty(4), meta, 2**23)


# ----------------------------------------------------------------------------------------------------------
# the communicator without a GPU
# ----------------------------------------------------------------------------------------------------------
def test_single_rank_gets_no_communicator_and_no_warning(caplog):
    cuda_ipc._warned.clear()
    with caplog.at_level(logging.WARNING, logger="tp_kernels.comm.cuda_ipc"):
        assert CudaIpcCommunicator.create(TPGroup.single()) is None
    assert not [r for r in caplog.records if "CUDA IPC all-reduce disabled" in r.getMessage()]


class _TwoRanks:
    world_size, rank, process_group = 2, 0, None


@pytest.mark.parametrize("gpu_present", [True, False])
def test_declining_warns_once_only_where_a_gpu_would_have_used_it(caplog, monkeypatch, gpu_present):
    cuda_ipc._warned.clear()
    monkeypatch.setattr(CudaIpcCommunicator, "probe", staticmethod(lambda tp, device=None: ("peers unreachable", None)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_present)
    with caplog.at_level(logging.WARNING, logger="tp_kernels.comm.cuda_ipc"):
        assert CudaIpcCommunicator.create(_TwoRanks()) is None
        assert CudaIpcCommunicator.create(_TwoRanks()) is None
    warnings = [r.getMessage() for r in caplog.records if "CUDA IPC all-reduce disabled" in r.getMessage()]
    assert warnings == (["CUDA IPC all-reduce disabled, NCCL is used instead: peers unreachable"] if gpu_present else [])


def _probe_with_rank1_without_cuda(tp):
    is_available = torch.cuda.is_available
    if tp.rank == 1:  # whatever rank 0 has, rank 1 cannot take part: every rank must decline
        torch.cuda.is_available = lambda: False
    try:
        reason, device = CudaIpcCommunicator.probe(tp)
        return reason, device, CudaIpcCommunicator.create(tp) is None
    finally:
        torch.cuda.is_available = is_available


def test_ranks_agree_when_one_cannot_take_part():
    results = spawn_ranks(2, _probe_with_rank1_without_cuda)
    reasons = {r[0] for r in results}
    assert len(reasons) == 1, f"ranks disagree: {reasons}"
    reason = reasons.pop()
    # rank 0 names itself when this machine has no CUDA (or no CUDA build), else rank 1
    assert reason.startswith(("rank 0: ", "rank 1: ")) and "CUDA" in reason
    assert all(device is None and declined for _, device, declined in results)


class _RecordingLauncher:
    """Stands in for _C.CustomAllReduce: records what the communicator passes and returns the sum that a
    group of `world_size` identical inputs would give."""

    def __init__(self, world_size):
        self.world_size, self.calls = world_size, []

    def timed_out_peer(self):
        return -1

    def all_reduce(self, x, out, two_shot, n_blocks, chunk, registered, timeout_ms):
        self.calls.append(("all_reduce", two_shot, n_blocks, chunk, registered, timeout_ms))
        out.copy_(x * self.world_size)


def _communicator(world_size, launcher, buffer_bytes=ipc_plan.DEFAULT_BUFFER_BYTES):
    tp = SimpleNamespace(rank=0, world_size=world_size, process_group=None)
    return CudaIpcCommunicator(tp, launcher, CPU, buffer_bytes)


@pytest.mark.parametrize("world_size, numel", [(2, 37), (8, 2**20)])
def test_communicator_launches_the_plan(world_size, numel):
    launcher = _RecordingLauncher(world_size)
    comm = _communicator(world_size, launcher)
    x = torch.randn(numel)
    y = comm.all_reduce(x)
    plan = ipc_plan.plan_all_reduce(numel, 4, world_size)
    assert launcher.calls == [("all_reduce", plan.two_shot, plan.n_blocks, plan.chunk, False, comm.timeout_ms)]
    assert plan.algo == (ONE_SHOT if world_size == 2 else TWO_SHOT)
    torch.testing.assert_close(y, x * world_size)


def test_communicator_checks_before_launching():
    launcher = _RecordingLauncher(2)
    comm = _communicator(2, launcher, buffer_bytes=1024)
    with pytest.raises(TypeError, match="x must have dtype"):
        comm.all_reduce(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="exceeds the IPC buffer"):
        comm.all_reduce(torch.zeros(257))
    assert not comm.applies(torch.zeros(4))  # CPU tensors are never the IPC path's
    assert launcher.calls == []


def test_fused_falls_back_to_two_steps_with_a_warning(caplog):
    if _extension._C is None:
        pytest.skip("tp_kernels._C is not built: add_rmsnorm is unavailable")
    cuda_ipc._warned.clear()
    launcher = _RecordingLauncher(2)
    comm = _communicator(2, launcher)
    x, residual, weight = torch.randn(3, 10), torch.randn(3, 10), torch.randn(10)  # 10 is not whole packs
    with caplog.at_level(logging.WARNING, logger="tp_kernels.comm.cuda_ipc"):
        normed, new_residual = comm.allreduce_residual_rmsnorm(x, residual, weight, 1e-6)
    assert any("hidden must be a positive multiple of 4" in r.getMessage() for r in caplog.records)
    expected_normed, expected_residual = reference.add_rmsnorm((x * 2).double(), residual.double(),
                                                               weight.double(), 1e-6)
    assert_close(new_residual, expected_residual, torch.float32, reduction_len=2)
    assert_close(normed, expected_normed, torch.float32, reduction_len=10)
    assert [c[0] for c in launcher.calls] == ["all_reduce"]


def test_closed_communicator_refuses_work():
    comm = _communicator(2, _RecordingLauncher(2))
    comm._impl = None
    assert not comm.applies(torch.zeros(4))
    with pytest.raises(RuntimeError, match="closed"):
        comm.all_reduce(torch.zeros(4))


def test_timed_out_peer_is_named():
    launcher = _RecordingLauncher(4)
    launcher.timed_out_peer = lambda: 3
    comm = _communicator(4, launcher)
    with pytest.raises(RuntimeError, match="rank 3 did not arrive"):
        comm.all_reduce(torch.zeros(4))
