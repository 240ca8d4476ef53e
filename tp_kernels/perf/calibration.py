"""The Hardware a group's overlap ops plan their chunk counts with, and the explicit calibration of a CPU host.

Where the constants come from, first match:
1. `set_hardware(tp, hw)` or `calibrate(tp)` (which measures this host and sets them);
2. a CUDA device: the datasheet entry of its GPU (cost_model.HARDWARE; the H100's, with a warning, for
   an unknown GPU);
3. otherwise (a CPU group never calibrated): none; the ops then run chunks=None as one chunk, which is
   what the CPU measurements support (README: extra chunks did not pay on this host).
No op measures, writes files or runs collectives of its own to get them: calibration is a call of yours.

The chunk count of a pipelined op decides how many collectives each rank issues, so every rank of a
group must plan with the same constants: `calibrate` measures on every rank and averages the figures over
the group, or sends rank 0's cached figures to all; it is collective (call it on every rank). The cache is
one JSON file per host, world size, thread count, backend and torch version under TP_KERNELS_CACHE_DIR
(default ~/.cache/tp_kernels).
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import stat
import statistics
import tempfile
import time
import weakref
from typing import Callable, Dict, Optional

import torch

from tp_kernels.perf import cost_model
from tp_kernels.distributed import TPGroup
from tp_kernels.comm import thread as comm_thread

log = logging.getLogger(__name__)

_HARDWARE: "weakref.WeakKeyDictionary[TPGroup, cost_model.Hardware]" = weakref.WeakKeyDictionary()
_WARNED_GPUS = set()
CACHE_ENV = "TP_KERNELS_CACHE_DIR"
# Sizes of the calibration: a GEMM of 2 * 64 * 256 * 256 = 8 MFLOP (4 ms in fp32 on one loaded core at
# 2 GFLOP/s; 50 ms in bf16, which these x86 cores run at ~0.15 GFLOP/s without native bf16 math), an
# all-reduce of 1 KB (latency) and of 1 MB (bandwidth), five repeats each: ~0.5 s in all.
_GEMM_SHAPE = (64, 256, 256)
_SMALL_ELEMS, _LARGE_ELEMS = 256, 256 * 1024
_REPEATS = 5
_FIELDS = ("tflops_bf16", "tflops_fp32", "hbm_gbps", "link_gbps", "link_latency_us", "launch_overhead_us",
           "overlap_efficiency")
# The cache is read by rank 0 alone and trusted only when it is a regular file of this user (no symlink,
# FIFO or device: opened with O_NOFOLLOW | O_NONBLOCK, read to at most CACHE_MAX_BYTES) holding every figure
# as a finite number in its range (no NaN, inf, zero, negative, boolean or huge value). Anything else is a
# warning and a fresh calibration, never an exception on rank 0 alone: what rank 0 decides reaches the
# other ranks in the same collective, so the ranks cannot diverge.
# A cache file is ~300 bytes; anything much larger is not one (and /dev/zero would never end).
CACHE_MAX_BYTES = 64 << 10
# (lowest, highest) of each figure, lowest excluded except where marked: every rate and time is > 0 (the
# cost model divides by rates; zero raised ZeroDivisionError), 1e15 is far above any machine yet keeps the
# model's arithmetic finite; overlap_efficiency is a fraction in [0, 1].
_UPPER = 1e15
_RANGES = {name: (0.0, _UPPER) for name in _FIELDS}
_RANGES["overlap_efficiency"] = (0.0, 1.0)
_ZERO_ALLOWED = {"overlap_efficiency"}


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tp_kernels")


def set_hardware(tp: TPGroup, hw: Optional[cost_model.Hardware]) -> None:
    """Plan tp's overlap ops with hw (e.g. a GPU of cost_model.HARDWARE, or constants of your own); None
    goes back to the default (datasheet on CUDA, one chunk on CPU). Call it on every rank with the same hw."""
    if hw is None:
        _HARDWARE.pop(tp, None)
        return
    if not isinstance(hw, cost_model.Hardware):
        raise TypeError(f"hw must be a tp_kernels.perf.cost_model.Hardware or None, got {type(hw).__name__}")
    _HARDWARE[tp] = hw


def hardware_for(tp: TPGroup, device: torch.device) -> Optional[cost_model.Hardware]:
    """The constants tp's ops plan with on device: set_hardware's or calibrate's, else the datasheet of the
    device's GPU, else None (a CPU group never calibrated). Never measures, reads files or communicates."""
    hw = _HARDWARE.get(tp)
    if hw is not None:
        return hw
    if device.type == "cuda":
        return _gpu_hardware(device)
    return None


def calibrate(tp: TPGroup, force: bool = False) -> cost_model.Hardware:
    """Measure this CPU host for tp's overlap ops (or take rank 0's cached figures unless force) and plan
    with the result from now on; returns it. Collective: call it on every rank of tp. ~0.5 s."""
    hw = calibrate_cpu(tp, force)
    set_hardware(tp, hw)
    return hw


def _gpu_hardware(device: torch.device) -> cost_model.Hardware:
    name = torch.cuda.get_device_name(device)
    for key, hw in cost_model.HARDWARE.items():
        if key in name:
            return hw
    if name not in _WARNED_GPUS:
        _WARNED_GPUS.add(name)
        log.warning("tp_kernels: no constants for GPU %r; overlap chunk counts are planned with the H100's. "
                    "Give yours with tp_kernels.perf.calibration.set_hardware(tp, Hardware(...)).", name)
    return cost_model.HARDWARE["H100"]


# ----------------------------------------------------------------------------------------------------------
# CPU calibration
# ----------------------------------------------------------------------------------------------------------
def _cache_path(tp: TPGroup) -> str:
    probe = torch.empty(_LARGE_ELEMS, dtype=torch.float32)
    backend = tp.communicator_for(probe).name
    key = (f"{socket.gethostname()}-ws{tp.world_size}-threads{torch.get_num_threads()}-{backend}-"
           f"torch{torch.__version__}")
    return os.path.join(cache_dir(), f"overlap-calibration-{key.replace('/', '_')}.json")


def _median_time_s(fn: Callable[[], object], repeats: int = _REPEATS) -> float:
    fn()  # warm-up: first-call allocations and lazy initialization
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(tp: TPGroup) -> Dict[str, float]:
    """This rank's figures. Every rank runs the same collectives in the same order."""
    m, n, k = _GEMM_SHAPE
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        rates[dtype] = 2.0 * m * n * k / _median_time_s(lambda: a @ b) / 1e12
    tiny_a, tiny_b = torch.randn(1, 16), torch.randn(16, 16)
    launch_s = _median_time_s(lambda: tiny_a @ tiny_b)
    src = torch.randn(2 * 1024 * 1024)  # 8 MB: a copy larger than the L2 of these hosts
    copy_s = _median_time_s(lambda: src.clone())
    small, large = torch.randn(_SMALL_ELEMS), torch.randn(_LARGE_ELEMS)
    t_small = _median_time_s(lambda: tp.all_reduce(small))
    t_large = _median_time_s(lambda: tp.all_reduce(large))
    share = 2.0 * (tp.world_size - 1) / tp.world_size
    link_gbps = share * (_LARGE_ELEMS - _SMALL_ELEMS) * 4 / max(t_large - t_small, 1e-9) / 1e9
    # Overlap: a GEMM of about the large all-reduce's duration on this thread, the all-reduce on the
    # communication thread, as the pipeline runs them.
    gemm_rows = max(1, int(m * t_large / max(2.0 * m * n * k / (rates[torch.float32] * 1e12), 1e-9)))
    a, b = torch.randn(gemm_rows, k), torch.randn(k, n)
    t_gemm = _median_time_s(lambda: a @ b)

    def both():
        future = comm_thread.submit(tp, tp.all_reduce, large)
        a @ b
        future.result()

    t_both = _median_time_s(both)
    hidden = t_gemm + t_large - t_both
    efficiency = min(1.0, max(0.0, hidden / max(min(t_gemm, t_large), 1e-9)))
    return {"tflops_bf16": rates[torch.bfloat16], "tflops_fp32": rates[torch.float32],
            "hbm_gbps": 2.0 * src.numel() * 4 / copy_s / 1e9, "link_gbps": link_gbps,
            "link_latency_us": t_small * 1e6, "launch_overhead_us": launch_s * 1e6,
            "overlap_efficiency": efficiency}


def figures_problem(figures) -> Optional[str]:
    """Why figures (parsed JSON) are not a calibration, or None: a dict with every field of _FIELDS a
    finite int or float (not bool) within its range."""
    if not isinstance(figures, dict):
        return f"holds a {type(figures).__name__}, not an object of figures"
    for name in _FIELDS:
        if name not in figures:
            return f"has no {name!r}"
        value = figures[name]
        if type(value) not in (int, float):  # bool is an int subclass: excluded by the exact type
            return f"has {name} = {value!r}, not a number"
        low, high = _RANGES[name]
        # compared as given: float() of a huge int would raise OverflowError
        if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high or (
                value == low and name not in _ZERO_ALLOWED):
            bounds = f"[{low:g}, {high:g}]" if name in _ZERO_ALLOWED else f"({low:g}, {high:g}]"
            shown = value if isinstance(value, float) or abs(value) < _UPPER else f"an int of {len(str(value))} digits"
            return f"has {name} = {shown}, outside {bounds}"
    return None


def _read_bounded(path: str) -> Optional[bytes]:
    """The bytes of path if it is a regular file of this user of at most CACHE_MAX_BYTES; None if it does not
    exist; raises ValueError saying why otherwise."""
    try:
        # O_NOFOLLOW: a symlink fails with ELOOP; O_NONBLOCK: opening a FIFO does not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot be opened as a regular file ({e.strerror}; symlinks are refused)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"is not a regular file (mode {oct(st.st_mode)})")
        if st.st_uid != os.geteuid():
            raise ValueError(f"belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
        chunks, size = [], 0
        while size <= CACHE_MAX_BYTES:
            chunk = os.read(fd, CACHE_MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > CACHE_MAX_BYTES:
            raise ValueError(f"is larger than {CACHE_MAX_BYTES} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _reject_constant(name: str):
    raise ValueError(f"holds {name}")  # json's NaN / Infinity / -Infinity literals


def _read_cache(path: str) -> Optional[Dict[str, float]]:
    """Rank 0's cached figures, or None: when there is no cache, or (with a warning saying why) when it is
    not a regular file of this user or does not hold a valid calibration. Never raises: rank 0 must reach
    the collective that tells the other ranks what it decided."""
    try:
        data = _read_bounded(path)
        if data is None:
            return None
        figures = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        problem = figures_problem(figures)
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as e:
        problem = str(e)
    except Exception as e:  # noqa: BLE001  (anything at all: warned, and calibrated afresh, on every rank)
        problem = f"could not be read ({type(e).__name__}: {e})"
    if problem is not None:
        log.warning("tp_kernels: ignoring the calibration cache %s: it %s; calibrating afresh", path, problem)
        return None
    return {name: float(figures[name]) for name in _FIELDS}


def _write_cache(path: str, figures: Dict[str, float]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(figures, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one


def calibrate_cpu(tp: TPGroup, force: bool = False) -> cost_model.Hardware:
    """The CPU Hardware of this host for tp, identical on every rank. Collective: call it on every rank.

    Rank 0's cached figures are used when it has them (and force is False); otherwise every rank
    measures (~0.1 s) and the group's mean is used and cached by rank 0."""
    if tp.world_size < 2:
        raise ValueError(f"calibrate_cpu needs a group of at least 2 ranks to time its collectives, "
                         f"got world size {tp.world_size}")
    path = _cache_path(tp)
    # [have cache, figures...] from rank 0 only, the other ranks contribute zeros: the sum is rank 0's.
    message = torch.zeros(1 + len(_FIELDS), dtype=torch.float64)
    cached = None if force or tp.rank != 0 else _read_cache(path)
    if cached is not None:
        message[0] = 1.0
        message[1:] = torch.tensor([cached[name] for name in _FIELDS], dtype=torch.float64)
    message = tp.all_reduce(message)
    if message[0] == 1.0:
        figures = dict(zip(_FIELDS, message[1:].tolist()))
        source = f"calibrated on {socket.gethostname()} (cached in {path})"
    else:
        mine = _measure(tp)
        mean = tp.all_reduce(torch.tensor([mine[name] for name in _FIELDS], dtype=torch.float64)) / tp.world_size
        figures = dict(zip(_FIELDS, mean.tolist()))
        problem = figures_problem(figures)
        if problem is not None:  # the same on every rank: the mean is the same bits everywhere
            raise RuntimeError(f"calibration of group {tp.name} measured figures that no model can use: it {problem}")
        if tp.rank == 0:
            _write_cache(path, figures)
        source = (f"calibrated on {socket.gethostname()} at {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"(mean of {tp.world_size} ranks)")
        log.info("tp_kernels: calibrated the overlap cost model of group %s: %s", tp.name, figures)
    return cost_model.Hardware(name=f"cpu:{socket.gethostname()}", source=source, **figures)
