"""The CUDA IPC communicator's lifecycle on CPU, with the compiled launcher replaced by FakeImpl: how plans
and slots reach the launcher, connecting (every rank agrees, or every rank declines and frees), the transfer
check, CUDA-graph slots (one per captured call, pairing by position, staged and in-place ranks mixed), and
teardown order (every rank closes its mappings before any rank frees). The kernels run in
tests/gpu/test_cuda_ipc.py."""
import logging
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_close, spawn_ranks
from tp_kernels import _extension, reference
from tp_kernels.comm import cuda_ipc, ipc_plan
from tp_kernels.comm.cuda_ipc import CudaIpcCommunicator
from tp_kernels.comm.ipc_graphs import RECORD_WORDS, GraphSlots
from tp_kernels.comm.ipc_plan import ONE_SHOT, TWO_SHOT
from tp_kernels.distributed import TPGroup

CPU = torch.device("cpu")
STAGING_BASE = 0x7F00_0000_0000  # FakeImpl's made-up addresses: rank r's staging buffer, as mapped here
GRAPH_BASE = 0x7E00_0000_0000    # ... and where it maps a peer allocation whose handle starts with byte k


def staging(rank):
    return STAGING_BASE + rank * 2**24


def mapped(rank, address):
    """Where FakeImpl maps rank's captured input at address (locate_input, export_allocation, open_buffer)."""
    return GRAPH_BASE + rank * 2**32 + (address >> 20) % 256 * 2**20 + address % 2**20


def fake_locate(address):
    """FakeImpl's allocations: one per MiB of address space; (base, offset) of address."""
    return lambda: (address - address % 2**20, address % 2**20)


class FakeImpl:
    """Stands in for _C.CustomAllReduce: keeps its state the way the C++ class does, records every call in
    `events` (name, time), and returns for an all-reduce the sum that `world_size` identical inputs give.
    fail: the name of a method that raises; garbage_from: a peer whose transfer pattern reads back wrong."""

    def __init__(self, rank, world_size, fail=None, garbage_from=None, resident_blocks=132):
        self.rank, self.world_size, self.fail, self.garbage_from = rank, world_size, fail, garbage_from
        self.resident_blocks = resident_blocks
        self.events, self.calls, self.slots = [], [], {}
        self.mapped, self.freed, self.word, self.staged = False, False, 0, None
        self.graph_handles = set()

    def _event(self, name):
        self.events.append((name, time.monotonic()))
        if name == self.fail:
            raise RuntimeError(f"{name} failed on purpose\nC++ trace that must not reach the message")

    def ipc_handle(self):
        self._event("ipc_handle")
        return torch.full((ipc_plan.IPC_HANDLE_BYTES,), self.rank, dtype=torch.uint8)

    def open_peers(self, handles):
        self._event("open_peers")
        assert [int(h[0]) for h in handles] == list(range(self.world_size)), "handles out of rank order"
        self.mapped = True

    def staging_address(self, rank):
        return staging(rank)

    def write_staging(self, src):
        self._event("write_staging")
        self.staged = src.clone()

    def read_peer_staging(self, peer, dst):
        self._event("read_peer_staging")
        assert self.mapped
        pattern = ipc_plan.transfer_pattern(peer, dst.numel())
        dst.copy_(pattern + 1 if peer == self.garbage_from else pattern)

    def all_reduce(self, x, out, two_shot, n_blocks, chunk, slot, stage, timeout_ms):
        self._event("all_reduce")
        self.calls.append(("all_reduce", two_shot, n_blocks, chunk, slot, stage, timeout_ms))
        out.copy_(x * self.world_size)

    def allreduce_residual_rmsnorm(self, x, residual, weight, normed, new_residual, eps, two_shot, n_blocks,
                                   chunk, split, slot, stage, timeout_ms):
        self._event("allreduce_residual_rmsnorm")
        self.calls.append(("fused", two_shot, n_blocks, chunk, split, slot, stage, timeout_ms))
        n, r = reference.add_rmsnorm(x * self.world_size, residual, weight, eps)
        normed.copy_(n)
        new_residual.copy_(r)

    def max_resident_blocks(self):
        return self.resident_blocks

    def locate_input(self, t):
        self._event("locate_input")
        assert t.untyped_storage().data_ptr() <= t.data_ptr()
        return fake_locate(t.data_ptr())()

    def export_allocation(self, base):
        self._event("export_allocation")
        assert base % 2**20 == 0, f"{base:#x} is not an allocation's base (one per MiB here)"
        # the handle names the rank and the allocation
        handle = torch.zeros(ipc_plan.IPC_HANDLE_BYTES, dtype=torch.uint8)
        handle[0], handle[1] = self.rank, (base >> 20) % 256
        return handle

    def open_buffer(self, handle):
        self._event("open_buffer")
        self.graph_handles.add(bytes(handle.tolist()))
        return GRAPH_BASE + int(handle[0]) * 2**32 + int(handle[1]) * 2**20

    def write_slots(self, first_slot, table):
        self._event("write_slots")
        for i in range(table.shape[0]):
            self.slots[first_slot + i] = table[i].tolist()

    def release_graph_buffers(self, end_slot):
        self._event("release_graph_buffers")
        for slot in range(1, end_slot):
            self.slots.pop(slot, None)
        self.graph_handles.clear()

    def error_word(self):
        return self.word

    def close_peer_handles(self):
        self._event("close_peer_handles")
        self.mapped = False
        self.graph_handles.clear()

    def free_buffers(self):
        self._event("free_buffers")
        assert not self.mapped and not self.graph_handles, "free_buffers before close_peer_handles"
        self.freed = True


def _communicator(world_size, impl=None, buffer_bytes=ipc_plan.DEFAULT_BUFFER_BYTES, rank=0):
    tp = SimpleNamespace(rank=rank, world_size=world_size, process_group=None)
    return CudaIpcCommunicator(tp, impl or FakeImpl(rank, world_size), CPU, buffer_bytes)


def test_fake_impl_mirrors_the_compiled_launcher():
    # the tests below stand FakeImpl in for _C.CustomAllReduce: a method renamed on one side only would pass
    # here and fail on the first GPU
    if not _extension.built_with_cuda():
        pytest.skip("tp_kernels._C was built without CUDA: there is no launcher to compare with")
    public = lambda cls: {name for name in dir(cls) if not name.startswith("_")}  # noqa: E731
    assert public(FakeImpl) == public(_extension._C.CustomAllReduce)


# ----------------------------------------------------------------------------------------------------------
# plans and slots reach the launcher
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size, numel", [(2, 37), (8, 2**20)])
def test_communicator_launches_the_plan(world_size, numel):
    comm = _communicator(world_size)
    x = torch.randn(numel)
    y = comm.all_reduce(x)
    plan = ipc_plan.plan_all_reduce(numel, 4, world_size)
    # eager: slot 0, staged
    assert comm._impl.calls == [("all_reduce", plan.two_shot, plan.n_blocks, plan.chunk, 0, True, comm.timeout_ms)]
    assert plan.algo == (ONE_SHOT if world_size == 2 else TWO_SHOT)
    torch.testing.assert_close(y, x * world_size)


def test_fused_launch_carries_the_split():
    comm = _communicator(8)
    x, residual, weight = torch.randn(1, 8192), torch.randn(1, 8192), torch.randn(8192)
    normed, new_residual = comm.allreduce_residual_rmsnorm(x, residual, weight, 1e-6)
    plan = ipc_plan.plan_fused(1, 8192, 4, 8)
    assert plan.split > 1
    assert comm._impl.calls == [("fused", plan.two_shot, plan.n_blocks, plan.chunk, plan.split, 0, True,
                                 comm.timeout_ms)]
    expected_normed, expected_residual = reference.add_rmsnorm((x * 8).double(), residual.double(),
                                                               weight.double(), 1e-6)
    assert_close(new_residual, expected_residual, torch.float32, reduction_len=8)
    assert_close(normed, expected_normed, torch.float32, reduction_len=8192)
    comm.allreduce_residual_rmsnorm(x, residual, weight, 1e-6, split=1)
    assert comm._impl.calls[-1][4] == 1


def test_non_contiguous_input_is_reduced_not_refused():
    comm = _communicator(2)
    x = torch.randn(6, 4).t()
    torch.testing.assert_close(comm.all_reduce(x), x * 2)


def test_communicator_checks_before_launching():
    comm = _communicator(2, buffer_bytes=1024)
    with pytest.raises(TypeError, match="x must have dtype"):
        comm.all_reduce(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="exceeds the IPC buffer"):
        comm.all_reduce(torch.zeros(257))
    assert not comm.applies(torch.zeros(4))  # CPU tensors are never the IPC path's
    assert comm._impl.calls == []


def test_fused_falls_back_to_two_steps_with_a_warning(caplog):
    if _extension._C is None:
        pytest.skip("tp_kernels._C is not built: add_rmsnorm is unavailable")
    cuda_ipc._warned.clear()
    comm = _communicator(2)
    x, residual, weight = torch.randn(3, 10), torch.randn(3, 10), torch.randn(10)  # 10 is not whole packs
    with caplog.at_level(logging.WARNING, logger="tp_kernels.comm.cuda_ipc"):
        normed, new_residual = comm.allreduce_residual_rmsnorm(x, residual, weight, 1e-6)
    assert any("hidden must be a positive multiple of 4" in r.getMessage() for r in caplog.records)
    expected_normed, expected_residual = reference.add_rmsnorm((x * 2).double(), residual.double(),
                                                               weight.double(), 1e-6)
    assert_close(new_residual, expected_residual, torch.float32, reduction_len=2)
    assert_close(normed, expected_normed, torch.float32, reduction_len=10)
    assert [c[0] for c in comm._impl.calls] == ["all_reduce"]


def test_closed_communicator_refuses_work():
    comm = _communicator(2)
    comm._impl = None
    assert not comm.applies(torch.zeros(4))
    with pytest.raises(RuntimeError, match="closed"):
        comm.all_reduce(torch.zeros(4))


def test_a_trapped_kernel_is_named_before_any_cuda_call():
    comm = _communicator(4)
    comm.timeout_ms = 2000
    comm._impl.word = (ipc_plan.ERROR_BARRIER_TIMEOUT << ipc_plan.ERROR_KIND_SHIFT) | 3
    with pytest.raises(RuntimeError, match="rank 3 did not arrive at a barrier within 2 s"):
        comm.all_reduce(torch.zeros(4))
    with pytest.raises(RuntimeError, match="rank 3 did not arrive"):
        with comm.capture():
            pass
    assert comm._impl.calls == []


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs: which calls get slots of their own
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def capturing(monkeypatch):
    """torch.cuda.is_current_stream_capturing(), settable (CPU tests cannot capture)."""
    state = {"on": False}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])
    return state


def _register_locally(comm):
    """register_graph_buffers for a one-process 'group': the exchange returns this rank's records only."""
    records = comm._graphs.local_records(comm._impl.export_allocation)
    table = comm._graphs.table([records] * comm.tp.world_size, comm._impl.open_buffer,
                               [staging(r) for r in range(comm.tp.world_size)])
    first, n = comm._graphs.commit()
    comm._impl.write_slots(first, table)
    return n


def test_only_calls_captured_inside_capture_get_slots(capturing, native_allocator, monkeypatch):
    comm = _communicator(2)
    monkeypatch.setattr(comm, "register_graph_buffers", lambda: _register_locally(comm))
    backing = torch.zeros(64 + 1)
    aligned = backing[:64] if backing.data_ptr() % 16 == 0 else backing[1:]
    misaligned = backing[1:65] if aligned.data_ptr() == backing.data_ptr() else backing[:64]
    comm.all_reduce(aligned)                    # eager
    capturing["on"] = True
    comm.all_reduce(aligned)                    # captured by a bare torch.cuda.graph: staged through slot 0
    capturing["on"] = False
    with comm.capture():
        comm.all_reduce(aligned)                # warm-up inside capture(), not capturing: slot 0
        capturing["on"] = True
        comm.all_reduce(aligned)                # slot 1, in place
        comm.all_reduce(aligned)                # the same address again: slot 2 (never de-duplicated)
        comm.all_reduce(misaligned)             # slot 3, staged
        comm.allreduce_residual_rmsnorm(aligned.view(2, 32), aligned.view(2, 32), torch.ones(32), 1e-6)  # slot 4
        capturing["on"] = False
    slots_and_staging = [(c[-3], c[-2]) for c in comm._impl.calls]
    assert slots_and_staging == [(0, True), (0, True), (0, True), (1, False), (2, False), (3, True), (4, False)]
    table = comm._impl.slots
    assert sorted(table) == [1, 2, 3, 4]
    assert table[1][0] == aligned.data_ptr() and table[2][0] == aligned.data_ptr()
    assert table[3][0] == staging(0)  # staged on this rank: the peers read its staging buffer
    with comm.capture():  # a second graph: new slots after the old ones
        capturing["on"] = True
        comm.all_reduce(aligned)
        capturing["on"] = False
    assert comm._impl.calls[-1][-3] == 5 and sorted(comm._impl.slots) == [1, 2, 3, 4, 5]


def test_failed_capture_discards_its_calls(capturing):
    comm = _communicator(2)
    with pytest.raises(ValueError, match="boom"):
        with comm.capture():
            capturing["on"] = True
            comm.all_reduce(torch.zeros(16))
            raise ValueError("boom")
    capturing["on"] = False
    assert comm._graphs.pending == [] and comm._impl.slots == {}
    assert not comm._capturing
    with pytest.raises(RuntimeError, match="cannot be nested"):
        with comm.capture():
            with comm.capture():
                pass


def test_slots_pair_calls_by_position_and_mix_staged_with_in_place():
    # rank 0 read call 0 in place and staged call 1; rank 1 the other way round, at other addresses
    slots = [GraphSlots(r, 2) for r in range(2)]
    for address, expected in ((0x1000_0000, (1, False)), (0x1000_0008, (2, True))):
        assert slots[0].claim(address, 64, "all_reduce", fake_locate(address)) == expected
    slots[1].next_slot = 7  # rank 1 captured more graphs before: slot numbers are local
    for address, expected in ((0x2000_0004, (7, True)), (0x2030_0010, (8, False))):
        assert slots[1].claim(address, 64, "all_reduce", fake_locate(address)) == expected
    impls = [FakeImpl(r, 2) for r in range(2)]
    records = [s.local_records(i.export_allocation) for s, i in zip(slots, impls)]
    assert all(rec.shape == (2, RECORD_WORDS) for rec in records)
    tables = [s.table(records, i.open_buffer, [staging(0), staging(1)]) for s, i in zip(slots, impls)]
    # both ranks build the same table, each with its own address for itself
    assert tables[0].tolist() == [[0x1000_0000, staging(1)], [staging(0), mapped(1, 0x2030_0010)]]
    assert tables[1].tolist() == [[mapped(0, 0x1000_0000), staging(1)], [staging(0), 0x2030_0010]]
    assert [s.commit() for s in slots] == [(1, 2), (7, 2)]


def test_mismatched_captures_raise_naming_the_call():
    slots = [GraphSlots(r, 2) for r in range(2)]
    slots[0].claim(0x1000_0000, 64, "all_reduce", fake_locate(0x1000_0000))
    slots[1].claim(0x2000_0000, 128, "all_reduce", fake_locate(0x2000_0000))
    records = [s.local_records(FakeImpl(r, 2).export_allocation) for r, s in enumerate(slots)]
    with pytest.raises(ValueError, match=r"captured all-reduce #0 differs between ranks \(rank 0: 64 bytes "
                                         r"all_reduce, rank 1: 128 bytes all_reduce\)"):
        slots[0].table(records, FakeImpl(0, 2).open_buffer, [staging(0), staging(1)])
    slots[1].claim(0x2000_0000, 64, "all_reduce", fake_locate(0x2000_0000))
    records[1] = slots[1].local_records(FakeImpl(1, 2).export_allocation)
    with pytest.raises(ValueError, match=r"rank 1's records must be \(1, 12\) int64"):
        slots[0].table(records, FakeImpl(0, 2).open_buffer, [staging(0), staging(1)])


def test_slots_run_out_with_a_clear_error():
    slots = GraphSlots(0, 2, max_slots=3)
    slots.claim(0, 16, "all_reduce", fake_locate(0))
    slots.claim(0, 16, "all_reduce", fake_locate(0))
    with pytest.raises(RuntimeError, match="more than 2 IPC all-reduces captured"):
        slots.claim(0, 16, "all_reduce", fake_locate(0))
    with pytest.raises(ValueError, match="op must be one of"):
        GraphSlots(0, 2).claim(0, 16, "all_gather", fake_locate(0))


def test_an_input_that_cannot_be_located_is_staged():
    slots = GraphSlots(0, 2)
    asked = []
    assert slots.claim(0x1000_0000, 64, "all_reduce", lambda: asked.append(1)) == (1, True)  # returns None
    assert slots.claim(0x1000_0008, 64, "all_reduce", lambda: asked.append(2)) == (2, True)  # misaligned
    assert asked == [1], "locate is asked only for aligned inputs"
    assert [c.address for c in slots.pending] == [None, None]
    with pytest.raises(ValueError, match="not at its address"):
        slots.claim(0x1000_0010, 64, "all_reduce", lambda: (0x1000_0000, 0))


@pytest.fixture
def native_allocator(monkeypatch):
    """torch.cuda.memory.get_allocator_backend(), settable (it needs CUDA)."""
    state = {"backend": "native"}
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: state["backend"])
    return state


def test_inputs_that_cannot_be_exported_are_staged_with_a_warning(capturing, native_allocator, caplog):
    cuda_ipc._warned.clear()
    comm = _communicator(2)
    comm._graphs.claim = lambda address, nbytes, op, locate: (1, locate() is None)  # the slot is not the point
    capturing["on"] = comm._capturing = True
    x = torch.zeros(64)
    with caplog.at_level(logging.WARNING, logger="tp_kernels.comm.cuda_ipc"):
        comm.all_reduce(x)  # located: read in place
        native_allocator["backend"] = "cudaMallocAsync"
        comm.all_reduce(x)  # stream-ordered pools: staged
        native_allocator["backend"] = "native"

        def refuse(t):  # what the launcher raises for an expandable segment
            raise RuntimeError("CUDA IPC all-reduce: a captured input is not a live block of torch's CUDA caching "
                               "allocator (Tensors allocated with expandable_segments:True cannot be shared ...)")

        comm._impl.locate_input = refuse
        comm.all_reduce(x)  # torch refuses: staged
    assert [c[-2] for c in comm._impl.calls] == [False, True, True]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cudaMallocAsync allocator backend" in warnings[0], "warned once, with why"


def test_captured_inputs_are_located_while_alive_and_exported_after(capturing, native_allocator, monkeypatch):
    # A captured input is usually a temporary (a GEMM's output): freed when the call returns, before the
    # capture ends, when torch's allocator no longer knows it. So its allocation is found during the capture
    # and only the allocation (which the graph's pool keeps) is exported at registration.
    comm = _communicator(2)
    monkeypatch.setattr(comm, "register_graph_buffers", lambda: _register_locally(comm))
    with comm.capture():
        capturing["on"] = True
        comm.all_reduce(torch.ones(64) * 2)      # a temporary
        storage = torch.zeros(3, 64)
        comm.all_reduce(storage[1])              # a view 256 bytes into its storage
        address = storage[1].data_ptr()
        capturing["on"] = False
        names = [name for name, _ in comm._impl.events]
        assert names.count("locate_input") == 2 and "export_allocation" not in names
    names = [name for name, _ in comm._impl.events]
    assert names.count("export_allocation") == 2
    assert comm._impl.slots[2][0] == address  # this rank reads the view where it is


# ----------------------------------------------------------------------------------------------------------
# multi-rank: connecting, registering and tearing down agree across ranks (gloo ranks, FakeImpl launchers)
# ----------------------------------------------------------------------------------------------------------
def _connect(tp, fail_rank, fail, garbage_from):
    impl = FakeImpl(tp.rank, tp.world_size, fail=fail if tp.rank == fail_rank else None,
                    garbage_from=garbage_from if tp.rank == 0 else None)
    comm, reason = CudaIpcCommunicator.connect(tp, impl, CPU, 4096)
    names = [name for name, _ in impl.events]
    if comm is not None:
        comm.close()
        names = [name for name, _ in impl.events]
    return comm is not None, reason, names, impl.freed


def test_connected_ranks_check_transfers_and_close_in_order():
    for ok, reason, names, freed in spawn_ranks(2, _connect, None, None, None):
        assert ok and reason is None and freed
        assert names == ["ipc_handle", "open_peers", "write_staging", "read_peer_staging", "close_peer_handles",
                         "free_buffers"]


@pytest.mark.parametrize("fail", ["ipc_handle", "open_peers", "write_staging", "read_peer_staging"])
def test_a_step_failing_on_one_rank_declines_every_rank(fail):
    results = spawn_ranks(2, _connect, 1, fail, None)
    reasons = {r[1] for r in results}
    assert len(reasons) == 1, f"ranks disagree: {reasons}"
    reason = reasons.pop()
    assert f"rank 1: RuntimeError: {fail} failed on purpose" in reason and "C++ trace" not in reason
    steps = ["ipc_handle", "open_peers", "write_staging", "read_peer_staging"]
    for ok, _, names, freed in results:
        assert not ok and freed, "a declining rank frees what it made"
        # every rank stops after the step that failed somewhere, then tears down in order
        assert names == steps[:steps.index(fail) + 1] + ["close_peer_handles", "free_buffers"]


def test_wrong_data_over_p2p_declines_every_rank():
    results = spawn_ranks(2, _connect, None, None, 1)  # rank 0 reads garbage from rank 1
    for ok, reason, _, freed in results:
        assert not ok and freed
        assert "rank 0: RuntimeError: 1024 of 1024 words read from rank 1's buffer are wrong" in reason


def _connect_with_resident_blocks(tp, resident):
    impl = FakeImpl(tp.rank, tp.world_size, resident_blocks=resident[tp.rank])
    comm, reason = CudaIpcCommunicator.connect(tp, impl, CPU, 4096)
    max_blocks = None if comm is None else comm.max_blocks
    if comm is not None:
        comm.close()
    return max_blocks, reason, impl.freed


def test_ranks_agree_on_a_grid_every_gpu_holds_at_once():
    # CPU test ranks share one "GPU" (the key is the device): its 100 resident blocks are split between them
    assert spawn_ranks(2, _connect_with_resident_blocks, [100, 120]) == [(50, None, True)] * 2
    for max_blocks, reason, freed in spawn_ranks(2, _connect_with_resident_blocks, [1, 132]):
        assert max_blocks is None and freed and "the GPUs run [1, 132] blocks at once" in reason


def _create_with_rank1_out_of_memory(tp):
    def construct(rank, world_size, buffer_bytes, device_index):
        if rank == 1:
            raise RuntimeError("CUDA error: out of memory\nC++ trace")
        made.append(FakeImpl(rank, world_size))
        return made[-1]

    made = []
    saved_probe, saved_extension = CudaIpcCommunicator.probe, cuda_ipc._extension
    CudaIpcCommunicator.probe = staticmethod(lambda tp, device=None, allow_shared_gpu=False: (None, CPU))
    cuda_ipc._extension = SimpleNamespace(_C=SimpleNamespace(CustomAllReduce=construct))
    try:  # a pooled rank process: restored below
        comm, reason = CudaIpcCommunicator.create_or_reason(tp)
    finally:
        CudaIpcCommunicator.probe, cuda_ipc._extension = saved_probe, saved_extension
    return comm is None, reason, [impl.freed for impl in made]


def test_a_rank_failing_to_allocate_declines_every_rank():
    (declined0, reason0, freed0), (declined1, reason1, freed1) = spawn_ranks(2, _create_with_rank1_out_of_memory)
    assert declined0 and declined1 and reason0 == reason1
    assert "allocating the IPC buffers failed (rank 1: RuntimeError: CUDA error: out of memory)" in reason0
    assert freed0 == [True] and freed1 == [], "rank 0 frees the buffer it made"


def _close_with_a_lagging_rank(tp):
    impl = FakeImpl(tp.rank, tp.world_size)
    comm, _ = CudaIpcCommunicator.connect(tp, impl, CPU, 4096)
    if tp.rank == 1:
        time.sleep(0.3)  # without the barrier, rank 0 would free while rank 1 still maps its buffer
    comm.close()
    comm.close()  # idempotent
    times = dict(impl.events)
    return times["close_peer_handles"], times["free_buffers"]


def test_no_rank_frees_before_every_rank_closed_its_mappings():
    times = spawn_ranks(2, _close_with_a_lagging_rank)
    last_close = max(t[0] for t in times)
    first_free = min(t[1] for t in times)
    assert last_close < first_free, f"a rank freed at {first_free} before the last close at {last_close}"


def _register_across_ranks(tp, mismatch):
    impl = FakeImpl(tp.rank, tp.world_size)
    comm, _ = CudaIpcCommunicator.connect(tp, impl, CPU, 4096)
    capturing = {"on": True}
    is_capturing = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: capturing["on"]  # a pooled rank process: restored below
    try:
        x = torch.zeros(64 + tp.rank * 13)  # uneven allocations: the ranks' addresses differ
        first = x[:32] if x.data_ptr() % 16 == 0 else x[1:33]
        second = x[1:33] if first.data_ptr() == x.data_ptr() else x[:32]
        if tp.rank == 1:
            first, second = second, first  # rank 1 stages the call rank 0 reads in place, and vice versa
        error = None
        try:
            with comm.capture():
                comm.all_reduce(first)
                comm.all_reduce(second[:16] if mismatch and tp.rank == 1 else second)
        except RuntimeError as e:
            error = str(e)
        capturing["on"] = False
        registered = dict(impl.slots)
        comm.release_graph_buffers()
        released = dict(impl.slots)
    finally:
        torch.cuda.is_current_stream_capturing = is_capturing
    comm.close()
    return error, [c[-3:-1] for c in impl.calls], registered, released, (first.data_ptr(), second.data_ptr())


def test_registration_across_ranks_with_mixed_staging():
    (err0, calls0, slots0, released0, (a0, b0)), (err1, calls1, slots1, released1, (a1, b1)) = spawn_ranks(
        2, _register_across_ranks, False)
    assert err0 is None and err1 is None
    assert calls0 == [(1, False), (2, True)] and calls1 == [(1, True), (2, False)]
    # call 1: rank 0 in place, rank 1 staged; call 2: the other way round
    assert slots0 == {1: [a0, staging(1)], 2: [staging(0), mapped(1, b1)]}
    assert slots1 == {1: [mapped(0, a0), staging(1)], 2: [staging(0), b1]}
    assert released0 == {} and released1 == {}, "release_graph_buffers empties the slots"


def _capture_failing_on_rank1(tp):
    impl = FakeImpl(tp.rank, tp.world_size)
    comm, _ = CudaIpcCommunicator.connect(tp, impl, CPU, 4096)
    is_capturing = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: True  # a pooled rank process: restored below
    error = None
    start = time.monotonic()
    try:
        with comm.capture():
            comm.all_reduce(torch.zeros(16))
            if tp.rank == 1:
                raise ValueError("out of memory while capturing")
    except (RuntimeError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        torch.cuda.is_current_stream_capturing = is_capturing
    seconds = time.monotonic() - start
    comm.close()
    return error, dict(impl.slots), seconds


def test_a_capture_failing_on_one_rank_raises_on_every_rank_without_waiting():
    (error0, slots0, seconds), (error1, slots1, _) = spawn_ranks(2, _capture_failing_on_rank1)
    # without rank 1 at the exchange, rank 0 would wait there until the gloo timeout (60 s in these tests)
    assert seconds < 20, f"rank 0 waited {seconds:.0f} s for rank 1 at the registration"
    assert error0 == ("RuntimeError: registering the captured IPC all-reduces failed: rank 1: its capture raised "
                      "ValueError")
    assert error1 == "ValueError: out of memory while capturing"  # its own error, not the exchange's
    assert slots0 == {} and slots1 == {}


def test_registration_of_different_collectives_raises_on_every_rank():
    for error, _, registered, _, _ in spawn_ranks(2, _register_across_ranks, True):
        assert error is not None and "captured all-reduce #1 differs between ranks" in error
        assert registered == {}, "nothing is registered when the ranks disagree"


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


# ----------------------------------------------------------------------------------------------------------
# declining
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
    monkeypatch.setattr(CudaIpcCommunicator, "probe",
                        staticmethod(lambda tp, device=None, allow_shared_gpu=False: ("peers unreachable", None)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_present)
    with caplog.at_level(logging.WARNING, logger="tp_kernels.comm.cuda_ipc"):
        assert CudaIpcCommunicator.create(_TwoRanks()) is None
        assert CudaIpcCommunicator.create(_TwoRanks()) is None
    warnings = [r.getMessage() for r in caplog.records if "CUDA IPC all-reduce disabled" in r.getMessage()]
    assert warnings == (["CUDA IPC all-reduce disabled, NCCL is used instead: peers unreachable"] if gpu_present else [])
