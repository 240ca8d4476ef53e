"""Host-side decisions of the CUDA IPC custom all-reduce, on CPU: algorithm choice, launch plans (the fused
kernel's row split included), limits, argument checks, the fall-back predicate (NVLink, the shared-GPU test
switch), the kernel timeout and its error word. The communicator's lifecycle (connecting, CUDA-graph slots,
teardown) is tests/test_cuda_ipc_lifecycle.py; the kernels themselves run in tests/gpu/test_cuda_ipc.py."""
import math

import pytest
import torch

from conftest import assert_close
from tp_kernels import _extension, reference
from tp_kernels.comm import ipc_plan, ipc_topology
from tp_kernels.comm.ipc_plan import ONE_SHOT, TWO_SHOT
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


def _fused_blocks(plan, world_size):
    """{(owner, block): [(row, pack_lo, pack_hi), ...]}: what block `block` of rank `owner` reduces, as the
    fused kernel maps it (row_slice in custom_all_reduce.cu: group = block // split, slice = block % split,
    rows owner's lo + group, + n_groups, ...). In one-shot every rank owns all rows (owner 0 stands for them)."""
    n_groups = plan.n_blocks // plan.split
    per_slice = -(-plan.packs_per_row // plan.split)
    owners = range(world_size) if plan.two_shot else [0]
    work = {}
    for q in owners:
        lo = min(q * plan.chunk, plan.n_rows) if plan.two_shot else 0
        hi = min(lo + plan.chunk, plan.n_rows)
        for b in range(plan.n_blocks):
            group, piece = divmod(b, plan.split)
            pack_lo = min(piece * per_slice, plan.packs_per_row)
            pack_hi = min(pack_lo + per_slice, plan.packs_per_row)
            work[q, b] = [(row, pack_lo, pack_hi) for row in range(lo + group, hi, n_groups)]
    return work


@pytest.mark.parametrize("world_size", [2, 4, 8])
@pytest.mark.parametrize("algo", [ONE_SHOT, TWO_SHOT])
@pytest.mark.parametrize("split", [None, 1, 3, 8])
@pytest.mark.parametrize("max_blocks", [ipc_plan.MAX_BLOCKS, 7])  # 7: a grid limit split does not divide
def test_fused_plan_gives_every_row_and_pack_one_block(world_size, algo, split, max_blocks):
    for n_rows, hidden in ((1, 4096), (3, 8192), (16, 4096), (129, 2048), (5, 64)):
        if split is not None and split > min(hidden // 8, max_blocks):
            continue
        plan = ipc_plan.plan_fused(n_rows, hidden, 2, world_size, algo=algo, split=split, max_blocks=max_blocks)
        assert plan.packs_per_row == hidden // 8 and plan.n_rows == n_rows
        assert 1 <= plan.n_blocks <= max_blocks and plan.n_blocks % plan.split == 0
        assert split is None or plan.split == split
        work = _fused_blocks(plan, world_size)
        covered = {}
        for (q, b), items in work.items():
            for row, pack_lo, pack_hi in items:
                for c in range(pack_lo, pack_hi):
                    covered[row, c] = covered.get((row, c), 0) + 1
        assert covered == {(r, c): 1 for r in range(n_rows) for c in range(plan.packs_per_row)}, plan
        # the blocks of a row group meet at its barrier once per row: they must see the same rows
        for q in {q for q, _ in work}:
            for g in range(plan.n_blocks // plan.split):
                rows = {tuple(r for r, _, _ in work[q, g * plan.split + k]) for k in range(plan.split)}
                assert len(rows) == 1, f"row group {g} of owner {q}: blocks iterate different rows {rows}"


def test_split_spreads_decode_rows_over_blocks():
    # one decode token, Llama-70B hidden 8192 in bf16: 1024 packs -> 8 blocks of 128 packs, not one block
    assert ipc_plan.plan_fused(1, 8192, 2, 8, algo=ONE_SHOT).split == 8
    assert ipc_plan.choose_split(1, 8192 // 8) == 1024 // ipc_plan.FUSED_MIN_PACKS_PER_BLOCK
    # rows enough to fill the grid: one block per row, no row-group barrier
    assert ipc_plan.plan_fused(64, 8192, 2, 2, algo=ONE_SHOT).split == 1
    # a short row is not split below FUSED_MIN_PACKS_PER_BLOCK packs per block
    assert ipc_plan.plan_fused(1, 1024, 2, 2).split == 1
    # split never exceeds MAX_SPLIT nor leaves the grid larger than MAX_BLOCKS
    for rows in range(1, 70):
        plan = ipc_plan.plan_fused(rows, 65536, 2, 2, buffer_bytes=2**27)
        assert plan.split <= ipc_plan.MAX_SPLIT and plan.n_blocks <= ipc_plan.MAX_BLOCKS


@pytest.mark.parametrize("split", [0, 65, 9])
def test_forced_split_out_of_range_raises(split):
    with pytest.raises(ValueError, match="split must be in"):
        ipc_plan.plan_fused(1, 64, 2, 2, split=split)  # 64 bf16 = 8 packs: at most 8 blocks
    with pytest.raises(ValueError, match=r"split must be in \[1, 4\]"):
        ipc_plan.plan_fused(1, 8192, 2, 2, split=8, max_blocks=4)  # nor more blocks than the grid limit


def test_grid_limit_is_what_every_gpu_holds_at_once():
    # one block per SM: the smallest GPU decides, and ranks sharing a GPU (MPS runs them side by side) split it
    assert ipc_plan.grid_limit([132, 132], ["a", "b"]) == ipc_plan.MAX_BLOCKS
    assert ipc_plan.grid_limit([132] * 4, ["a"] * 4) == 33
    assert ipc_plan.grid_limit([58, 132], ["a", "b"]) == 58  # an L4's 58 SMs: fewer than MAX_BLOCKS
    assert ipc_plan.grid_limit([132, 132, 132], ["a", "a", "b"]) == ipc_plan.MAX_BLOCKS  # 132 // 2, capped
    assert ipc_plan.grid_limit([4] * 8, ["a"] * 8) == 0  # nothing fits: the group declines


def test_plans_keep_to_the_grid_limit():
    assert ipc_plan.plan_all_reduce(2**21, 4, 2, max_blocks=33).n_blocks == 33
    decode = ipc_plan.plan_fused(1, 8192, 2, 8, algo=ONE_SHOT, max_blocks=4)
    assert decode.split == 4 and decode.n_blocks == 4
    assert ipc_plan.plan_fused(64, 8192, 2, 2, algo=ONE_SHOT, max_blocks=33).n_blocks == 33
    for bad in (0, ipc_plan.MAX_BLOCKS + 1):
        with pytest.raises(ValueError, match="max_blocks must be in"):
            ipc_plan.plan_all_reduce(64, 4, 2, max_blocks=bad)
        with pytest.raises(ValueError, match="max_blocks must be in"):
            ipc_plan.plan_fused(1, 64, 4, 2, max_blocks=bad)


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
        "ipc_handle_bytes": ipc_plan.IPC_HANDLE_BYTES, "max_slots": ipc_plan.MAX_SLOTS,
        "error_kind_shift": ipc_plan.ERROR_KIND_SHIFT, "error_barrier_timeout": ipc_plan.ERROR_BARRIER_TIMEOUT,
        "error_null_input": ipc_plan.ERROR_NULL_INPUT}


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


def test_kernel_timeout_is_long_by_default_and_can_be_turned_off():
    assert ipc_plan.kernel_timeout_ms({}) == 600_000  # a trap ends the job: as long as NCCL's watchdog
    assert ipc_plan.kernel_timeout_ms({"TP_KERNELS_IPC_TIMEOUT": "2.5"}) == 2_500
    assert ipc_plan.kernel_timeout_ms({"TP_KERNELS_IPC_TIMEOUT": "0"}) == 0  # wait forever, never trap
    assert ipc_plan.kernel_timeout_ms({"TP_KERNELS_IPC_TIMEOUT": "0.0001"}) == 1
    # the CPU communicators' timeout does not shorten the kernel's
    assert ipc_plan.kernel_timeout_ms({"TP_KERNELS_COMM_TIMEOUT": "5"}) == 600_000
    for bad in ("soon", "-1", "inf", "nan"):
        with pytest.raises(ValueError, match="TP_KERNELS_IPC_TIMEOUT must be"):
            ipc_plan.kernel_timeout_ms({"TP_KERNELS_IPC_TIMEOUT": bad})


def test_error_word_is_described():
    assert ipc_plan.describe_kernel_error(0, 1000) is None
    timeout = ipc_plan.describe_kernel_error((ipc_plan.ERROR_BARRIER_TIMEOUT << 24) | 3, 2500)
    assert timeout.startswith("rank 3 did not arrive at a barrier within 2.5 s") and "unusable" in timeout
    null = ipc_plan.describe_kernel_error((ipc_plan.ERROR_NULL_INPUT << 24) | 4095, 1000)
    assert "slot 4095" in null and "register_graph_buffers()" in null
    assert "unknown error word 0x7000001" in ipc_plan.describe_kernel_error(0x7000001, 1000)


def test_shared_gpu_switch_from_environment():
    assert ipc_plan.allow_shared_gpu({}) is False
    assert ipc_plan.allow_shared_gpu({"TP_KERNELS_IPC_ALLOW_SHARED_GPU": "1"}) is True
    with pytest.raises(ValueError, match="TP_KERNELS_IPC_ALLOW_SHARED_GPU must be 0 or 1"):
        ipc_plan.allow_shared_gpu({"TP_KERNELS_IPC_ALLOW_SHARED_GPU": "yes"})


def test_transfer_pattern_differs_between_ranks_and_words():
    n = ipc_plan.transfer_check_words(2**20)
    assert n * 4 == ipc_plan.TRANSFER_CHECK_BYTES and ipc_plan.transfer_check_words(1024) == 256
    patterns = [ipc_plan.transfer_pattern(r, n) for r in range(8)]
    for r, p in enumerate(patterns):
        assert p.dtype == torch.int32 and p.shape == (n,) and bool((p >= 0).all())
        assert p.unique().numel() == n, f"rank {r}: repeated words would hide a misplaced block"
        for q in range(r):
            assert not bool((p == patterns[q]).any()), f"ranks {q} and {r} share a word at the same position"


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
    nvlink = _all_reachable(world_size)
    assert match in ipc_plan.group_fallback_reason(world_size, local_reasons, hosts, gpus, access, nvlink)


def test_more_than_two_ranks_need_nvlink():
    pcie_pair = [[True, True, True, True], [True, True, True, True], [True, True, True, False],
                 [True, True, False, True]]
    reason = ipc_plan.group_fallback_reason(4, [None] * 4, ["a"] * 4, _gpus(4), _all_reachable(4), pcie_pair)
    assert "rank 2's GPU and rank 3's are not connected by NVLink" in reason
    unknown = [[True if r == q else None for q in range(4)] for r in range(4)]
    assert "NVML unavailable" in ipc_plan.group_fallback_reason(4, [None] * 4, ["a"] * 4, _gpus(4),
                                                                _all_reachable(4), unknown)
    assert "NVML unavailable" in ipc_plan.group_fallback_reason(4, [None] * 4, ["a"] * 4, _gpus(4),
                                                                _all_reachable(4), None)
    # two ranks over PCIe: one-shot moves what NCCL moves, with one barrier; no NVLink needed
    assert ipc_plan.group_fallback_reason(2, [None] * 2, ["a"] * 2, _gpus(2), _all_reachable(2),
                                          [[True, False], [False, True]]) is None


def test_shared_gpu_needs_the_test_switch():
    one_gpu = ["0000:10:00"] * 4
    reason = ipc_plan.group_fallback_reason(4, [None] * 4, ["a"] * 4, one_gpu, _all_reachable(4), None)
    assert "ranks 0 and 1 share the GPU 0000:10:00" in reason and "TP_KERNELS_IPC_ALLOW_SHARED_GPU=1" in reason
    # with the switch: no NVLink is needed between ranks of one GPU, and NVML is not asked
    assert ipc_plan.group_fallback_reason(4, [None] * 4, ["a"] * 4, one_gpu, _all_reachable(4), None,
                                          allow_shared_gpu=True) is None
    # two GPUs, two ranks each: the pairs across the GPUs still need NVLink
    two_gpus = ["0000:10:00", "0000:11:00"] * 2
    no_link = [[two_gpus[r] == two_gpus[q] for q in range(4)] for r in range(4)]
    assert "not connected by NVLink" in ipc_plan.group_fallback_reason(
        4, [None] * 4, ["a"] * 4, two_gpus, _all_reachable(4), no_link, allow_shared_gpu=True)


@pytest.mark.parametrize("world_size", [2, 8])
def test_group_without_obstacles_uses_ipc(world_size):
    assert ipc_plan.group_fallback_reason(world_size, [None] * world_size, ["a"] * world_size, _gpus(world_size),
                                          _all_reachable(world_size), _all_reachable(world_size)) is None


def test_nvlink_unknown_without_nvml():
    row = ipc_topology.nvlink_row("0000:10:00", ["0000:10:00", "0000:11:00", None], library="libnot-nvml.so.0")
    assert row == [True, None, None]
    assert ipc_topology.nvlink_row(None, ["0000:10:00"]) == [None]


def test_tensor_fallback_reason():
    meta = torch.device("meta")
    assert ipc_plan.tensor_fallback_reason(torch.empty(2**21, device=meta), meta, 2**23) is None
    assert "exceeds the 8388608-byte IPC buffer" in ipc_plan.tensor_fallback_reason(
        torch.empty(2**21 + 1, device=meta), meta, 2**23)
    assert "dtype torch.float64" in ipc_plan.tensor_fallback_reason(
        torch.empty(4, dtype=torch.float64, device=meta), meta, 2**23)
    assert "tensor is on cpu" in ipc_plan.tensor_fallback_reason(torch.empty(4), meta, 2**23)
