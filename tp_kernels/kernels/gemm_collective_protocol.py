"""The tile/signal protocol shared by the fused GEMM + collective kernels (gemm_collective_reduce.py,
gemm_collective_gather.py), over the symmetric buffers of tp_kernels.comm.symmetric.

Signals. A signal is an int64 word in a rank's buffer, written by one program with a system-scope
release and polled by another with a system-scope acquire. Its value is `tag * 256 + flag`:
- tag = epoch * 2^16 + signature. The epoch is the call number, the same on every rank (each rank's
  control word, advanced by the last program of each launch), so back-to-back calls need no pass that
  resets signals: a word left from an earlier call never equals this call's tag. The signature is a
  16-bit hash of the call's arguments (op, shapes, dtype, bias, algorithm) computed by the launcher, so a
  rank called with other arguments never satisfies a wait: it times out naming that rank instead of
  mixing tiles of different shapes.
- flag = 0 for data that is there; k > 0 relays "rank k - 1 did not arrive" from a rank that gave up,
  so the ranks downstream name the rank that is really missing.

Waits are bounded: on a GPU by the global timer (timeout_ns); under the interpreter, which has no clock
a kernel can read, by an abort level a host watchdog raises by one per timeout. A program that gives up
records the missing rank (the first one wins) in the device control word, which makes the other waits
of this launch give up at once, and in the host-visible status word the launcher reads.

Parity. A call uses the half of the signal and data regions of parity epoch % 2. A rank cannot start call
e + 2 before every peer has finished call e: call e + 1 makes it wait for data each peer produces in its
own call e + 1, which that peer starts only after its call e kernel ended. So call e + 2 never
overwrites what a slow peer is still reading from call e, and two halves suffice.

Deadlock freedom. Within a launch, a program waits only for programs that never wait (pushers,
publishers) or for the program of the same tile index on the other ranks, which raises what it owes
before it waits itself. With programs dispatched in index order (what GPUs do; the interpreter runs them
one by one), the waiting program of lowest index always finds its producer dispatched.
"""
import triton
import triton.language as tl

from tp_kernels.comm import symmetric

CONTROL_EPOCH = tl.constexpr(symmetric.CONTROL_EPOCH)
CONTROL_ARRIVALS = tl.constexpr(symmetric.CONTROL_ARRIVALS)
CONTROL_FAILED = tl.constexpr(symmetric.CONTROL_FAILED)
STATUS_MISSING = tl.constexpr(symmetric.STATUS_MISSING)
STATUS_ABORT = tl.constexpr(symmetric.STATUS_ABORT)
SIGNAL_BYTES = tl.constexpr(symmetric.SIGNAL_BYTES)
SIGNATURE_BITS = 16  # host side: signature < 2^16
FLAG_BITS = 8  # host side: flag < 2^8, so world sizes up to 255


@triton.jit
def _minimum(a, b):
    """Combine function of the min-reductions below. tl.reduce with it rather than tl.min: the
    interpreter calls a combine function directly, while every call of the jit function tl.min costs
    it milliseconds (it patches triton.language again), and the waits reduce in their spin loops."""
    return tl.minimum(a, b)


@triton.jit
def raise_signals(signal_ptrs, tag, flag, valid=None):
    """Publish what this program stored before (matches a wait_signals on the same words); signal_ptrs
    one pointer or a vector of them, valid the lanes to raise (None: all). The barrier makes every thread's stores of
    the tile happen before the release stores that publish them."""
    tl.debug_barrier()
    tl.atomic_xchg(signal_ptrs, tag * 256 + flag, mask=valid, sem="release", scope="sys")


@triton.jit
def wait_signals(signal_ptrs, ranks, valid, tag, control_ptr, status_ptr, timeout_ns, patience,
                 USE_GLOBALTIMER: tl.constexpr):
    """Wait until every valid word of the vector signal_ptrs holds this call's tag (matches
    raise_signals); ranks[i] is the rank that raises word i. Returns 0 when all arrived with their data,
    else 1 + the lowest rank to blame: the rank a relayed failure names (flag k > 0: rank k - 1), or the
    rank of a word this wait gave up on. It gives up after patience timeouts (GPU: the global timer;
    interpreter: the watchdog's abort level reaching patience), or at once when another wait of this
    launch gave up. A wait for data that another rank relays has patience 2, so that rank's own wait
    (patience 1) gives up first and relays the name of the rank that is really missing. The trailing
    barrier orders every thread's loads of the data after the acquire."""
    seen = tl.atomic_add(signal_ptrs, 0, mask=valid, sem="acquire", scope="sys")
    arrived = ((seen >> 8) == tag) | (valid == 0)
    deadline = timeout_ns
    if USE_GLOBALTIMER:
        deadline = tl.extra.cuda.globaltimer() + patience * timeout_ns
    give_up = 0
    while (tl.reduce(arrived.to(tl.int32), 0, _minimum) == 0) & (give_up == 0):
        failed_here = tl.load(control_ptr + CONTROL_FAILED, volatile=True) != 0
        if USE_GLOBALTIMER:
            give_up = (failed_here | (tl.extra.cuda.globaltimer() > deadline)).to(tl.int32)
        else:  # matches SymmetricBuffer's watchdog, which raises the abort level once per timeout
            give_up = (failed_here | (tl.load(status_ptr + STATUS_ABORT, volatile=True) >= patience)).to(tl.int32)
        seen = tl.atomic_add(signal_ptrs, 0, mask=valid, sem="acquire", scope="sys")
        arrived = ((seen >> 8) == tag) | (valid == 0)
    tl.debug_barrier()
    flag = (seen & 255).to(tl.int32)
    no_blame = 1 << 30
    blame = tl.where(valid == 0, no_blame,
                     tl.where(arrived, tl.where(flag > 0, flag, no_blame), ranks + 1))  # rank + 1 per lane
    lowest = tl.reduce(blame, 0, _minimum)
    return tl.where(lowest == no_blame, 0, lowest)


@triton.jit
def record_missing(control_ptr, status_ptr, missing_rank):
    """Record that missing_rank did not arrive: the first record wins, on the device (ends the other
    waits of this launch) and in host-visible memory (read by SymmetricBuffer after the launch)."""
    code = (missing_rank + 1).to(tl.int64)
    tl.atomic_cas(control_ptr + CONTROL_FAILED, tl.zeros_like(code), code, sem="relaxed", scope="gpu")
    tl.atomic_cas(status_ptr + STATUS_MISSING, tl.zeros_like(code), code, sem="relaxed", scope="sys")


@triton.jit
def finish_program(control_ptr, n_programs):
    """Every program ends here: the last to arrive advances the epoch for the next launch (whose
    programs all read it at their start; a launch starts after the previous one ended)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(control_ptr + CONTROL_ARRIVALS, 1, sem="acq_rel", scope="gpu")
    if arrived == n_programs - 1:
        tl.store(control_ptr + CONTROL_ARRIVALS, 0)
        tl.store(control_ptr + CONTROL_EPOCH, tl.load(control_ptr + CONTROL_EPOCH) + 1)
