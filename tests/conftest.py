"""Shared test machinery: the per-dtype tolerance table, seeding, and `spawn_ranks` for multi-rank tests.

Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET must be set before any module with a
@triton.jit function is imported, or Triton finds "0 active drivers"; it is set here, first, and spawned
ranks inherit it. With a GPU it is left unset so the GPU tests run the compiled kernels (the interpreter
tests then skip); `TRITON_INTERPRET=1 make test` forces the interpreter there too.
"""
import os

import torch

if not torch.cuda.is_available():  # NVML query: does not initialize CUDA
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a warning of the interpreter

import datetime  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402
from multiprocessing.reduction import ForkingPickler  # noqa: E402
from typing import Callable, Dict, List  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import tp_kernels  # noqa: E402  (the package under test; ranks import the same one)

# ----------------------------------------------------------------------------------------------------------
# tolerances
# ----------------------------------------------------------------------------------------------------------
# (atol, rtol) for one rounding to the output dtype of values of magnitude ~1, compared with a float64
# reference. rtol is about two units of the dtype's last place (fp32 2^-23, fp16 2^-10, bf16 2^-7);
# atol covers values near zero. For a reduction over K terms of N(0,1) products the output's magnitude
# and its accumulated error both grow like sqrt(K), so `tolerance` scales atol by sqrt(K).
TOLERANCE = {
    torch.float32: (1e-5, 2.5e-7 * 8),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
    torch.float64: (1e-12, 1e-12),
}


def tolerance(dtype: torch.dtype, reduction_len: int = 1) -> Dict[str, float]:
    """assert_close keyword arguments for outputs in dtype of a reduction over reduction_len terms."""
    atol, rtol = TOLERANCE[dtype]
    return {"atol": atol * max(1.0, reduction_len ** 0.5), "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, reduction_len: int = 1,
                 msg: str = "") -> None:
    """Compare an output (any dtype) with its float64 reference, within the table's tolerance for dtype."""
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{msg} output has non-finite values (unwritten poison?)"
    torch.testing.assert_close(actual.double(), expected.double(), **tolerance(dtype, reduction_len),
                               msg=lambda m: f"{msg} [{dtype}, K={reduction_len}] {m}")


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like t full of NaN, so elements a kernel fails to write show up."""
    return torch.full_like(t, float("nan"))


# ----------------------------------------------------------------------------------------------------------
# seeding: a different, reproducible seed per test case
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def seed(request) -> int:
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


# ----------------------------------------------------------------------------------------------------------
# multi-rank tests: a pool of rank processes per world size, kept for the session
# ----------------------------------------------------------------------------------------------------------
RANK_TIMEOUT_S = 180.0  # a task that has not finished by then on every rank is reported as hung
GLOO_TIMEOUT_S = 60.0


def _rank_main(rank: int, world_size: int, init_file: str, tasks, results) -> None:
    import torch.distributed as dist

    # Up to 4 ranks share 2 cores: more threads per rank only oversubscribes them.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    from tp_kernels.distributed import TPGroup

    tp = TPGroup.from_group()
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            with torch.no_grad():  # results cross the process boundary, which autograd cannot
                out = fn(tp, *args)
            ForkingPickler.dumps(out)  # fail here, reported, not later in the queue's feeder thread
            results.put((rank, True, out))
        except BaseException:  # noqa: BLE001  (reported to the parent, which raises it in the test)
            results.put((rank, False, traceback.format_exc()))
    tp.close()
    dist.destroy_process_group()


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tp_kernels.__file__)))


class RankPool:
    """world_size processes with an initialized gloo group, running functions sent to them."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tmp = tempfile.mkdtemp(prefix="tp_kernels-rdzv-")
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_rank_main, daemon=True,
                                  args=(rank, world_size, os.path.join(self.tmp, "init"), self.tasks[rank],
                                        self.results))
                      for rank in range(world_size)]
        # A spawned process starts with the parent's sys.path. Put the tp_kernels under test first, so the
        # ranks import the same one (the source tree, or the installed copy in the CPU-only-torch run)
        # whatever a test module has since put in front of it (bench/ scripts add the repo root).
        saved_path = list(sys.path)
        sys.path.insert(0, _PACKAGE_ROOT)
        try:
            for p in self.procs:
                p.start()
        finally:
            sys.path[:] = saved_path

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> List:
        for q in self.tasks:
            q.put((fn, args))
        done: Dict[int, object] = {}
        failures: Dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(done) + len(failures) < self.world_size:
            remaining = deadline - time.monotonic()
            if failures:  # the others may be blocked in a collective with the failed rank: grace, not the full wait
                remaining = min(remaining, 15.0)
            try:
                rank, ok, payload = self.results.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                missing = sorted(set(range(self.world_size)) - set(done) - set(failures))
                if failures:
                    break
                raise TimeoutError(f"ranks {missing} of {self.world_size} did not finish {fn.__name__} within "
                                   f"{timeout_s:.0f} s (dead processes: {dead})")
            (done if ok else failures)[rank] = payload
        if failures:
            report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
            raise RankError(f"{fn.__name__} failed on ranks {sorted(failures)}:\n{report}")
        return [done[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self.tmp, ignore_errors=True)


class RankError(AssertionError):
    """A function run by spawn_ranks raised on one or more ranks; the message holds their tracebacks."""


_POOLS: Dict[int, RankPool] = {}


def spawn_ranks(world_size: int, fn: Callable, *args, fresh: bool = False, timeout_s: float = RANK_TIMEOUT_S) -> List:
    """Run fn(tp, *args) on world_size CPU ranks (gloo, file:// rendezvous) and return the per-rank results.

    fn must be a module-level function (it is pickled to the ranks) taking the rank's TPGroup first.
    Ranks are pooled per world size for the session, since starting a process that imports torch costs
    seconds; fresh=True uses new processes and closes them afterwards (for tests that kill ranks or leave
    them in a broken state). A failure or a hang closes the pool, so the next test starts clean.
    """
    if fresh:
        pool = RankPool(world_size)
        try:
            return pool.run(fn, args, timeout_s)
        finally:
            pool.close()
    pool = _POOLS.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = RankPool(world_size)
    try:
        return pool.run(fn, args, timeout_s)
    except BaseException:
        _POOLS.pop(world_size, None)
        pool.close()
        raise


def pytest_sessionfinish(session, exitstatus):
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


# ----------------------------------------------------------------------------------------------------------
# markers
# ----------------------------------------------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU; run `make test` on a GPU node (see README, 'GPU tests')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; run `make test` on a GPU node "
                                                    "(see README, 'GPU tests')"))
