"""Shared-memory segments mapped by every rank process of a group on one host, made without a name in any
file system.

The creating rank makes an anonymous file with memfd_create (no path in /dev/shm, so nothing can be
planted under its name and nothing is left behind however the processes end: the memory is freed when
the last mapping or descriptor goes), sets its mode to 0600, fixes its size with seals (no process can
shrink it under another's mapping, which would be a SIGBUS, nor grow it), and writes a header: a magic
string, the payload size and a 32-byte random secret. It sends (pid, fd number, size, secret) to the
others over the group's process group; each opens /proc/<pid>/fd/<fd> (allowed to processes of the same
user, the kernel's ptrace-read check), checks that what it opened is a sealed memfd of the same owner,
mode 0600 and the expected size, maps it and compares the header's secret with the one it was sent, so a
recycled pid or a wrong descriptor is refused. Once every rank has mapped it, every rank closes its
descriptor (unless asked to keep it): from then on no other process can open the segment.

API, for any user that needs a segment (the symmetric buffers of tp_kernels.comm.symmetric; the C++ shm
communicator can take `Segment.fd` and map it itself):
- `share(process_group, rank, size, label)`: collective; every rank gets a `Segment` of `size` payload
  bytes (page-aligned, after a one-page header), or every rank raises `SegmentError` naming the ranks
  that failed and why.
- `create(size, label)` / `open_invitation(invitation)`: the two halves, for a caller with its own
  channel to send the `Invitation` over.
"""
from __future__ import annotations

import ctypes
import fcntl
import hmac
import mmap
import os
import secrets
import stat
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

MAGIC = b"tpk-seg1"
SECRET_BYTES = 32
# The payload starts one page in, so that a caller mapping the payload on its own (C++: mmap with an
# offset) has the page-aligned offset mmap requires.
HEADER_BYTES = mmap.PAGESIZE
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SegmentError(RuntimeError):
    """A segment could not be created, opened or validated."""


@dataclass(frozen=True)
class Invitation:
    """What a rank needs to open the creator's segment: small and picklable."""

    pid: int
    fd: int
    size: int  # payload bytes
    secret: bytes


class Segment:
    """One mapping of a shared segment: `size` payload bytes at `address` in this process, `payload` a
    uint8 tensor over them. `fd` is the open descriptor, or -1 once closed (see share's keep_fd). The
    memory is unmapped when the segment is closed and the last view of `payload` is gone."""

    def __init__(self, fd: int, size: int, address: int):
        self.fd = fd
        self.size = size
        whole = (ctypes.c_uint8 * (HEADER_BYTES + size)).from_address(address)
        weakref.finalize(whole, _munmap, address, HEADER_BYTES + size)  # after every view is gone
        self.payload: Optional[torch.Tensor] = torch.frombuffer(whole, dtype=torch.uint8)[HEADER_BYTES:]  # (size,)
        self.address = address + HEADER_BYTES

    def close_fd(self) -> None:
        """Close the descriptor; the mapping stays valid. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Close the descriptor and drop this segment's view; the memory is unmapped once no other view
        of `payload` is alive. Idempotent."""
        self.close_fd()
        self.payload = None

    @property
    def closed(self) -> bool:
        return self.payload is None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(fd: int, length: int) -> int:
    """mmap(fd) shared read-write; the address. libc's mmap rather than Python's, which keeps a
    duplicate of the descriptor open for as long as the mapping lives (through which any process of this
    user could open the segment again)."""
    address = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mmap of {length} bytes failed: {os.strerror(errno)}")
    return address


def _munmap(address: int, length: int) -> None:
    _libc.munmap(address, length)


def _header(address: int) -> memoryview:
    return memoryview((ctypes.c_char * HEADER_BYTES).from_address(address)).cast("B")


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int of payload bytes, got {size!r}")


def create(size: int, label: str) -> Tuple[Segment, Invitation]:
    """Make a segment of `size` payload bytes; returns it (mapped) and the invitation to send peers."""
    _check_size(size)
    fd = os.memfd_create(f"tp_kernels:{label}"[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, HEADER_BYTES + size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        address = _mmap(fd, HEADER_BYTES + size)
    except OSError as e:
        os.close(fd)
        raise SegmentError(f"creating a {size}-byte shared segment for {label!r} failed: {e}") from e
    secret = secrets.token_bytes(SECRET_BYTES)
    header = _header(address)
    header[:len(MAGIC)] = MAGIC
    header[8:16] = size.to_bytes(8, "little")
    header[16:16 + SECRET_BYTES] = secret
    return Segment(fd, size, address), Invitation(os.getpid(), fd, size, secret)


def _validate(fd: int, path: str, size: int) -> None:
    """Refuse anything but a sealed memfd of this user, mode 0600, of exactly the expected size."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SegmentError(f"{path} is not a regular file (mode {oct(st.st_mode)})")
    if st.st_uid != os.geteuid():
        raise SegmentError(f"{path} belongs to uid {st.st_uid}, not to this process's uid {os.geteuid()}")
    if stat.S_IMODE(st.st_mode) != 0o600:
        raise SegmentError(f"{path} has mode {oct(stat.S_IMODE(st.st_mode))}, expected 0o600")
    if st.st_size != HEADER_BYTES + size:
        raise SegmentError(f"{path} is {st.st_size} bytes, expected {HEADER_BYTES + size}")
    target = os.readlink(f"/proc/self/fd/{fd}")
    if not target.startswith("/memfd:tp_kernels:"):
        raise SegmentError(f"{path} is {target!r}, not a tp_kernels memfd")
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
        raise SegmentError(f"{path} is not sealed against resizing")


def open_invitation(invitation: Invitation) -> Segment:
    """Open, validate and map the segment an invitation names (in a process other than its creator)."""
    _check_size(invitation.size)
    path = f"/proc/{invitation.pid}/fd/{invitation.fd}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise SegmentError(f"cannot open the creator's segment at {path}: {e} (ranks must run on one host as "
                           "the same user, in one pid namespace)") from e
    try:
        _validate(fd, path, invitation.size)
        address = _mmap(fd, HEADER_BYTES + invitation.size)
    except BaseException:
        os.close(fd)
        raise
    header = _header(address)
    header_ok = (bytes(header[:len(MAGIC)]) == MAGIC
                 and int.from_bytes(header[8:16], "little") == invitation.size
                 and hmac.compare_digest(bytes(header[16:16 + SECRET_BYTES]), invitation.secret))
    if not header_ok:
        _munmap(address, HEADER_BYTES + invitation.size)
        os.close(fd)
        raise SegmentError(f"{path} does not carry the header and secret its creator sent: refused")
    return Segment(fd, invitation.size, address)


def gather_failures(process_group: dist.ProcessGroup, error: Optional[str]) -> Dict[int, str]:
    """Collective: {rank: error} of the ranks whose `error` is not None, the same on every rank."""
    errors: List[Optional[str]] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(errors, error, group=process_group)
    return {r: e for r, e in enumerate(errors) if e is not None}


def share(process_group: dist.ProcessGroup, rank: int, size: int, label: str, root: int = 0,
          keep_fd: bool = False) -> Segment:
    """Collective over process_group (gloo: it sends Python objects): rank `root` creates a segment of
    `size` payload bytes, every rank maps it. On success every rank returns its Segment; if any rank
    failed, every rank raises SegmentError naming the failed ranks and their reasons (and unmaps).
    keep_fd=False closes every descriptor once all ranks have mapped the segment (no process can open it
    afterwards); keep_fd=True leaves them open for the caller, who closes them."""
    _check_size(size)
    segment: Optional[Segment] = None
    error: Optional[str] = None
    box: List[Optional[Invitation]] = [None]
    if rank == root:
        try:
            segment, box[0] = create(size, label)
        except SegmentError as e:
            error = str(e)
    dist.broadcast_object_list(box, src=dist.get_global_rank(process_group, root), group=process_group)
    if rank != root and box[0] is not None:
        try:
            segment = open_invitation(box[0])
        except (SegmentError, OSError) as e:
            error = str(e)
    elif rank != root:
        error = f"rank {root} could not create the segment"
    # every rank has mapped (or failed) before this returns: the root's descriptor may be closed after it
    failed = gather_failures(process_group, error)
    if failed:
        if segment is not None:
            segment.close()
        raise SegmentError(f"shared segment {label!r} ({size} bytes): " +
                           "; ".join(f"rank {r}: {e}" for r, e in sorted(failed.items())))
    if not keep_fd:
        segment.close_fd()
    return segment
