"""tp_kernels: fused tensor-parallel ops for LLM inference in PyTorch.

    import tp_kernels
    tp = tp_kernels.TPGroup.init()                    # or TPGroup.from_group(pg), TPGroup.single()
    y = tp_kernels.ops.gemm_allreduce(x, w, b, tp)     # torch.ops.tp_kernels.* with typed wrappers
    layer = tp_kernels.layers.RowParallelLinear.from_linear(linear, tp)
    model = tp_kernels.parallelize(hf_model, tp)      # a Hugging Face causal LM (Llama, Qwen3, Phi3, ...), in place
    tp_kernels.save_pretrained(model, "out/")         # every rank: one full checkpoint transformers reloads
    tp_kernels.calibrate(tp)                          # optional, collective: lets chunks=None plan on this CPU host

Importing initializes no CUDA and works without the compiled extension (with a warning).
"""
from tp_kernels import _extension  # noqa: F401  (loads _C first: it declares the op schemas)
from tp_kernels import layers, ops, reference  # noqa: F401
from tp_kernels.distributed import TPGroup
from tp_kernels.parallelize import parallelize, save_pretrained  # transformers is imported only when called
from tp_kernels.perf.calibration import calibrate

__version__ = "0.1.0"
__all__ = ["TPGroup", "calibrate", "layers", "ops", "parallelize", "reference", "save_pretrained"]
