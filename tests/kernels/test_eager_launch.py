"""Eager launches of the Triton kernels skip torch's wrap_triton path (issue 18, item 9).

Through `wrap_triton(kernel)[grid](...)` every eager call went through the triton_kernel_wrapper_mutation
higher-order op: ~330 us of host time and an entry in torch's kernel side table (~1.4 KB, never freed)
per call. The launchers now launch the kernel itself unless a tracer records (kernels/launch.py).

No GPU is needed: the script runs with TRITON_INTERPRET=0, so the kernels are compiled-kernel objects
(JITFunction), and their launch (`JITFunction.run`) is stubbed to record the grid; the interpreter knob
is then switched on only so that the launchers' device check accepts CPU tensors. It runs in a
subprocess because this session has TRITON_INTERPRET=1 (conftest), under which the kernels are
interpreted functions that wrap_triton passes through untouched, so the slow path could not be seen.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton kernels need triton (absent with the CPU-only torch)")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CALLS = 60  # per path and round; three interleaved rounds

SCRIPT = r'''
import json, statistics, time
import torch, triton
from torch._higher_order_ops import triton_kernel_wrap
from tp_kernels.kernels import launch, matmul as matmul_module, qkv

launches = []
for kernel in (matmul_module._matmul_kernel, qkv._qkv_rope_kernel):
    assert type(kernel).__name__ == "JITFunction", type(kernel)
    kernel.run = lambda *args, grid, warmup, **kwargs: launches.append(grid)
triton.knobs.runtime.interpret = True  # only for the launchers' device check; the kernels stay JITFunctions

wrapper_calls = []
real_call = triton_kernel_wrap.TraceableTritonKernelWrapper.__call__
def counting_call(self, *args, **kwargs):
    wrapper_calls.append(1)
    return real_call(self, *args, **kwargs)
triton_kernel_wrap.TraceableTritonKernelWrapper.__call__ = counting_call
side_table = triton_kernel_wrap.kernel_side_table

a, b = torch.randn(4, 256), torch.randn(512, 256)
x, w = torch.randn(1, 1024), torch.randn((8 + 2 * 2) * 128, 1024)
cos_sin = torch.randn(64, 128)
positions = torch.tensor([3])
cache = torch.zeros(2, 64, 2, 128)
calls = {
    "matmul": lambda: matmul_module.matmul(a, b),
    "qkv_rope": lambda: qkv.qkv_rope(x, w, None, cos_sin, positions, 8, 2, 128, "neox"),
    "qkv_rope_kv_cache": lambda: qkv.qkv_rope_kv_cache(x, w, None, cos_sin, positions, positions % 2, cache,
                                                       cache, 8, 2, 128, "neox"),
}


def host_us(fn, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


result = {"direct": {}, "wrap_triton": {}}
for fn in calls.values():  # warm-up: first-call imports and caches
    fn()
table_before = (len(side_table.id_to_kernel), len(side_table.constant_args))
wrapped_before, launches_before = len(wrapper_calls), len(launches)
for name in calls:
    result["direct"][name] = []
for _ in range(3):
    for name, fn in calls.items():
        result["direct"][name] += host_us(fn, CALLS)
result["direct_wrapper_calls"] = len(wrapper_calls) - wrapped_before
result["direct_launches"] = len(launches) - launches_before
result["direct_side_table_growth"] = [len(side_table.id_to_kernel) - table_before[0],
                                      len(side_table.constant_args) - table_before[1]]

# the old path, for contrast: what a launch cost when it went through wrap_triton
launch.tracing = lambda: True
for name in calls:
    result["wrap_triton"][name] = []
table_before = len(side_table.constant_args)
for _ in range(3):
    for name, fn in calls.items():
        result["wrap_triton"][name] += host_us(fn, CALLS)
result["wrap_triton_side_table_growth"] = len(side_table.constant_args) - table_before
for path in ("direct", "wrap_triton"):
    result[path] = {name: statistics.median(ts) * 1e6 for name, ts in result[path].items()}
print("RESULT " + json.dumps(result))
'''.replace("CALLS", str(CALLS))


@pytest.fixture(scope="module")
def measured():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    print(f"host time per call, median us (GPU launch stubbed): {result}")
    return result


def test_eager_launches_do_not_take_the_wrap_triton_path(measured):
    n_calls = 3 * CALLS * 3  # three launchers, three rounds
    assert measured["direct_launches"] == n_calls, measured
    assert measured["direct_wrapper_calls"] == 0, "an eager launch went through wrap_triton's wrapper"
    assert measured["direct_side_table_growth"] == [0, 0], "eager launches grew torch's kernel side table"
    # the contrast path does grow it, one entry per call: the check above can fail
    assert measured["wrap_triton_side_table_growth"] == n_calls, measured
