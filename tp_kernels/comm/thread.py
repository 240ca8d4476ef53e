"""One persistent communication thread per TPGroup, for the CPU overlap pipelines.

A pipeline (tp_kernels.ops.overlap_cpu) computes chunk i+1's GEMM on the calling thread while this thread
runs chunk i's collective. One worker per group, fed in FIFO order, so every rank issues the group's
collectives in the same order as the others do.

Invariant (whoever adds collectives must keep it): the collectives of a group are issued by the calling
thread or by the group's communication thread, never by both at the same time. A pipeline submits its
chunks and waits for every one of them (also when it fails part-way) before it returns, so no
collective of the group is still running on this thread when the calling thread issues its next one.
Torch's GEMMs and gloo's collectives release the GIL, which is what lets the two threads run at once.
The thread registers itself with the group when it starts (TPGroup._allow_comm_thread), as the one thread
besides the group's owner that may issue its collectives; the shm communicator raises if the two ever
overlap.
"""
from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, List, Sequence

if TYPE_CHECKING:
    from tp_kernels.distributed import TPGroup

_THREADS: "weakref.WeakKeyDictionary[TPGroup, ThreadPoolExecutor]" = weakref.WeakKeyDictionary()


def for_group(tp: "TPGroup") -> ThreadPoolExecutor:
    """The group's communication thread (a one-worker executor), started on first use and shut down
    when the TPGroup is garbage-collected."""
    executor = _THREADS.get(tp)
    if executor is None:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tp_kernels-comm-{tp.name}",
                                      initializer=_register, initargs=(weakref.ref(tp),))
        _THREADS[tp] = executor
        weakref.finalize(tp, executor.shutdown, wait=False)
    return executor


def _register(tp_ref: "weakref.ref[TPGroup]") -> None:
    tp = tp_ref()
    if tp is not None:
        tp._allow_comm_thread(threading.get_ident())


def submit(tp: "TPGroup", fn: Callable, *args) -> Future:
    """Run fn(*args) on tp's communication thread, after everything submitted before it."""
    return for_group(tp).submit(fn, *args)


def wait_all(futures: Sequence[Future]) -> List:
    """The results of every future, in order. All are waited for before the first error (if any) is
    raised, so nothing of this call is left running on the communication thread."""
    results, first_error = [], None
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:  # noqa: BLE001  (re-raised below, after the others finished)
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return results


def drain(futures: Sequence[Future]) -> None:
    """Wait for every future and drop their results and errors: used while another error propagates."""
    for future in futures:
        try:
            future.result()
        except BaseException:  # noqa: BLE001  (the caller is already raising the error that matters)
            pass
