"""The CUDA dispatch of tp_kernels::qkv_rope and ::qkv_rope_kv_cache is traceable: under the
functionalization that torch.compile's AOTAutograd runs (FunctionalTensorMode), a call on CUDA tensors
becomes a triton_kernel_wrapper_functional node holding the Triton kernel (what torch.library.triton_op
gives an op; see tp_kernels/ops/triton_impls.py), while a call on CPU tensors stays the opaque op.

No GPU is needed: the tensors are fake CUDA tensors (FakeTensorMode), and the only device query, the
compute capability that picks the config table, is answered as sm_90 (and the SM count that the split-K
policy reads as an H100's). It runs in a subprocess because
this session sets TRITON_INTERPRET=1, under which wrap_triton returns the interpreted kernel, which
cannot be traced.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton CUDA implementation needs triton (absent with the CPU-only torch)")

from tp_kernels._extension import _C  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRACE_SCRIPT = r'''
import torch
torch.cuda.get_device_capability = lambda device=None: (9, 0)  # no GPU here: pretend sm_90 for the table
import tp_kernels  # noqa: F401
from tp_kernels.kernels import configs
configs.sm_count = lambda device: configs.SM_COUNT["sm_90"]  # and an H100's SMs for the split-K policy
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx


def trace(device):
    with FakeTensorMode():
        # hidden 4096: 16 decode tiles split K in 4 (split-K's workspace and counters enter the graph)
        x = torch.empty(5, 4096, device=device, dtype=torch.bfloat16)
        w = torch.empty(4 * 64, 4096, device=device, dtype=torch.bfloat16)
        cos_sin = torch.empty(96, 64, device=device)
        positions = torch.zeros(5, dtype=torch.int64, device=device)
        k_cache = torch.empty(2, 16, 1, 64, device=device, dtype=torch.bfloat16)

    def f(x, w, cos_sin, positions, k_cache, v_cache):
        q, k, v = torch.ops.tp_kernels.qkv_rope(x, w, None, cos_sin, positions, 2, 1, 64, "neox")
        q2 = torch.ops.tp_kernels.qkv_rope_kv_cache(x, w, None, cos_sin, positions, positions % 2, k_cache,
                                                    v_cache, 2, 1, 64, "gptj")
        return q + q2, k, v

    gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(x, w, cos_sin, positions, k_cache,
                                                                 torch.empty_like(k_cache))
    print(f"=== {device}")
    print(gm.code)


trace("cuda")
trace("cpu")
'''


@pytest.mark.skipif(_C is None, reason="tp_kernels._C (the op schemas) is not built")
def test_cuda_calls_trace_into_the_triton_kernel_and_cpu_calls_stay_ops():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cuda_graph, cpu_graph = proc.stdout.split("=== cpu")
    assert cuda_graph.count("triton_kernel_wrapper_functional(") == 2, cuda_graph
    assert "tp_kernels.qkv_rope" not in cuda_graph, cuda_graph
    # the KV-cache variant's kernel writes through the cache inputs (arg4_1, arg5_1); copying the
    # functional result back into them is AOTAutograd's epilogue (GPU compile test), not this trace's
    assert "'WRITE_KV_CACHE': True" in cuda_graph and "'k_ptr': arg4_1, 'v_ptr': arg5_1" in cuda_graph, cuda_graph
    # under a tracer the split-K counters are fresh zeros in the graph, not the eager persistent buffer
    assert cuda_graph.count("'SPLIT_K': True") == 2 and "torch.ops.aten.zeros.default" in cuda_graph, cuda_graph
    assert "tp_kernels.qkv_rope.default" in cpu_graph and "tp_kernels.qkv_rope_kv_cache.default" in cpu_graph
    assert "triton_kernel_wrapper" not in cpu_graph, cpu_graph
