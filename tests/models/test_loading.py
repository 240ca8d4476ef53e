"""Checkpoint loading: clear errors for checkpoints that do not fit the config, per-rank slice reads
(including GPT-2's transposed Conv1D weights), sharded checkpoints. Loading needs no communication, so
ranks of a TP group are simulated in this process with TPGroup(rank, world_size) objects."""
import json
import os

import pytest
import torch

import hf_models
from tp_kernels.distributed import TPGroup
from tp_kernels.models import GPT, ModelArgs
from tp_kernels.models.loading import DictSource, SafetensorsSource, Transposed, load_weights, random_checkpoint

ARGS = ModelArgs.from_name("tiny").replace(vocab_size=101)  # vocab not divisible by 2


def _group(rank: int, world_size: int) -> TPGroup:
    return TPGroup(rank=rank, world_size=world_size, name=f"test_loading.{rank}of{world_size}")


@pytest.fixture
def checkpoint(tmp_path):
    """A valid Llama checkpoint of ARGS: (path, its tensors)."""
    tensors = random_checkpoint(ARGS, seed=3)
    return hf_models.write_checkpoint(str(tmp_path / "ok"), hf_models.llama_hf_config(ARGS), tensors), tensors


def _load(path, world_size=1, rank=0):
    tp = TPGroup.single() if world_size == 1 else _group(rank, world_size)
    return GPT.from_pretrained(path, tp, progress=False)


def test_loads_the_tensors_it_was_given(checkpoint):
    path, tensors = checkpoint
    model = _load(path, world_size=2, rank=1)
    q_rows = ARGS.n_heads * ARGS.head_dim // 2  # rank 1 holds the second half of the q heads
    expected_q = tensors["model.layers.1.self_attn.q_proj.weight"][q_rows:]
    assert torch.equal(model.blocks[1].attn.qkv.weight[:q_rows], expected_q)
    assert torch.equal(model.blocks[0].down.weight, tensors["model.layers.0.mlp.down_proj.weight"][:, 64:])
    assert torch.equal(model.final_norm, tensors["model.norm.weight"])


def test_wrong_shaped_tensor_is_named(checkpoint, tmp_path):
    _, tensors = checkpoint
    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(ARGS.intermediate_size + 1, ARGS.dim)
    path = hf_models.write_checkpoint(str(tmp_path / "bad"), hf_models.llama_hf_config(ARGS), bad)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(129, 64\)"):
        _load(path)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    _, tensors = checkpoint
    bad = {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.k_proj.weight"}
    path = hf_models.write_checkpoint(str(tmp_path / "bad"), hf_models.llama_hf_config(ARGS), bad)
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        _load(path)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    _, tensors = checkpoint
    bad = dict(tensors, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(3)})
    path = hf_models.write_checkpoint(str(tmp_path / "bad"), hf_models.llama_hf_config(ARGS), bad)
    with pytest.raises(ValueError, match=r"does not use: 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        _load(path)


def test_index_naming_a_missing_file_raises(checkpoint):
    path, _ = checkpoint
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        SafetensorsSource(path)


def test_sharded_checkpoint_with_index_equals_single_file(tmp_path):
    pytest.importorskip("transformers", reason="writes the checkpoints with save_pretrained")
    _, model = hf_models.build("llama")
    single = hf_models.save(model, str(tmp_path / "single"))
    sharded = hf_models.save(model, str(tmp_path / "sharded"), sharded=True)
    a, b = _load(single, 2, 0), _load(sharded, 2, 0)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


class _RecordingSource(DictSource):
    """Records how many elements each tensor's reads returned."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.elements_read = {}

    def _lookup(self, name):
        source = self

        class Slice:
            def get_shape(self):
                return list(source.tensors[name].shape)

            def __getitem__(self, key):
                out = source.tensors[name][key]
                source.elements_read[name] = source.elements_read.get(name, 0) + out.numel()
                return out
        return Slice()


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_each_rank_reads_only_its_slices(preset):
    args = ModelArgs.from_name(preset)
    tensors = random_checkpoint(args, seed=5)
    replicated = ("norm", "ln_", "wpe", "c_proj.bias", "o_proj.bias", "down_proj.bias")
    world_size = 4
    for rank in range(world_size):
        source = _RecordingSource(tensors)
        load_weights(GPT(args, _group(rank, world_size)), source, progress=False)
        for name, t in tensors.items():
            if any(r in name for r in replicated):
                limit = t.numel()
            elif "k_proj" in name or "v_proj" in name:  # KV heads are replicated when tp > n_kv_heads
                limit = t.numel() // min(world_size, args.n_kv_heads)
            else:
                limit = t.numel() // world_size
            assert source.elements_read.get(name, 0) <= limit, f"rank {rank} read too much of {name}"
            assert source.elements_read.get(name, 0) > 0, f"rank {rank} never read {name}"


def test_transposed_view_reads_the_matching_block():
    stored = torch.arange(12.0).reshape(3, 4)  # Conv1D layout (in=3, out=4)
    view = Transposed(stored)
    assert view.get_shape() == [4, 3]
    assert torch.equal(view[1:3], stored.T[1:3])
    assert torch.equal(view[:, 0:2], stored.T[:, 0:2])
    assert torch.equal(view[:], stored.T)


def test_gpt2_checkpoint_without_transformer_prefix_loads(tmp_path):
    """The original GPT-2 files name tensors 'h.0...' rather than 'transformer.h.0...'."""
    args = ModelArgs.from_name("tiny-gpt2")
    tensors = random_checkpoint(args, seed=9)
    a = GPT(args, TPGroup.single())
    load_weights(a, DictSource(tensors), progress=False)
    b = GPT(args, TPGroup.single())
    load_weights(b, DictSource({k.removeprefix("transformer."): v for k, v in tensors.items()}), progress=False)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
