"""ModelArgs: the architecture of a decoder, as a frozen dataclass with a registry of named presets and a
reader for Hugging Face config.json files (Llama, Qwen2, GPT-2).

Sizes here are always the full (unsharded) model's; per-rank sizes live on the layers (`*_per_rank`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple, Union

FAMILIES = ("llama", "gpt2")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

# HF model_type -> our family. Qwen2 is Llama with a bias on q, k and v.
_HF_MODEL_TYPES = {"llama": "llama", "qwen2": "llama", "gpt2": "gpt2"}
# HF GPT-2 activation names -> ours ("gelu_new" is the tanh approximation GPT-2 was trained with).
_HF_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class ModelArgs:
    """A decoder-only transformer. family "llama": RMSNorm, RoPE, SwiGLU MLP, grouped-query attention;
    family "gpt2": LayerNorm, learned positions, GELU MLP, biases everywhere."""

    family: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    norm_eps: float
    head_dim: int = 0  # 0: dim // n_heads
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    activation: str = "silu"
    eos_token_ids: Tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) when head_dim "
                                 "is not given")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.family == "gpt2":
            if self.n_kv_heads != self.n_heads:
                raise ValueError(f"gpt2 has no grouped-query attention: n_kv_heads ({self.n_kv_heads}) must equal "
                                 f"n_heads ({self.n_heads})")
            if not (self.qkv_bias and self.o_bias and self.mlp_bias):
                raise ValueError("gpt2 has biases on every linear layer: qkv_bias, o_bias and mlp_bias must be True")
            if self.activation not in ("gelu", "gelu_tanh"):
                raise ValueError(f"gpt2's MLP activation must be 'gelu' or 'gelu_tanh', got {self.activation!r}")
        elif self.activation != "silu":
            raise ValueError(f"llama's SwiGLU MLP uses activation 'silu', got {self.activation!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def n_params(self) -> int:
        """Number of parameters of the full model (a tied head counted once)."""
        hd, d = self.head_dim, self.dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        n_mlp_mats = 3 if self.family == "llama" else 2
        mlp = n_mlp_mats * d * self.intermediate_size
        if self.family == "gpt2":
            biases = (self.n_heads + 2 * self.n_kv_heads) * hd + d + self.intermediate_size + d
            norms = 4 * d
        else:
            biases = (self.n_heads + 2 * self.n_kv_heads) * hd * self.qkv_bias + d * self.o_bias
            biases += (2 * self.intermediate_size + d) * self.mlp_bias
            norms = 2 * d
        per_layer = attn + mlp + biases + norms
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        positions = self.max_seq_len * d if self.family == "gpt2" else 0
        final_norm = d * (2 if self.family == "gpt2" else 1)
        return self.n_layers * per_layer + embed + positions + final_norm

    def replace(self, **changes) -> "ModelArgs":
        """A copy with some fields changed (the dataclass is frozen)."""
        return dataclasses.replace(self, **changes)

    # -- registry ----------------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """The preset registered under name (see PRESETS)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None

    # -- Hugging Face ------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, path_or_dict: Union[str, os.PathLike, Mapping[str, Any]]) -> "ModelArgs":
        """From a Hugging Face config: a dict, a config.json path, or a model directory holding one.
        Supports model_type llama, qwen2 and gpt2; features this decoder does not implement (rope scaling,
        sliding windows, other activations) raise a ValueError naming the field."""
        config = _read_config(path_or_dict)
        model_type = config.get("model_type")
        if model_type not in _HF_MODEL_TYPES:
            raise ValueError(f"config model_type must be one of {sorted(_HF_MODEL_TYPES)}, got {model_type!r}")
        eos = config.get("eos_token_id")
        eos_token_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        if _HF_MODEL_TYPES[model_type] == "gpt2":
            return _from_hf_gpt2(config, eos_token_ids)
        return _from_hf_llama(config, model_type, eos_token_ids)


def _read_config(path_or_dict) -> Dict[str, Any]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Hugging Face config at {path}")
    with open(path) as f:
        return json.load(f)


def _rope_theta(config: Dict[str, Any]) -> float:
    """rope_theta from transformers 5's `rope_parameters` or the older top-level field; only the plain
    (unscaled) rotary embedding is implemented."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"config rope_type {rope_type!r} is not supported (only 'default', unscaled RoPE)")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _from_hf_llama(config: Dict[str, Any], model_type: str, eos_token_ids) -> ModelArgs:
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config hidden_act must be 'silu' for {model_type}, got {config['hidden_act']!r}")
    if config.get("use_sliding_window"):
        raise ValueError("config use_sliding_window=True is not supported (full attention only)")
    n_heads = config["num_attention_heads"]
    attention_bias = bool(config.get("attention_bias", False))
    return ModelArgs(
        family="llama",
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or 0,
        intermediate_size=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(config),
        # Qwen2 always has a bias on q, k and v and none on o_proj; Llama's attention_bias covers all four.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        activation="silu",
        eos_token_ids=eos_token_ids,
    )


def _from_hf_gpt2(config: Dict[str, Any], eos_token_ids) -> ModelArgs:
    activation = config.get("activation_function", "gelu_new")
    if activation not in _HF_GPT2_ACTIVATIONS:
        raise ValueError(f"config activation_function must be one of {sorted(_HF_GPT2_ACTIVATIONS)}, "
                         f"got {activation!r}")
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("only GPT-2's default attention scale 1/sqrt(head_dim) is supported "
                         "(config scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)")
    dim, n_heads = config["n_embd"], config["n_head"]
    return ModelArgs(
        family="gpt2",
        vocab_size=config["vocab_size"],
        dim=dim,
        n_layers=config["n_layer"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        intermediate_size=config.get("n_inner") or 4 * dim,
        max_seq_len=config.get("n_positions", 1024),
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        activation=_HF_GPT2_ACTIVATIONS[activation],
        eos_token_ids=eos_token_ids,
    )


# Presets: `tiny` and `tiny-gpt2` run the tests and the demo in seconds on CPU (vocab 256 = the byte
# tokenizer); the others have the shapes of the public models, for random-weight runs and memory sums.
PRESETS: Dict[str, ModelArgs] = {
    "tiny": ModelArgs(family="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate_size=128, max_seq_len=256, norm_eps=1e-5),
    "tiny-gpt2": ModelArgs(family="gpt2", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                           intermediate_size=256, max_seq_len=256, norm_eps=1e-5, qkv_bias=True, o_bias=True,
                           mlp_bias=True, tie_word_embeddings=True, activation="gelu_tanh"),
    "gpt2": ModelArgs(family="gpt2", vocab_size=50257, dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
                      intermediate_size=3072, max_seq_len=1024, norm_eps=1e-5, qkv_bias=True, o_bias=True,
                      mlp_bias=True, tie_word_embeddings=True, activation="gelu_tanh", eos_token_ids=(50256,)),
    # The decode benchmark's model (bench/decode_e2e.py): 156 M parameters, 623 MB in fp32, so a step streams
    # its weights from DRAM, and big enough that TP=2 beats TP=1 on a 2-core machine.
    "llama-156m": ModelArgs(family="llama", vocab_size=32000, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4,
                            intermediate_size=2816, max_seq_len=2048, norm_eps=1e-5),
    "llama-3-8b": ModelArgs(family="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                            intermediate_size=14336, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0),
}
