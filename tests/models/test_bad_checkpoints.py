"""Broken model directories (issue 13, item 14): a config.json with a missing field, a string where a number
goes, an absurd size, a negative epsilon, corrupt JSON; a corrupt safetensors file or index; a corrupt
tokenizer.json. Each raises a ValueError naming the field or the file and the expected form, when the
directory is read, before any weight is allocated."""
import json
import os

import pytest

import hf_models
from tp_kernels.distributed import TPGroup
from tp_kernels.models import GPT, ModelArgs
from tp_kernels.models.loading import SafetensorsSource, random_checkpoint
from tp_kernels.models.tokenizer import load_tokenizer

ARGS = ModelArgs.from_name("tiny").replace(vocab_size=101)


@pytest.fixture
def checkpoint(tmp_path):
    """A valid Llama checkpoint directory of ARGS."""
    return hf_models.write_checkpoint(str(tmp_path / "ok"), hf_models.llama_hf_config(ARGS),
                                      random_checkpoint(ARGS, seed=3))


def _edit_config(path, **changes):
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is _DELETE:
            del config[key]
        else:
            config[key] = value
    with open(config_path, "w") as f:
        json.dump(config, f)
    return config_path


_DELETE = object()


def _load(path):
    return GPT.from_pretrained(path, TPGroup.single(), progress=False)


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": _DELETE}, r"field 'hidden_size' must be an integer in \[1, 2147483647\]; it is missing"),
    ({"num_hidden_layers": "2"}, r"field 'num_hidden_layers' must be an integer .*; got '2' \(str\)"),
    ({"vocab_size": 1e12}, r"field 'vocab_size' must be an integer .*; got 1000000000000.0 \(float\)"),
    ({"vocab_size": 10**12}, r"field 'vocab_size' must be an integer in \[1, 2147483647\]; got 1000000000000 \(int\)"),
    ({"rms_norm_eps": -1e-6}, r"field 'rms_norm_eps' must be a finite number > 0; got -1e-06 \(float\)"),
    ({"tie_word_embeddings": "false"}, r"field 'tie_word_embeddings' must be true or false; got 'false' \(str\)"),
    ({"num_key_value_heads": 1.5}, r"field 'num_key_value_heads' must be an integer"),
    ({"model_type": ["llama"]}, r"field 'model_type' must be a string"),
    ({"eos_token_id": "</s>"}, r"field 'eos_token_id' must be a token id"),
])
def test_bad_config_field_is_named_with_the_expected_form(checkpoint, changes, match):
    config_path = _edit_config(checkpoint, **changes)
    with pytest.raises(ValueError, match=match) as info:
        _load(checkpoint)
    assert config_path in str(info.value)


def test_sizes_in_range_but_too_big_for_memory_raise_before_allocating(checkpoint):
    # 2^30 x 4096 fp32 embeddings alone are 16 TiB: the check must refuse before torch tries to allocate
    _edit_config(checkpoint, vocab_size=2**30, hidden_size=4096, intermediate_size=14336)
    with pytest.raises(ValueError, match=r"the model needs about \d+\.\d GiB per rank .*vocab_size=1073741824, "
                                         r"dim=4096.* but cpu has \d+\.\d GiB in all"):
        _load(checkpoint)


def test_corrupt_config_json_is_named(checkpoint):
    with open(os.path.join(checkpoint, "config.json"), "w") as f:
        f.write('{"model_type": "llama", "vocab_size": 101,')  # truncated
    with pytest.raises(ValueError, match=r"config .*config.json is not valid JSON .*expected a Hugging Face config"):
        _load(checkpoint)


def test_config_that_is_not_an_object_is_named(checkpoint):
    with open(os.path.join(checkpoint, "config.json"), "w") as f:
        json.dump([1, 2], f)
    with pytest.raises(ValueError, match=r"config.json holds a JSON list; expected an object of fields"):
        _load(checkpoint)


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors_file_is_named(checkpoint, corruption):
    path = os.path.join(checkpoint, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"garbage": os.urandom(4096), "truncated": data[:len(data) // 2], "empty": b""}[corruption])
    with pytest.raises(ValueError, match=r"checkpoint file .*model.safetensors could not be read as safetensors .*"
                                         r"expected the safetensors format"):
        _load(checkpoint)


def _sharded_checkpoint(tmp_path):
    """(directory, index path) of a sharded checkpoint written by transformers."""
    pytest.importorskip("transformers", reason="writes the sharded checkpoint with save_pretrained")
    _, model = hf_models.build("llama")
    path = hf_models.save(model, str(tmp_path / "sharded"), sharded=True)
    return path, os.path.join(path, "model.safetensors.index.json")


def test_corrupt_index_is_named(tmp_path):
    path, index = _sharded_checkpoint(tmp_path)
    with open(index, "w") as f:
        f.write("{ not json")
    with pytest.raises(ValueError, match=r"checkpoint index .*model.safetensors.index.json is not valid JSON .*'weight_map'"):
        SafetensorsSource(path)


def test_index_that_places_a_tensor_in_the_wrong_file_is_named(tmp_path):
    path, index_path = _sharded_checkpoint(tmp_path)
    with open(index_path) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    wrong = next(name for name, file in index["weight_map"].items() if file != files[0])
    index["weight_map"][wrong] = files[0]
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=rf"places \['{wrong}'\] in {files[0]}, which does not hold them"):
        SafetensorsSource(path)


def test_corrupt_tokenizer_file_is_named(tmp_path):
    pytest.importorskip("tokenizers", reason="tokenizer.json files are read with the tokenizers package")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=r"tokenizer file .*tokenizer.json could not be read .*expected a Hugging "
                                         r"Face tokenizers JSON file"):
        load_tokenizer(str(tmp_path), 256)


def test_negative_eps_in_model_args_raises_at_construction():
    with pytest.raises(ValueError, match=r"norm_eps must be a finite number > 0, got -1e-05"):
        ARGS.replace(norm_eps=-1e-5)
    with pytest.raises(ValueError, match=r"vocab_size must be an integer in \[1, 2147483647\], got 1000000000000.0"):
        ARGS.replace(vocab_size=1e12)


def test_nothing_was_allocated_for_a_bad_config(checkpoint, monkeypatch):
    """The checks run before the model is built: a bad field never reaches a tensor constructor."""
    _edit_config(checkpoint, vocab_size=10**12)
    built = []
    monkeypatch.setattr(GPT, "__init__", lambda self, *a, **k: built.append(a))
    with pytest.raises(ValueError, match="vocab_size"):
        _load(checkpoint)
    assert built == []
