"""ModelArgs: presets, validation and Hugging Face config reading."""
import json

import pytest

from tp_kernels.models import ModelArgs

LLAMA = {"model_type": "llama", "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"},
         "tie_word_embeddings": False, "eos_token_id": [7, 9], "hidden_act": "silu"}
GPT2 = {"model_type": "gpt2", "vocab_size": 101, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "eos_token_id": 0}


def test_llama_config():
    args = ModelArgs.from_hf_config(LLAMA)
    assert (args.family, args.dim, args.n_heads, args.n_kv_heads, args.head_dim) == ("llama", 64, 4, 2, 16)
    assert (args.rope_theta, args.norm_eps, args.eos_token_ids) == (500.0, 1e-6, (7, 9))
    assert not (args.qkv_bias or args.o_bias or args.tie_word_embeddings)


def test_older_top_level_rope_theta_and_qwen2_biases():
    cfg = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}
    args = ModelArgs.from_hf_config(dict(cfg, model_type="qwen2", rope_theta=1e6))
    assert args.rope_theta == 1e6 and args.qkv_bias and not args.o_bias


def test_mistral_sliding_window_caps_the_sequence():
    # key k is visible from query q when q - k < sliding_window: within the window, full attention is exact
    args = ModelArgs.from_hf_config(dict(LLAMA, model_type="mistral", sliding_window=32))
    assert args.max_seq_len == 32 and not (args.qkv_bias or args.o_bias or args.qk_norm)
    assert ModelArgs.from_hf_config(dict(LLAMA, model_type="mistral", sliding_window=None)).max_seq_len == 64


def test_qwen3_has_per_head_qk_norms_and_its_own_head_dim():
    args = ModelArgs.from_hf_config(dict(LLAMA, model_type="qwen3", head_dim=32, attention_bias=False))
    assert args.qk_norm and args.head_dim == 32 and not args.qkv_bias
    assert args.n_params == ModelArgs.from_hf_config(dict(LLAMA, head_dim=32)).n_params + 2 * 2 * 32
    with pytest.raises(ValueError, match="qk_norm .* is a llama-family option"):
        ModelArgs.from_name("tiny-gpt2").replace(qk_norm=True)


def test_gpt2_config_from_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2))
    args = ModelArgs.from_hf_config(tmp_path)
    assert (args.family, args.intermediate_size, args.max_seq_len, args.activation) == ("gpt2", 256, 64, "gelu_tanh")
    assert args.qkv_bias and args.o_bias and args.mlp_bias and args.tie_word_embeddings and args.eos_token_ids == (0,)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "bert"}, "model_type must be one of"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type 'llama3' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
    ({"num_key_value_heads": 3}, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
])
def test_unsupported_configs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_hf_config(dict(LLAMA, **change))


def test_presets():
    assert ModelArgs.from_name("tiny").family == "llama"
    assert ModelArgs.from_name("gpt2").n_params == 124_439_808  # GPT-2 small's published parameter count
    with pytest.raises(ValueError, match="unknown model preset 'huge'; known presets"):
        ModelArgs.from_name("huge")


@pytest.mark.parametrize("change, match", [
    ({"activation": "silu"}, "gpt2's MLP activation"),
    ({"mlp_bias": False}, "biases on every linear layer"),
    ({"n_kv_heads": 2}, "no grouped-query attention"),
])
def test_inconsistent_gpt2_args_raise(change, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_name("tiny-gpt2").replace(**change)


def test_frozen():
    with pytest.raises(AttributeError):
        ModelArgs.from_name("tiny").dim = 3
