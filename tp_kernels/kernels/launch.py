"""How the launchers start a kernel, and the split-K arrival counters they hand it.

Direct launch in eager mode. `torch.library.wrap_triton(kernel)[grid](...)` is what lets a dispatcher
tracer (make_fx, AOTAutograd's functionalization under torch.compile) record a kernel call, but in eager
mode it routes every call through the triton_kernel_wrapper_mutation higher-order op: ~330 us of host
time per call (against 6-9 us for a plain launch) and ~1.4 KB per call kept for good in torch's kernel
side table (issue 18, item 9). `kernel_for_launch` gives the plain kernel unless a tracer is recording,
so eager calls pay a launch and nothing else (tests/kernels/test_eager_launch.py checks both).

Arrival counters (split-K). A split-K program adds its partial tile to a workspace and counts itself in
at an int32 counter of its tile; the one that arrives last sums the partials and runs the epilogue, then
puts the counter back to zero. So a counter is zero between launches, and a launch needs no memset: one
kernel per call, in eager mode and in a captured CUDA graph alike. Counters live in one zeroed buffer per
device made outside any capture, cut into lanes; each stream gets its own lane, so launches on two
streams at once never share a counter. Where no lane can be had (the first launch on a device happens
inside a capture, all lanes taken, or a tracer is recording, where a persistent buffer cannot enter the
graph) a launch gets fresh zeroed counters: one memset more, the same result.

One limit, by construction: a CUDA graph keeps the lane of the stream it was captured on (torch.cuda.graph
captures on one shared side stream by default), so two graphs captured on the same stream must not be
replayed at the same time on two streams; replaying them one after another, on any stream, is safe.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Dict, Tuple

import torch
from torch.library import wrap_triton

LANES_PER_DEVICE = 8
# counters per lane: split-K runs only while the tiles are fewer than the SMs (configs.split_k_for), and
# the largest GPU in the table has 132 SMs
COUNTERS_PER_LANE = 1024

_counter_buffers: Dict[Tuple[str, int], torch.Tensor] = {}  # (device type, index) -> (LANES, COUNTERS) int32
_lanes: Dict[Tuple[str, int, int], int] = {}  # (device type, index, stream) -> lane
_warned = set()


def tracing() -> bool:
    """Whether a tracer records this call: dynamo, or a torch_dispatch mode (make_fx's proxy mode,
    AOTAutograd's FunctionalTensorMode, FakeTensorMode) on the dispatch stack."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def kernel_for_launch(kernel):
    """`kernel` to launch as `kernel_for_launch(kernel)[grid](...)`: wrap_triton's traceable wrapper
    while a tracer records, the kernel itself otherwise (see the module docstring for the cost)."""
    return wrap_triton(kernel) if tracing() else kernel


def _device_key(device: torch.device) -> Tuple[str, int]:
    if device.type == "cuda":
        return "cuda", device.index if device.index is not None else torch.cuda.current_device()
    return device.type, 0


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def arrival_counters(device: torch.device, n_tiles: int) -> torch.Tensor:
    """(n_tiles,) int32 counters, all zero, for one split-K launch on `device`'s current stream; the
    kernel leaves them zero (module docstring)."""
    if n_tiles > COUNTERS_PER_LANE or tracing():
        return torch.zeros(n_tiles, dtype=torch.int32, device=device)
    device_key = _device_key(device)
    buffer = _counter_buffers.get(device_key)
    if buffer is None:
        if _capturing(device):
            _warn_once(("capture", device_key),
                       f"tp_kernels split-K: the first launch on {device} is inside a CUDA graph capture, so its "
                       "arrival counters are zeroed by an extra memset in the graph; launch once before "
                       "capturing (a warm-up call) to keep it at one kernel")
            return torch.zeros(n_tiles, dtype=torch.int32, device=device)
        buffer = _counter_buffers[device_key] = torch.zeros(LANES_PER_DEVICE, COUNTERS_PER_LANE, dtype=torch.int32,
                                                            device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    lane = _lanes.get(device_key + (stream,))
    if lane is None:
        used = sum(1 for key in _lanes if key[:2] == device_key)
        if used == LANES_PER_DEVICE:
            _warn_once(("lanes", device_key),
                       f"tp_kernels split-K: more than {LANES_PER_DEVICE} streams on {device} launch split-K "
                       "kernels; the others zero fresh counters with an extra memset per launch")
            return torch.zeros(n_tiles, dtype=torch.int32, device=device)
        lane = _lanes[device_key + (stream,)] = used
    return buffer[lane, :n_tiles]


def source_digest(*modules) -> int:
    """A 60-bit hash of the source files of `modules`: what qkv.py puts into torch's compile-cache key
    for the Python code that picks a launch (tile sizes, split-K), which a compiled graph bakes in."""
    digest = hashlib.sha256()
    for module in modules:
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    return int(digest.hexdigest()[:15], 16)
