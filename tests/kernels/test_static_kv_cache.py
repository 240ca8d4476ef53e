"""The decoder's KV caches are marked as static addresses (torch._dynamo.mark_static_address) where they are
made (GPT.new_cache): torch.compile(mode="reduce-overhead") skips CUDA graphs for a graph that writes into
an input whose address is not static (issue 18, item 15). The GPU check of the graphs themselves is
tests/gpu/test_triton_gpu.py::test_reduce_overhead_keeps_cuda_graphs_with_the_kv_cache."""
import torch

from tp_kernels import TPGroup
from tp_kernels.models import GPT


def test_new_cache_marks_every_layer_static():
    model = GPT.from_preset("tiny", TPGroup.single(), seed=0)
    cache = model.new_cache(2, 8)
    assert len(cache.k) == len(cache.v) == len(model.blocks)
    for t in cache.k + cache.v:
        # what mark_static_address sets and dynamo reads when it wraps the tensor as a graph input
        assert getattr(t, "_dynamo_static_input_type", None) == "unguarded"
