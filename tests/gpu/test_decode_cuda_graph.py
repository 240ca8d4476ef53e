"""generate(compile=True) on a GPU: the compiled decode step captured as one CUDA graph and replayed per
token gives the eager tokens (greedy and sampled), TP=1. Skips without CUDA; run on a GPU node with
`python -m pytest tests/gpu/test_decode_cuda_graph.py`."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="the CUDA qkv_rope kernel needs triton (absent with the CPU-only torch)")

# gpu: skipped without CUDA (conftest); interpreted kernels would copy CUDA tensors to the host, not capture
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(triton.knobs.runtime.interpret,
                                                  reason="TRITON_INTERPRET=1 (conftest sets it without a GPU)")]

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
NEW_TOKENS = 8


@pytest.mark.parametrize("sampled", [False, True])
def test_captured_decode_gives_the_eager_tokens(sampled):
    from tp_kernels.distributed import TPGroup
    from tp_kernels.models import GPT, generate
    from tp_kernels.models.cuda_graph import CapturedDecodeStep

    model = GPT.from_preset("tiny", TPGroup.single(), dtype=torch.float32, device="cuda", seed=7)
    sampling = dict(temperature=0.8, top_k=40, seed=3) if sampled else {}
    eager, _ = generate(model, PROMPTS, NEW_TOKENS, **sampling)
    captured, stats = generate(model, PROMPTS, NEW_TOKENS, compile=True, **sampling)
    assert captured == eager
    assert stats.compile_s > 0 and len(stats.step_s) == NEW_TOKENS - 1
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        CapturedDecodeStep(lambda *a: None, GPT.from_preset("tiny", TPGroup.single()), None)
