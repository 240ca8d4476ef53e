"""CUDA implementations of tp_kernels::qkv_rope and tp_kernels::qkv_rope_kv_cache: the Triton kernels of
tp_kernels.kernels.qkv. Imported by tp_kernels.ops only when triton is importable; importing it
initializes no CUDA.

Why not `torch.library.triton_op`: triton_op *defines* its op (it wraps torch.library.custom_op, which
calls Library.define with a schema inferred from Python), but these schemas are defined once, in C++
(csrc/ops.cpp), and the CPU path is registered against them; defining them again from Python fails
("already defined") and would split the declaration in two. What triton_op adds to a plain op is two
registrations, and both public APIs also take an op defined elsewhere, so we make them ourselves:

1. the CUDA kernel (`torch.library.register_kernel(op, "cuda", ...)`), which in eager mode launches the
   kernel directly (tp_kernels.kernels.launch.kernel_for_launch: wrap_triton's higher-order-op dispatch
   cost ~330 us of host time per call);
2. a torch_dispatch rule for FunctionalTensorMode (`torch.library.register_torch_dispatch`): while
   AOTAutograd functionalizes a graph for torch.compile, the op is replaced by the launcher, whose
   `wrap_triton(kernel)[grid](...)` call is traced as a triton_kernel_wrapper_functional node that
   Inductor sees and compiles with the rest of the graph. torch.export keeps the op whole, as for
   triton_op (custom_triton_ops_decomposition_disabled). CPU inputs keep the op opaque: their
   implementation is the torch-native one, and traced triton kernels need CUDA tensors.

A third thing triton_op does is to list an op's kernels in torch._library.triton.triton_ops_to_kernels,
which the AOTAutograd cache key reads (the kernels' source and the globals they use): without it a warm
cache would serve a graph compiled from an older kernel. We list the kernel and qkv._launch_code_key,
whose LAUNCH_CODE_DIGEST hashes the Python that picks a launch (configs.py, the launcher), so an edit of
a config changes the key too.

The launchers take fp16, bf16 and fp32; float64 inputs run the torch-native implementation instead,
with a warning once.
"""
import warnings

import torch
import torch._library.triton
from torch._subclasses.functional_tensor import FunctionalTensorMode

from tp_kernels.kernels import qkv
from tp_kernels.ops import native

_warned_float64 = False


def _triton_or_native(triton_impl, native_impl):
    def impl(x, *args):
        if x.dtype not in qkv.SUPPORTED_DTYPES:
            global _warned_float64
            if not _warned_float64:
                _warned_float64 = True
                warnings.warn(f"tp_kernels qkv_rope: the Triton kernel takes fp16/bf16/fp32, got {x.dtype}; "
                              "running the torch-native implementation on CUDA instead", RuntimeWarning,
                              stacklevel=2)
            return native_impl(x, *args)
        return triton_impl(x, *args)
    return impl


_qkv_rope = _triton_or_native(qkv.qkv_rope, native._qkv_rope)
_qkv_rope_kv_cache = _triton_or_native(qkv.qkv_rope_kv_cache, native._qkv_rope_kv_cache)


def _decompose_cuda_calls(impl):
    """The FunctionalTensorMode rule: trace CUDA calls into their Triton kernel (see the module docstring)."""

    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        x = args[0]
        if x.device.type != "cuda" or custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return impl(*args, **kwargs)
    return rule


def _list_kernels_for_the_cache_key(name, kernels):
    """What triton_op does for the AOTAutograd cache key (module docstring). A private table of torch's:
    where a torch version lacks it, say so once rather than fail the import."""
    table = getattr(torch._library.triton, "triton_ops_to_kernels", None)
    if isinstance(table, dict):
        table[name] = kernels
    elif name == "tp_kernels::qkv_rope":
        warnings.warn(f"torch {torch.__version__} has no torch._library.triton.triton_ops_to_kernels: torch.compile's "
                      "cache key will not cover tp_kernels' Triton kernels; clear the compile cache "
                      "(TORCHINDUCTOR_CACHE_DIR) after editing them", RuntimeWarning, stacklevel=2)


for _name, _impl in (("tp_kernels::qkv_rope", _qkv_rope), ("tp_kernels::qkv_rope_kv_cache", _qkv_rope_kv_cache)):
    torch.library.register_kernel(_name, "cuda", _impl)
    torch.library.register_torch_dispatch(_name, FunctionalTensorMode, _decompose_cuda_calls(_impl))
    _list_kernels_for_the_cache_key(_name, [qkv._qkv_rope_kernel, qkv._launch_code_key])
