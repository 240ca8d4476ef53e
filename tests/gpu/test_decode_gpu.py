"""The GPT decoder on GPU: greedy tokens at TP=1 and TP=2 equal those of the unsharded Hugging Face model.

The reference is transformers' own Llama (unsharded, float32, CPU) on the tiny checkpoint of
tests/models/hf_models.py (grouped-query attention, vocab 101: divisible by neither 2 nor 4, sharded files).
The decoder loads it on the GPU in float32 (the Triton QKV kernel accumulates in IEEE fp32 there) at TP=1 in
this process and at TP=2 on two CPU-gloo ranks, rank r on GPU r % (visible GPUs). On one GPU both ranks
share it; their collectives on CUDA tensors then take torch's gloo path (through the host), which this test
does not time. Teacher-forced logits are compared with HF's float64 logits too, so a wrong token comes with
the logits that caused it.

Run on a GPU node:  python -m pytest tests/gpu/test_decode_gpu.py -q   (part of `make gpu-check`)
"""
import os
import sys

import pytest
import torch

from conftest import assert_close, spawn_ranks
from tp_kernels import _extension

transformers = pytest.importorskip("transformers", reason="the reference is Hugging Face transformers' Llama")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
import hf_models  # noqa: E402  (tests/models: the tiny checkpoints of the CPU parity tests)

from tp_kernels.distributed import TPGroup  # noqa: E402
from tp_kernels.models import GPT, generate  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; see README, 'GPU tests'")]

NEW_TOKENS = 16
PROMPT_LENGTHS = [5, 12, 9]  # one right-padded batch
SEQ = 12  # teacher-forced tokens per row


@pytest.fixture(autouse=True)
def _needs_cuda_build():
    if not _extension.built_with_cuda():
        pytest.skip("tp_kernels._C was built without CUDA: the decoder's CUDA ops are missing")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoint, inputs, HF's float64 logits and HF's float32 greedy tokens (prompt by prompt)."""
    gen = torch.Generator().manual_seed(20261201)
    cls, model = hf_models.build("llama")
    path = hf_models.save(model, str(tmp_path_factory.mktemp("llama")), sharded=True)
    ids = torch.randint(0, hf_models.VOCAB, (2, SEQ), generator=gen)
    prompts = [torch.randint(0, hf_models.VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    with torch.no_grad():
        logits_fp64 = cls.from_pretrained(path, dtype=torch.float64).eval()(ids).logits
        greedy = []
        for p in prompts:
            seq = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long))
            greedy.append(seq[0, len(p):].tolist())
    assert any(len(g) == NEW_TOKENS for g in greedy), "no prompt generated the full count: the test is weak"
    return dict(path=path, ids=ids, prompts=prompts, logits_fp64=logits_fp64, greedy=greedy,
                dim=model.config.hidden_size)


def _decode_on_gpu(tp, path, ids, prompts):
    """(teacher-forced logits on the CPU, greedy tokens, device name) of the decoder on this rank's GPU."""
    device = torch.device("cuda", tp.rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    model = GPT.from_pretrained(path, tp, torch.float32, device=device, progress=False)
    assert model.device == device
    with torch.no_grad():
        logits = model(ids.to(device)).cpu()
    tokens, _ = generate(model, prompts, NEW_TOKENS)
    return logits, tokens, str(device)


def test_tp1_on_gpu_matches_unsharded_hf(reference):
    logits, tokens, _ = _decode_on_gpu(TPGroup.single(), reference["path"], reference["ids"], reference["prompts"])
    assert_close(logits, reference["logits_fp64"], torch.float32, reduction_len=reference["dim"], msg="tp=1 logits")
    assert tokens == reference["greedy"], "tp=1 greedy tokens differ from the unsharded HF model's"


def test_tp2_on_gpu_matches_unsharded_hf(reference):
    per_rank = spawn_ranks(2, _decode_on_gpu, reference["path"], reference["ids"], reference["prompts"])
    expected_devices = [f"cuda:{r % torch.cuda.device_count()}" for r in range(2)]
    assert [device for _, _, device in per_rank] == expected_devices
    for rank, (logits, tokens, _) in enumerate(per_rank):
        assert_close(logits, reference["logits_fp64"], torch.float32, reduction_len=reference["dim"],
                     msg=f"tp=2 rank {rank} logits")
        assert tokens == reference["greedy"], f"tp=2 rank {rank}: greedy tokens differ from the unsharded HF model's"
