"""Fault injection for issue 13, one test (or more) per item, numbered as in the issue; collectives at 2 CPU
ranks, every wait bounded (a short TP_KERNELS_COMM_TIMEOUT or timeout_s). Items 10, 11 and 14 (checkpoint
and config errors) are tested with the models (tests/models/).

 1. a segment that is not provably the group's is refused on every rank (forged invitation, planted file)
 2. a header that disagrees with the mapping raises before any access (no SIGSEGV)
 3. nothing is put in /dev/shm at any moment of setup, so a SIGKILL anywhere in it leaves nothing
 4. one group used from two threads at once raises, never returns a wrong sum
 5. allreduce_residual_rmsnorm against all_reduce (also with rows wider than a slot), or another eps, raises
 6. after a peer failed, this rank's call raises (the communicator is poisoned until made again)
 7. ops.all_gather with an out-of-range dim raises, eager and compiled
 8. qkv_rope / qkv_rope_kv_cache: negative indices other than -1 (the skip slot) and an integer table raise
 9. compiled VocabParallelEmbedding with out-of-range ids raises; layers refuse non-positive sizes
12. group setup honours TP_KERNELS_COMM_TIMEOUT and names the missing rank; waits raise KeyboardInterrupt
    within ~100 ms of SIGINT
13. the calibration cache is validated, bounded, refused when not a regular file, and decided on rank 0
"""
import glob
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import spawn_ranks
from tp_kernels import _C, layers, ops, reference
from tp_kernels.comm import base as comm_base
from tp_kernels.comm import rendezvous, segment
from tp_kernels.comm.shm import ShmCommunicator
from tp_kernels.distributed import TPGroup

pytestmark = pytest.mark.skipif(_C is None, reason="tp_kernels._C (the shm communicator, the op schemas) is not built")

SHORT_TIMEOUT_S = 1.5
# A signal is acted on within the communicator's 20 ms interrupt checks (or the setup barrier's 20 ms
# polls); the bound leaves room for a loaded 2-core host that runs other sessions' processes too.
SIGINT_BOUND_S = 0.5


def _dev_shm() -> set:
    """Files of ours in /dev/shm (other processes of the host, multiprocessing's semaphores among them,
    come and go there too): the communicator's segments are unnamed memfds, so there must be none."""
    return set(glob.glob("/dev/shm/*tpk*") + glob.glob("/dev/shm/*tp_kernels*"))


def _named_shm_of_this_process() -> set:
    """Whatever this process has open or mapped from /dev/shm, but multiprocessing's semaphores: a named
    segment of any name would show here, while a memfd shows as /memfd:..."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor)
    with open("/proc/self/maps") as maps:
        paths.update(line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6)
    return {p for p in paths if p.startswith("/dev/shm/") and not p.startswith("/dev/shm/sem.")}


def _private_comm(tp, timeout_s=SHORT_TIMEOUT_S, **kw) -> ShmCommunicator:
    return ShmCommunicator(tp.process_group, tp.rank, tp.world_size, f"{tp.name}/faults", timeout_s=timeout_s, **kw)


# ----------------------------------------------------------------------------------------------------------
# 1. segments: only a sealed 0600 memfd of this user, with the secret the creator sent, is ever mapped
# ----------------------------------------------------------------------------------------------------------
def _planted_rank(tp, planted_path):
    """Rank 0 hands the peers an invitation to an attacker's file instead of its segment (mode 0666, the
    size expected): every rank must raise, naming what was refused."""
    real_create, planted = segment.create, []

    def create_then_swap(size, label):
        seg, invitation = real_create(size, label)
        fd = os.open(planted_path, os.O_RDWR | os.O_CREAT, 0o666)
        os.fchmod(fd, 0o666)
        os.ftruncate(fd, segment.HEADER_BYTES + size)
        planted.append(fd)
        return seg, segment.Invitation(os.getpid(), fd, size, invitation.secret)

    if tp.rank == 0:
        segment.create = create_then_swap
    try:
        with pytest.raises(RuntimeError) as err:
            _private_comm(tp)
        return str(err.value)
    finally:
        segment.create = real_create
        for fd in planted:
            os.close(fd)


def test_planted_segment_is_refused_on_every_rank(tmp_path):
    messages = spawn_ranks(2, _planted_rank, str(tmp_path / "planted"))
    for rank, message in enumerate(messages):
        assert "rank 1:" in message and "has mode 0o666, expected 0o600" in message, f"rank {rank}: {message}"


def test_map_fd_refuses_what_is_not_a_sealed_private_memfd(tmp_path):
    size = _C.ShmCommunicator.segment_bytes(2, 4096)
    offset = segment.HEADER_BYTES

    def refused(fd):
        with pytest.raises(RuntimeError, match="refused descriptor") as err:
            _C.ShmCommunicator.map_fd(fd, offset, 1, 2, 4096, 0.5, "planted")
        return str(err.value)

    path = str(tmp_path / "planted")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, offset + size)
        os.fchmod(fd, 0o666)
        assert "has mode 0666, expected 0600" in refused(fd)
        os.fchmod(fd, 0o600)
        assert "not sealed against shrinking" in refused(fd)  # a named file another process can truncate
    finally:
        os.close(fd)
    seg, _ = segment.create(size + 4096, "too-big")  # a genuine segment, of another layout
    try:
        assert f"but offset {offset} + the layout of 2 ranks with 4096-byte slots needs {offset + size}" in refused(seg.fd)
    finally:
        seg.close()


# ----------------------------------------------------------------------------------------------------------
# 2. a header that disagrees with the mapping
# ----------------------------------------------------------------------------------------------------------
def test_forged_header_raises_before_any_access():
    """The same user rewrites rank 0's header before rank 1 checks it: a slot size that would put slots
    past the end of the mapping (the old attach computed addresses from it: SIGSEGV), marked ready."""
    size = _C.ShmCommunicator.segment_bytes(2, 4096)
    seg, _ = segment.create(size, "forged")
    comms = []
    try:
        comms.append(_C.ShmCommunicator.map_fd(seg.fd, segment.HEADER_BYTES, 0, 2, 4096, 0.5, "forged"))
        comms.append(_C.ShmCommunicator.map_fd(seg.fd, segment.HEADER_BYTES, 1, 2, 4096, 0.5, "forged"))
        header = seg.payload  # csrc/cpu/shm_comm.cpp SegmentHeader: slot_bytes at byte 16, setup_state at 32
        header[16:24] = torch.frombuffer(bytearray(struct.pack("<Q", 1 << 30)), dtype=torch.uint8)
        header[32:36] = torch.frombuffer(bytearray(struct.pack("<I", 1)), dtype=torch.uint8)
        with pytest.raises(RuntimeError, match=r"header disagrees with this rank's mapping \(slot_bytes 1073741824, "
                                               r"this rank's is 4096\); refused before any use"):
            comms[1].finish_setup()
        with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
            comms[1].all_reduce(torch.ones(4))
        assert comms[0].poisoned_by == 1  # and rank 0 is told
        del header
    finally:
        for c in comms:
            c.close()
        seg.close()


# ----------------------------------------------------------------------------------------------------------
# 3. nothing in /dev/shm in any window of setup
# ----------------------------------------------------------------------------------------------------------
def _setup_windows_rank(tp):
    """/dev/shm after each step of setup on rank 0 (created, then mapped by C++), and at the end."""
    real_create, seen = segment.create, {}

    def create(size, label):
        made = real_create(size, label)
        seen["created"] = _dev_shm() | _named_shm_of_this_process()
        return made

    seen["before"] = _dev_shm() | _named_shm_of_this_process()
    segment.create = create
    try:
        comm = _private_comm(tp)
    finally:
        segment.create = real_create
    seen["mapped"] = _dev_shm() | _named_shm_of_this_process()
    y = comm.all_reduce(torch.ones(3))
    comm.close()
    return {k: sorted(v - seen["before"]) for k, v in seen.items()}, y.tolist()


def test_no_window_of_setup_puts_anything_in_dev_shm():
    for rank, (new_files, y) in enumerate(spawn_ranks(2, _setup_windows_rank)):
        assert all(files == [] for files in new_files.values()), f"rank {rank}: {new_files}"
        assert y == [2.0, 2.0, 2.0]


def test_sigkill_right_after_creating_leaves_nothing():
    """A process killed between making the segment and handing it on (where the named segment was left
    behind): the memfd's memory goes with its last descriptor, and there was never a name."""
    before = _dev_shm()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: make and map a segment as rank 0 does, report, die
        try:
            seg, _ = segment.create(_C.ShmCommunicator.segment_bytes(2, 4096), "killed")
            _C.ShmCommunicator.map_fd(seg.fd, segment.HEADER_BYTES, 0, 2, 4096, 1.0, "killed")
            os.write(write_end, b"mapped")
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(write_end)
    reported = os.read(read_end, 16)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert reported == b"mapped" and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert _dev_shm() - before == set()


# ----------------------------------------------------------------------------------------------------------
# 4. two threads
# ----------------------------------------------------------------------------------------------------------
def _two_threads_rank(tp, n_calls):
    """The rank's main thread (the group's owner) and a second thread issue collectives of the group at
    once, through the op (C++ path) and through TPGroup (Python path, also with backend="torch")."""
    other_errors, other_done = [], []

    def other():
        for i in range(n_calls):
            for call in (lambda: ops.all_reduce(torch.full((64,), 1000.0 + i), tp),
                         lambda: tp.all_reduce(torch.full((64,), 1000.0 + i), backend="torch")):
                try:
                    call()
                    other_done.append(i)
                except RuntimeError as e:
                    other_errors.append(str(e))

    thread = threading.Thread(target=other, name="second-thread")
    thread.start()
    wrong = 0
    for i in range(n_calls):
        y = ops.all_reduce(torch.full((64,), float(i + tp.rank)), tp)
        wrong += not torch.equal(y, torch.full((64,), float(2 * i + 1)))
    thread.join()
    return wrong, len(other_done), other_errors[:2], len(other_errors)


def test_two_threads_on_one_group_raise_never_wrong():
    n_calls = 300
    for rank, (wrong, other_done, errors, n_errors) in enumerate(spawn_ranks(2, _two_threads_rank, n_calls)):
        assert wrong == 0 and other_done == 0, f"rank {rank}: {wrong} wrong sums, {other_done} calls of the 2nd thread ran"
        assert n_errors == 2 * n_calls
        assert "belongs to thread" in errors[0] and "'second-thread'" in errors[1], errors


def _owner_and_helper_at_once_rank(tp):
    """The owner and the allowed helper thread (the overlap pipelines' communication thread) in a
    collective at the same time on rank 0: detected, and the whole group (both ranks) raises."""
    comm = _private_comm(tp, timeout_s=10.0)
    errors = {}
    try:
        if tp.rank == 0:
            with ThreadPoolExecutor(1) as helper:
                comm.allow_helper_thread(helper.submit(threading.get_ident).result())
                waiting = helper.submit(comm.all_reduce, torch.ones(8))  # waits for rank 1, which sleeps
                time.sleep(0.3)
                with pytest.raises(RuntimeError, match="at the same time") as err:
                    comm.all_reduce(torch.ones(8))
                errors["owner"] = str(err.value)
                with pytest.raises(RuntimeError, match="cannot complete: a rank failed") as err:
                    waiting.result(timeout=5)
                errors["helper"] = str(err.value)
        else:
            time.sleep(1.0)
            with pytest.raises(RuntimeError, match="unusable after an earlier failure") as err:
                comm.all_reduce(torch.ones(8))
            errors["peer"] = str(err.value)
        return errors, comm.poisoned_by
    finally:
        comm.close()


def test_owner_and_helper_thread_at_once_poison_the_group():
    (errors0, by0), (errors1, by1) = spawn_ranks(2, _owner_and_helper_at_once_rank)
    assert set(errors0) == {"owner", "helper"} and set(errors1) == {"peer"}
    assert by0 == by1 == 0
    assert "at the same time on rank 0" in errors1["peer"]


# ----------------------------------------------------------------------------------------------------------
# 5. a fused call against a plain one, another eps
# ----------------------------------------------------------------------------------------------------------
def _op_mismatch_rank(tp):
    comm = _private_comm(tp, slot_bytes=4096)
    first = tp.rank == 0
    narrow, wide = torch.ones(2, 512), torch.ones(2, 2048)  # fp32 rows of 2 KiB and of 8 KiB (> the 4 KiB slot)

    def fused_or_plain(x):
        return lambda: comm.allreduce_residual_rmsnorm(x, x, torch.ones(x.shape[-1]), 1e-6) if first else comm.all_reduce(x)

    def other_eps(x):
        return lambda: comm.allreduce_residual_rmsnorm(x, x, torch.ones(x.shape[-1]), 1e-6 if first else 1e-5)

    cases = {"fused vs all_reduce": fused_or_plain(narrow), "fused vs all_reduce, wide rows": fused_or_plain(wide),
             "eps": other_eps(narrow), "eps, wide rows": other_eps(wide)}
    messages, in_step = {}, {}
    try:
        for name, call in cases.items():
            with pytest.raises(RuntimeError, match="mismatched collective") as err:
                call()
            messages[name] = str(err.value)
            in_step[name] = comm.all_reduce(torch.ones(3)).tolist() == [2.0] * 3
    finally:
        comm.close()
    # the group's own communicator, through the ops (its 256 KiB slots: rows of 65,537 fp32 are wider)
    very_wide = torch.ones(1, 65537)
    with pytest.raises(RuntimeError, match="mismatched collective") as err:
        if first:
            ops.allreduce_residual_rmsnorm(very_wide, very_wide, torch.ones(65537), 1e-6, tp)
        else:
            ops.all_reduce(very_wide, tp)
    messages["through the ops"] = str(err.value)
    return messages, in_step


def test_fused_against_plain_or_other_eps_raises_on_every_rank():
    for rank, (messages, in_step) in enumerate(spawn_ranks(2, _op_mismatch_rank)):
        assert all(in_step.values()), f"rank {rank}: {in_step}"
        for name in ("fused vs all_reduce", "fused vs all_reduce, wide rows", "through the ops"):
            assert "allreduce_residual_rmsnorm" in messages[name] and "rank 1: all_reduce" in messages[name], messages[name]
        assert "eps 1e-06" in messages["eps"] and "eps 1e-05" in messages["eps"], messages["eps"]
        assert "hidden 2048, eps 1e-05" in messages["eps, wide rows"], messages["eps, wide rows"]


# ----------------------------------------------------------------------------------------------------------
# 6. a peer failed: poisoned
# ----------------------------------------------------------------------------------------------------------
def _peer_failed_rank(tp):
    """Rank 1 publishes its input and gives up waiting (short timeout) before rank 0 arrives; rank 0 then
    finds rank 1's input in place, but the call failed on rank 1, so it must raise too, and so must every
    later call on both ranks."""
    comm = _private_comm(tp, timeout_s=0.3 if tp.rank == 1 else 5.0)
    try:
        if tp.rank == 1:
            with pytest.raises(RuntimeError, match=r"rank\(s\) 0 did not arrive"):
                comm.all_reduce(torch.ones(8))
        else:
            time.sleep(1.0)
        start = time.monotonic()
        with pytest.raises(RuntimeError) as first:
            comm.all_reduce(torch.ones(8))
        waited = time.monotonic() - start
        with pytest.raises(RuntimeError, match="unusable after an earlier failure") as again:
            comm.all_reduce(torch.ones(8))
        return str(first.value), str(again.value), waited, comm.poisoned_by
    finally:
        comm.close()


def test_after_a_peer_failed_every_call_raises():
    (first0, again0, waited0, by0), (first1, again1, _, by1) = spawn_ranks(2, _peer_failed_rank)
    assert "rank 1" in first0 and "did not arrive" in first0, first0
    assert waited0 < 1.0, "rank 0 must raise at once, not at its timeout"
    assert "rank 1" in again0 and "unusable after an earlier failure" in first1
    assert by0 == by1 == 1


# ----------------------------------------------------------------------------------------------------------
# 7-9. argument checks, on every rank
# ----------------------------------------------------------------------------------------------------------
def _qkv_args(positions, cos_sin_dtype=torch.float32):
    n_heads, n_kv_heads, head_dim, hidden = 2, 1, 8, 16
    g = torch.Generator().manual_seed(len(positions))  # the same x and w for every list of positions
    x = torch.randn(len(positions), hidden, generator=g)
    w_qkv = torch.randn((n_heads + 2 * n_kv_heads) * head_dim, hidden, generator=g)
    cos_sin = reference.rope_cos_sin_cache(16, head_dim).to(cos_sin_dtype)
    return (x, w_qkv, None, cos_sin, torch.tensor(positions)), dict(n_heads_per_rank=n_heads,
                                                                    n_kv_heads_per_rank=n_kv_heads, head_dim=head_dim)


def _argument_checks_rank(tp):
    errors = {}
    x2d = torch.randn(3, 4)
    for dim in (5, 2, -3):
        with pytest.raises(ValueError, match=r"dim must be in \[-2, 2\)") as err:
            ops.all_gather(x2d, tp, dim=dim)
        errors[f"all_gather dim={dim}"] = str(err.value)
    for positions in ([-2, 3], [3, 16]):  # -2 wrapped to row 14; 16 is past the 16-row table
        args, kw = _qkv_args(positions)
        with pytest.raises(ValueError, match="positions must be"):
            ops.qkv_rope(*args, **kw)
    args, kw = _qkv_args([3, -1])  # -1: a padding token, rotated as position 0 (the skip contract)
    q = ops.qkv_rope(*args, **kw)[0]
    args, kw = _qkv_args([3, 0])
    errors["-1 as position 0"] = torch.equal(q, ops.qkv_rope(*args, **kw)[0])
    args, kw = _qkv_args([3, 1], torch.int64)
    with pytest.raises(ValueError, match="cos_sin_cache must have dtype in"):
        ops.qkv_rope(*args, **kw)
    caches = [torch.zeros(2, 8, 1, 8) for _ in range(2)]
    for positions, batch_index, name in (([-3, 1], [0, 1], "positions"), ([2, 1], [0, -1], "cache_batch_index")):
        args, kw = _qkv_args(positions)
        with pytest.raises(ValueError, match=f"{name} must be"):
            ops.qkv_rope_kv_cache(*args, torch.tensor(batch_index), *caches, **kw)
    errors["caches untouched"] = all(not c.any() for c in caches)
    with pytest.raises(ValueError, match=r"out_features\[1\] must be a positive integer, got -8"):
        layers.MergedColumnParallelLinear(8, [8, -8], False, tp)
    with pytest.raises(ValueError, match="head_dim must be a positive integer, got 0"):
        layers.QKVParallelLinear(16, 0, 2, 2, False, tp)
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        layers.RowParallelLinear(0, 8, False, tp)
    embedding = layers.VocabParallelEmbedding(50, 4, tp)
    for ids in ([100], [-1], [10 ** 6]):
        with pytest.raises(ValueError, match=r"ids must be in \[0, 50\)"):
            embedding(torch.tensor(ids))
    errors["after"] = ops.all_reduce(torch.ones(2), tp).tolist()  # no rank is out of step
    return errors


def test_out_of_range_arguments_raise_on_every_rank():
    for rank, errors in enumerate(spawn_ranks(2, _argument_checks_rank)):
        assert errors["-1 as position 0"] and errors["caches untouched"] and errors["after"] == [2.0, 2.0]
        assert "x of shape (3, 4), got 5" in errors["all_gather dim=5"], errors


def test_compiled_all_gather_and_embedding_raise():
    """Compiled on one rank: the checks run while tracing (all_gather's fake) or inside the compiled code
    (the embedding's assert); backend="aot_eager" runs the traced graph without inductor's C++ build
    (the assert's inductor lowering raises alike, checked by hand: 'ids must be in [0, 50)')."""
    tp = TPGroup.single()
    gather = torch.compile(lambda t: ops.all_gather(t, tp, dim=5), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"dim must be in \[-2, 2\)"):
        gather(torch.randn(3, 4))
    embedding = layers.VocabParallelEmbedding(50, 4, tp)
    compiled = torch.compile(embedding, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(torch.tensor([1, 49])), embedding(torch.tensor([1, 49])))
        for ids in ([100, 1], [-1, 1], [10 ** 6, 1]):
            with pytest.raises(RuntimeError, match=r"ids must be in \[0, 50\)"):
                compiled(torch.tensor(ids))


# ----------------------------------------------------------------------------------------------------------
# 12. setup waits: TP_KERNELS_COMM_TIMEOUT, the missing rank named, SIGINT
# ----------------------------------------------------------------------------------------------------------
def _setup_timeout_rank(tp, name):
    """Rank 1 never makes the group; rank 0 must give up after TP_KERNELS_COMM_TIMEOUT naming it."""
    if tp.rank == 1:
        return None, None
    os.environ[comm_base.TIMEOUT_ENV] = "1"
    start = time.monotonic()
    try:
        with pytest.raises(rendezvous.SetupTimeout) as err:
            TPGroup(tp.rank, tp.world_size, name, tp.process_group, backends=("shm", "torch"))
        return str(err.value), time.monotonic() - start
    finally:
        del os.environ[comm_base.TIMEOUT_ENV]


def test_group_setup_honours_the_timeout_and_names_the_missing_rank():
    (message, waited), _ = spawn_ranks(2, _setup_timeout_rank, "faults/never-joined")
    assert "rank(s) 1 of 2 did not arrive within 1 s (TP_KERNELS_COMM_TIMEOUT)" in message, message
    assert 1.0 <= waited < 4.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_rendezvous_names_the_missing_rank(tmp_path, monkeypatch):
    """TPGroup.init's store and barrier, without initializing torch.distributed in the test process."""
    store = rendezvous.init_store(f"file://{tmp_path / 'init'}", 0, 2, 1.0)
    start = time.monotonic()
    with pytest.raises(rendezvous.SetupTimeout, match=r"rank\(s\) 1 of 2 did not arrive within 1 s"):
        rendezvous.barrier(store, "tp_kernels/init", 0, 2, 1.0, "torch.distributed rendezvous")
    assert time.monotonic() - start < 3.0
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # nobody serves it: rank 0 never started
    start = time.monotonic()
    with pytest.raises(rendezvous.SetupTimeout, match="rank 0 did not start the store at 127.0.0.1"):
        rendezvous.init_store("env://", 1, 2, 1.0)
    assert time.monotonic() - start < 3.0


def _interrupt_after(delay_s: float, sent: list) -> threading.Timer:
    def send():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(delay_s, send)
    timer.start()
    return timer


def _sigint_rank(tp):
    """Rank 0 is interrupted while it waits for rank 1: in the communicator's own call (GIL released), in
    the op's C++ kernel (GIL held), and in the setup barrier of a group rank 1 never makes. Rank 1 comes
    later and is told (poisoned) instead of waiting for its timeout."""
    delays, peer = {}, {}
    for way in ("communicator", "op"):
        group = TPGroup(tp.rank, tp.world_size, f"{tp.name}/sigint-{way}", tp.process_group, backends=("shm",))
        comm = group.communicator_for(torch.ones(1))
        comm.timeout_s = 10.0
        try:
            if tp.rank == 0:
                sent = []
                _interrupt_after(0.3, sent)
                with pytest.raises(KeyboardInterrupt):
                    comm.all_reduce(torch.ones(8)) if way == "communicator" else ops.all_reduce(torch.ones(8), group)
                delays[way] = time.monotonic() - sent[0]
            else:
                time.sleep(1.0)
                start = time.monotonic()
                with pytest.raises(RuntimeError, match="interrupted by a signal") as err:
                    ops.all_reduce(torch.ones(8), group)
                peer[way] = (str(err.value), time.monotonic() - start)
        finally:
            group.close()
    if tp.rank == 0:
        os.environ[comm_base.TIMEOUT_ENV] = "10"
        sent = []
        try:
            _interrupt_after(0.3, sent)
            with pytest.raises(KeyboardInterrupt):
                TPGroup(tp.rank, tp.world_size, f"{tp.name}/sigint-setup", tp.process_group, backends=("torch",))
            delays["setup"] = time.monotonic() - sent[0]
        finally:
            del os.environ[comm_base.TIMEOUT_ENV]
    return delays, peer


def test_sigint_raises_keyboard_interrupt_promptly():
    (delays, _), (_, peer) = spawn_ranks(2, _sigint_rank)
    assert set(delays) == {"communicator", "op", "setup"}
    assert all(d < SIGINT_BOUND_S for d in delays.values()), delays
    for way, (message, waited) in peer.items():
        assert waited < 1.0, f"{way}: rank 1 waited {waited:.2f} s for a peer that had been interrupted"
        assert "rank 0" in message, message


# ----------------------------------------------------------------------------------------------------------
# 13. the calibration cache
# ----------------------------------------------------------------------------------------------------------
_GOOD = {"tflops_bf16": 0.2, "tflops_fp32": 2.0, "hbm_gbps": 20.0, "link_gbps": 10.0, "link_latency_us": 5.0,
         "launch_overhead_us": 3.0, "overlap_efficiency": 0.5}


@pytest.mark.parametrize("field, text", [("link_gbps", "NaN"), ("link_gbps", "Infinity"), ("hbm_gbps", "-20.0"),
                                         ("tflops_fp32", "true"), ("link_latency_us", "0"),
                                         ("link_gbps", "1" + "0" * 400), ("link_gbps", "1e999"),
                                         ("overlap_efficiency", "1.5"), ("link_gbps", '"10"')])
def test_calibration_cache_refuses_bad_figures(tmp_path, caplog, field, text):
    from tp_kernels.perf import calibration

    good = json.dumps(_GOOD)
    path = tmp_path / "cache.json"
    path.write_text(good)
    assert calibration._read_cache(str(path)) == _GOOD
    path.write_text(good.replace(f'"{field}": {json.dumps(_GOOD[field])}', f'"{field}": {text}'))
    with caplog.at_level(logging.WARNING, logger="tp_kernels.perf.calibration"):
        assert calibration._read_cache(str(path)) is None
    assert "ignoring the calibration cache" in caplog.text


def test_calibration_cache_refuses_links_and_special_files(tmp_path, caplog):
    from tp_kernels.perf import calibration

    (tmp_path / "good.json").write_text(json.dumps(_GOOD))
    os.symlink(tmp_path / "good.json", tmp_path / "link.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "big.json").write_text(" " * (calibration.CACHE_MAX_BYTES + 1) + json.dumps(_GOOD))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tp_kernels.perf.calibration"):
        for name in ("link.json", "zero.json", "fifo.json", "big.json"):
            assert calibration._read_cache(str(tmp_path / name)) is None, name
        assert calibration._read_cache("/dev/zero") is None
    assert time.monotonic() - start < 2.0, "a special file must be refused, not read"
    assert "symlinks are refused" in caplog.text and "not a regular file" in caplog.text
    assert f"larger than {calibration.CACHE_MAX_BYTES} bytes" in caplog.text


def _calibrate_rank(tp, cache_dirs):
    from tp_kernels.perf import calibration

    os.environ[calibration.CACHE_ENV] = cache_dirs[tp.rank]
    try:
        path = calibration._cache_path(tp)
        with open(path, "w") as f:  # rank 0: a huge int (OverflowError once); rank 1: figures of its own
            good = json.dumps(_GOOD)
            f.write(good.replace('"link_gbps": 10.0', '"link_gbps": ' + "9" * 400) if tp.rank == 0 else
                    json.dumps(dict(_GOOD, link_gbps=123.0)))
        hw = calibration.calibrate_cpu(tp)
        return [getattr(hw, name) for name in calibration._FIELDS], calibration._read_cache(path) is not None
    finally:
        del os.environ[calibration.CACHE_ENV]


def test_calibration_is_decided_on_rank_zero(tmp_path):
    dirs = [str(tmp_path / f"rank{r}") for r in range(2)]
    for d in dirs:
        os.makedirs(d)
    (figures0, rewritten0), (figures1, _) = spawn_ranks(2, _calibrate_rank, dirs)
    assert figures0 == figures1, "the ranks must plan with the same figures"
    assert figures1[3] != 123.0, "rank 1's own cache must not be used"
    assert rewritten0, "rank 0 replaced its corrupt cache with the measured figures"
