"""Shared segments (tp_kernels.comm.segment) and the CPU symmetric buffers built on them
(tp_kernels.comm.symmetric): what a rank maps is what the creator made, nothing is ever named in /dev/shm,
no descriptor outlives setup, anything else offered in its place is refused, and a failure on one rank
raises on every rank."""
import glob
import mmap
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from conftest import spawn_ranks
from tp_kernels.comm import segment
from tp_kernels.comm.segment import Invitation, SegmentError
from tp_kernels.comm.symmetric import SymmetricBuffer, buffer_bytes, buffer_of


def _memfds_open() -> list:
    """This process's descriptors that point at a tp_kernels memfd."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:tp_kernels:"):
                found.append(int(fd))
        except OSError:  # closed while listing
            pass
    return found


def test_segment_is_private_sealed_and_unnamed():
    before = set(glob.glob("/dev/shm/*"))
    seg, invitation = segment.create(5000, "test")
    try:
        st = os.fstat(seg.fd)
        assert oct(st.st_mode & 0o777) == oct(0o600) and st.st_size == segment.HEADER_BYTES + 5000
        assert set(glob.glob("/dev/shm/*")) == before  # no name anywhere
        with pytest.raises(OSError):  # sealed: nobody can shrink it under a peer's mapping
            os.ftruncate(seg.fd, 10)
        seg.payload[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        assert seg.address % mmap.PAGESIZE == 0  # page-aligned payload (a C++ user may mmap it at an offset)
        other = segment.open_invitation(invitation)  # any process of this user may open it while fd is open
        assert other.payload[:4].tolist() == [1, 2, 3, 4]
        other.close()
    finally:
        seg.close()
    assert seg.closed and seg.fd == -1


def test_anything_but_the_creators_segment_is_refused():
    seg, good = segment.create(4096, "test")
    try:
        with pytest.raises(SegmentError, match="header and secret"):
            segment.open_invitation(Invitation(good.pid, good.fd, good.size, b"x" * segment.SECRET_BYTES))
        with pytest.raises(SegmentError, match="bytes, expected"):
            segment.open_invitation(Invitation(good.pid, good.fd, good.size + 1, good.secret))
        with pytest.raises(SegmentError, match="cannot open"):
            segment.open_invitation(Invitation(good.pid, 987654, good.size, good.secret))
    finally:
        seg.close()
    # a planted regular file of the right size and mode, and an unsealed memfd with the right name
    with tempfile.TemporaryFile() as planted:
        os.fchmod(planted.fileno(), 0o600)
        planted.truncate(segment.HEADER_BYTES + 4096)
        with pytest.raises(SegmentError, match="not a tp_kernels memfd"):
            segment.open_invitation(Invitation(os.getpid(), planted.fileno(), 4096, good.secret))
    unsealed = os.memfd_create("tp_kernels:planted")
    try:
        os.fchmod(unsealed, 0o600)
        os.ftruncate(unsealed, segment.HEADER_BYTES + 4096)
        with pytest.raises(SegmentError, match="not sealed"):
            segment.open_invitation(Invitation(os.getpid(), unsealed, 4096, good.secret))
        os.fchmod(unsealed, 0o644)
        with pytest.raises(SegmentError, match="mode 0o644"):
            segment.open_invitation(Invitation(os.getpid(), unsealed, 4096, good.secret))
    finally:
        os.close(unsealed)
    with pytest.raises(ValueError, match="size must be a positive int"):
        segment.create(0, "test")


def _share_rank(tp, fail_rank):
    before = set(glob.glob("/dev/shm/*"))
    if tp.rank == fail_rank:  # this rank cannot open the segment: every rank must raise
        real = segment.open_invitation

        def refuse(invitation):
            raise SegmentError("injected refusal")
        segment.open_invitation = refuse
    try:
        seg = segment.share(tp.process_group, tp.rank, 4096 * tp.world_size, "test")
    except SegmentError as e:
        return "error", str(e)
    finally:
        if tp.rank == fail_rank:
            segment.open_invitation = real
    try:
        seg.payload[tp.rank * 4096] = 10 + tp.rank
        dist.barrier(group=tp.process_group)
        seen = [int(seg.payload[r * 4096]) for r in range(tp.world_size)]
        return "ok", (seen, seg.fd, _memfds_open(), set(glob.glob("/dev/shm/*")) - before)
    finally:
        seg.close()


@pytest.mark.parametrize("world_size", [2, 4])
def test_share_maps_one_segment_in_every_rank(world_size):
    for rank, (status, (seen, fd, open_fds, new_names)) in enumerate(spawn_ranks(world_size, _share_rank, None)):
        assert status == "ok"
        assert seen == [10 + r for r in range(world_size)], f"rank {rank} sees {seen}"
        assert fd == -1 and open_fds == [], f"rank {rank} still holds descriptors {open_fds}"
        assert not new_names


def test_share_failure_on_one_rank_raises_on_every_rank():
    for status, message in spawn_ranks(2, _share_rank, 1):
        assert status == "error" and "rank 1: injected refusal" in message, message


def _symmetric_rank(tp):
    buf = SymmetricBuffer.create(tp, data_bytes=1000, n_signals=10, timeout_s=5)
    per_rank = buffer_bytes(1000, 10)
    pointers = buf.pointers.tolist()
    registered = buffer_of(tp.name) is buf
    epoch = int(buf.control[0])
    buf.close()
    return pointers, per_rank, registered, epoch, buffer_of(tp.name) is None, buf.data_offset


def test_symmetric_buffer_layout_and_registry():
    results = spawn_ranks(2, _symmetric_rank)
    for pointers, per_rank, registered, epoch, gone, data_offset in results:
        # one segment: rank r's buffer r buffers further, each 256-byte aligned, signals then data
        assert [p - pointers[0] for p in pointers] == [0, per_rank]
        assert per_rank % 256 == 0 and data_offset == 256  # 2 x 10 signal words round up to 256 bytes
        assert per_rank == 256 + 2 * 1024  # two halves of 1000 data bytes, each rounded up to 1024
        assert registered and gone and epoch == 1


def _mismatched_layout_rank(tp):
    from tp_kernels.comm.symmetric import SymmetricBufferError

    try:
        SymmetricBuffer.create(tp, data_bytes=1000 + tp.rank, n_signals=10, timeout_s=5, register=False)
    except SymmetricBufferError as e:
        return str(e)
    return None


def test_ranks_asking_for_different_layouts_raise_on_every_rank():
    for message in spawn_ranks(2, _mismatched_layout_rank):
        assert message is not None and "rank 1: ('cpu', 1001, 10)" in message, message
