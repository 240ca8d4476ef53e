"""A checkpoint whose config says tie_word_embeddings: true but that stores its own lm_head.weight (issue 13,
item 10). transformers 5.24 keeps the stored head when its values differ from the embedding's (with a
warning) and ties when they are equal; the decoder must do the same, so its logits equal transformers'."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_close

transformers = pytest.importorskip("transformers", reason="the decoder is compared with transformers")

import hf_models  # noqa: E402
from tp_kernels.distributed import TPGroup  # noqa: E402
from tp_kernels.models import GPT  # noqa: E402


def _tied_config_with_stored_head(tmp_path, head_rows=None):
    """An untied Llama saved by transformers, then its config switched to tie_word_embeddings: true. With
    head_rows given, the stored lm_head equals the embedding except in those rows."""
    _, model = hf_models.build("llama")
    path = hf_models.save(model, str(tmp_path / "ckpt"))
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tie_word_embeddings"] = True
    with open(config_path, "w") as f:
        json.dump(config, f)
    if head_rows is not None:
        tensors = load_file(os.path.join(path, "model.safetensors"))
        head = tensors["model.embed_tokens.weight"].clone()
        head[head_rows] = tensors["lm_head.weight"][head_rows]
        tensors["lm_head.weight"] = head
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def test_a_stored_head_that_differs_is_kept_as_transformers_keeps_it(tmp_path):
    path = _tied_config_with_stored_head(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    assert hf.lm_head.weight is not hf.model.embed_tokens.weight  # what transformers does
    ids = torch.randint(0, hf_models.VOCAB, (2, 9))
    with pytest.warns(UserWarning, match="checkpoint stores an lm_head.weight with different values; keeping the "
                                         "stored head untied, as transformers does"):
        ours = GPT.from_pretrained(path, TPGroup.single(), progress=False)
    assert ours.lm_head.weight is not ours.embed.weight
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, torch.float32, reduction_len=64, msg="untied head")


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_keeps_the_stored_rows_of_its_slice(tmp_path, world_size):
    path = _tied_config_with_stored_head(tmp_path)
    stored = load_file(os.path.join(path, "model.safetensors"))["lm_head.weight"]
    for rank in range(world_size):
        tp = TPGroup(rank=rank, world_size=world_size, name=f"test_tied_head.{rank}of{world_size}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GPT.from_pretrained(path, tp, progress=False)
        rows = model.lm_head.vocab_size_per_rank
        start, stop = rank * rows, min((rank + 1) * rows, hf_models.VOCAB)
        assert torch.equal(model.lm_head.weight[:stop - start], stored[start:stop]), f"rank {rank}"


def test_a_stored_head_equal_to_the_embedding_stays_tied(tmp_path):
    path = _tied_config_with_stored_head(tmp_path, head_rows=[])  # lm_head.weight == embed_tokens.weight
    hf = transformers.LlamaForCausalLM.from_pretrained(path)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # what transformers does
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing to untie
        model = GPT.from_pretrained(path, TPGroup.single(), progress=False)
    assert model.lm_head.weight is model.embed.weight


def test_only_the_ranks_whose_rows_differ_untie(tmp_path):
    path = _tied_config_with_stored_head(tmp_path, head_rows=[90])  # rank 1 of 2 holds rows 51..100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rank0 = GPT.from_pretrained(path, TPGroup(rank=0, world_size=2, name="test_tied_head.r0"), progress=False)
        rank1 = GPT.from_pretrained(path, TPGroup(rank=1, world_size=2, name="test_tied_head.r1"), progress=False)
    assert rank0.lm_head.weight is rank0.embed.weight
    assert rank1.lm_head.weight is not rank1.embed.weight
    stored = load_file(os.path.join(path, "model.safetensors"))["lm_head.weight"]
    assert torch.equal(rank1.lm_head.weight[:50], stored[51:])
