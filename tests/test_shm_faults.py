"""Faults of the shared-memory communicator, one test per promise of issue 5: a wait times out naming the
ranks that did not arrive; a mismatched call raises on every rank and corrupts nothing; a rank killed
mid-collective makes the others raise within the timeout; nothing is ever put in /dev/shm (the segments
are unnamed memfds); two groups in one job do not interfere; bad arguments raise ValueError. The faults of
issue 13 (planted segments, poisoning, threads, interrupts) are in test_faults.py.

Faulty collectives run on a private communicator made inside the task (collectively, on every rank) with a
short timeout, so the group's own communicator, and the rank pool, stay healthy.
"""
import glob
import os
import re
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

from conftest import spawn_ranks
from tp_kernels import _C, ops
from tp_kernels.comm import base as comm_base
from tp_kernels.comm.shm import ShmCommunicator
from tp_kernels.distributed import TPGroup

SHORT_TIMEOUT_S = 1.5


def _segments() -> set:
    """Files of ours in /dev/shm (other processes come and go there): the communicator's segments are
    unnamed memfds, so none may appear."""
    return set(glob.glob("/dev/shm/*tpk*") + glob.glob("/dev/shm/*tp_kernels*"))


def _private_comm(tp, timeout_s=SHORT_TIMEOUT_S, **kw) -> ShmCommunicator:
    return ShmCommunicator(tp.process_group, tp.rank, tp.world_size, f"{tp.name}/faults", timeout_s=timeout_s, **kw)


# ----------------------------------------------------------------------------------------------------------
# timeout names the missing ranks; the env variable sets it
# ----------------------------------------------------------------------------------------------------------
def _timeout_rank(tp, absent, timeout_env):
    os.environ[comm_base.TIMEOUT_ENV] = timeout_env
    try:
        comm = _private_comm(tp, timeout_s=None)  # reads TP_KERNELS_COMM_TIMEOUT
    finally:
        del os.environ[comm_base.TIMEOUT_ENV]
    try:
        if tp.rank in absent:
            return comm.timeout_s, None, None, None
        start = time.monotonic()
        with pytest.raises(RuntimeError) as first:
            comm.all_reduce(torch.ones(10))
        waited = time.monotonic() - start
        with pytest.raises(RuntimeError, match="unusable after an earlier failure") as again:
            comm.all_reduce(torch.ones(10))
        return comm.timeout_s, str(first.value), waited, str(again.value)
    finally:
        comm.close()


@pytest.mark.parametrize("world_size,absent", [(2, (1,)), (4, (2, 3))])
def test_wait_times_out_naming_missing_ranks(world_size, absent):
    results = spawn_ranks(world_size, _timeout_rank, absent, "1.0")
    for rank, (timeout_s, message, waited, again) in enumerate(results):
        assert timeout_s == 1.0
        if rank in absent:
            continue
        names = ", ".join(str(r) for r in absent)
        assert f"rank(s) {names} did not arrive within" in message, message
        assert "TP_KERNELS_COMM_TIMEOUT" in message
        # the first rank whose wait times out poisons the segment and the others raise with it: a rank that
        # started waiting later than that one may have waited a little less than the timeout itself
        assert 0.5 <= waited < 1.0 + 5.0, f"rank {rank} raised after {waited:.2f} s with a 1 s timeout"


def test_bad_timeout_env_raises(monkeypatch):
    monkeypatch.setenv(comm_base.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="TP_KERNELS_COMM_TIMEOUT must be a finite number of seconds > 0"):
        comm_base.comm_timeout_s()
    monkeypatch.setenv(comm_base.TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match="TP_KERNELS_COMM_TIMEOUT"):
        comm_base.comm_timeout_s()
    monkeypatch.delenv(comm_base.TIMEOUT_ENV)
    assert comm_base.comm_timeout_s() == comm_base.DEFAULT_TIMEOUT_S


# ----------------------------------------------------------------------------------------------------------
# mismatched calls raise on every rank and leave the communicator in step
# ----------------------------------------------------------------------------------------------------------
def _mismatch_rank(tp):
    comm = _private_comm(tp, slot_bytes=4096)
    odd = tp.rank == tp.world_size - 1  # the last rank makes the different call
    cases = {
        "size": lambda: comm.all_reduce(torch.ones(101 if odd else 100)),
        "size past a slot": lambda: comm.all_reduce(torch.ones(5000 if odd else 3000)),
        "dtype": lambda: comm.all_reduce(torch.ones(100, dtype=torch.bfloat16 if odd else torch.float16)),
        "op": lambda: (comm.allreduce_residual_rmsnorm(torch.ones(2, 50), torch.ones(2, 50), torch.ones(50), 1e-6)
                       if odd else comm.all_reduce(torch.ones(100))),
        "hidden": lambda: comm.allreduce_residual_rmsnorm(torch.ones(4, 25) if odd else torch.ones(2, 50),
                                                          torch.zeros(4, 25) if odd else torch.zeros(2, 50),
                                                          torch.ones(25 if odd else 50), 1e-6),
    }
    messages, recovered = {}, {}
    try:
        for name, call in cases.items():
            with pytest.raises(RuntimeError, match="mismatched collective") as err:
                call()
            messages[name] = str(err.value)
            # the ranks stayed in step: the next matching call is right on every rank
            x = torch.arange(1000, dtype=torch.float32) + tp.rank
            recovered[name] = torch.equal(comm.all_reduce(x), torch.arange(1000, dtype=torch.float32) * tp.world_size +
                                          sum(range(tp.world_size)))
        # a different algorithm choice (one_shot_max_bytes) is a mismatch too, not a corruption
        comm.one_shot_max_bytes = 0 if odd else 1 << 20
        with pytest.raises(RuntimeError, match="mismatched collective") as err:
            comm.all_reduce(torch.ones(100))
        messages["algorithm"] = str(err.value)
        return messages, recovered
    finally:
        comm.close()


@pytest.mark.parametrize("world_size", [2, 4])
def test_mismatched_call_raises_on_every_rank(world_size):
    for rank, (messages, recovered) in enumerate(spawn_ranks(world_size, _mismatch_rank)):
        assert set(messages) == {"size", "size past a slot", "dtype", "op", "hidden", "algorithm"}
        assert all(recovered.values()), f"rank {rank}: {recovered}"
        assert "rank 0: all_reduce of 400 bytes of float32" in messages["size"]
        assert f"rank {world_size - 1}: all_reduce of 404 bytes of float32" in messages["size"]
        assert "bfloat16" in messages["dtype"] and "float16" in messages["dtype"]
        assert "allreduce_residual_rmsnorm" in messages["op"]
        assert "hidden 25" in messages["hidden"]
        assert "one-shot" in messages["algorithm"] and "two-shot" in messages["algorithm"]


# ----------------------------------------------------------------------------------------------------------
# a rank killed mid-collective; nothing left in /dev/shm
# ----------------------------------------------------------------------------------------------------------
def _killed_rank(tp):
    """Rank 1 forks a child that takes its place in a 6-slot all-reduce and is SIGKILLed while it waits in
    the first step for rank 0 (which enters later); rank 0 must raise within the timeout."""
    comm = _private_comm(tp, slot_bytes=4096)
    x = torch.ones(6 * 1024)
    try:
        if tp.rank == 1:
            pid = os.fork()
            if pid == 0:  # the child: dies mid-collective
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
                comm.all_reduce(x)
                os._exit(3)  # not reached: rank 0 enters the collective only after the kill
            _, status = os.waitpid(pid, 0)
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, None, None
        time.sleep(0.8)
        start = time.monotonic()
        with pytest.raises(RuntimeError) as err:
            comm.all_reduce(x)
        return None, str(err.value), time.monotonic() - start
    finally:
        comm.close()


def test_killed_rank_makes_others_raise_and_leaves_nothing():
    # pooled ranks suffice: the process killed is a forked stand-in, and the communicator is private
    before = _segments()
    (_, message, waited), (killed, _, _) = spawn_ranks(2, _killed_rank)
    assert killed, "the child standing in for rank 1 was not SIGKILLed mid-collective"
    assert "rank(s) 1 did not arrive" in message, message
    # the stand-in had arrived at step #1 before dying: rank 0 gets stuck at the step's next wait (two-shot
    # reduce-scatter) or the next step, never at the first arrival
    assert re.search(r"collective #1 \(phase 'reduce-scatter'\)|collective #2 \(phase 'arrive'\)", message), message
    assert waited < SHORT_TIMEOUT_S + 5.0
    assert _segments() - before == set()


def _segment_facts(tp):
    comm = tp.communicator_for(torch.ones(1))
    y = ops.all_reduce(torch.ones(3), tp)
    with pytest.raises(RuntimeError, match="mismatched collective"):  # leave by way of an exception too
        ops.all_reduce(torch.ones(3 + tp.rank), tp)
    return comm.name, comm.segment_id, y.tolist()


def test_nothing_left_in_dev_shm_after_exception_and_exit():
    before = _segments()
    facts = spawn_ranks(2, _segment_facts, fresh=True)  # new processes that exit normally afterwards
    assert [f[0] for f in facts] == ["shm", "shm"] and facts[0][1] == facts[1][1]
    assert all(f[2] == [2.0, 2.0, 2.0] for f in facts)
    assert _segments() - before == set()


def test_setup_raises_when_a_rank_never_maps():
    from tp_kernels.comm import segment

    before = _segments()
    seg, _ = segment.create(_C.ShmCommunicator.segment_bytes(2, 4096), "lonely")
    try:
        comm = _C.ShmCommunicator.map_fd(seg.fd, segment.HEADER_BYTES, 0, 2, 4096, 0.3, "lonely")
    finally:
        seg.close()
    with pytest.raises(RuntimeError, match=r"rank\(s\) 1 did not map the shared memory segment"):
        comm.finish_setup()
    with pytest.raises(RuntimeError, match="unusable after an earlier failure"):
        comm.all_reduce(torch.ones(2))
    comm.close()
    comm.close()  # idempotent
    with pytest.raises(RuntimeError, match="is closed"):
        comm.all_reduce(torch.ones(2))
    assert _segments() - before == set()


# ----------------------------------------------------------------------------------------------------------
# two groups in one job
# ----------------------------------------------------------------------------------------------------------
def _two_groups_rank(tp, n_rounds):
    pair_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # collective: every rank makes both
    pair = TPGroup.from_group(pair_groups[tp.rank // 2])
    try:
        names = (pair.communicator_for(torch.ones(1)).segment_id, tp.communicator_for(torch.ones(1)).segment_id)
        wrong = 0
        for i in range(n_rounds):
            numel = 1 + (i * 37) % 700
            x = torch.full((numel,), float(i + tp.rank))
            # pairs {0, 1} and {2, 3} reduce concurrently, interleaved with the world group
            pair_sum = 2 * i + (1 if tp.rank < 2 else 5)
            wrong += not torch.equal(ops.all_reduce(x, pair), torch.full((numel,), float(pair_sum)))
            wrong += not torch.equal(ops.all_reduce(x, tp), torch.full((numel,), float(4 * i + 6)))
        return names, wrong
    finally:
        pair.close()
        for g in pair_groups:
            dist.destroy_process_group(g)


def test_two_groups_do_not_interfere():
    results = spawn_ranks(4, _two_groups_rank, 200)
    assert all(wrong == 0 for _, wrong in results), [wrong for _, wrong in results]
    pair_names = [names[0] for names, _ in results]
    world_names = {names[1] for names, _ in results}
    assert pair_names[0] == pair_names[1] and pair_names[2] == pair_names[3] and pair_names[0] != pair_names[2]
    assert len(world_names) == 1 and not world_names & set(pair_names)


# ----------------------------------------------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------------------------------------------
def _bad_args_rank(tp):
    errors = {}
    comm = tp.communicator_for(torch.ones(1))
    buffer = torch.ones(6)
    for name, call in {
        "float64 through backend=shm": lambda: ops.all_reduce(torch.ones(3, dtype=torch.float64), tp, backend="shm"),
        "int32 to the communicator": lambda: comm.all_reduce(torch.ones(3, dtype=torch.int32)),
        "out of another shape": lambda: comm.all_reduce(torch.ones(3), torch.empty(4)),
        "out overlapping x": lambda: comm.all_reduce(buffer[:4], buffer[2:]),
        "unknown publish_stores": lambda: setattr(comm, "publish_stores", "sometimes"),
        "unknown backend": lambda: ops.all_reduce(torch.ones(3), tp, backend="ipc-over-carrier-pigeon"),
    }.items():
        with pytest.raises(ValueError) as err:
            call()
        errors[name] = str(err.value)
    # the failed calls never reached the other ranks: the group is still in step
    errors["after"] = ops.all_reduce(torch.ones(2), tp).tolist()
    return errors


def test_bad_arguments_raise_value_error():
    for errors in spawn_ranks(2, _bad_args_rank):
        assert "does not apply to a torch.float64" in errors["float64 through backend=shm"]
        assert "x must be float32, float16 or bfloat16" in errors["int32 to the communicator"]
        assert "out must have x's shape and dtype" in errors["out of another shape"]
        assert "out must be x itself (in place) or not overlap x" in errors["out overlapping x"]
        assert "publish_stores must be 'auto', 'ordinary' or 'non-temporal'" in errors["unknown publish_stores"]
        assert "'shm'" in errors["unknown backend"]
        assert errors["after"] == [2.0, 2.0]
    with pytest.raises(ValueError, match="slot_bytes must be a positive multiple of 4096"):
        _C.ShmCommunicator.segment_bytes(2, 1000)
    with pytest.raises(ValueError, match="world_size must be in"):
        _C.ShmCommunicator.segment_bytes(1, 4096)
