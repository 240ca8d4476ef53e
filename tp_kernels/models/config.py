"""ModelArgs: the architecture of a decoder, as a frozen dataclass with a registry of named presets and a
reader for Hugging Face config.json files (Llama, Mistral, Qwen2, Qwen3, GPT-2) that checks every field it
reads.

Sizes here are always the full (unsharded) model's; per-rank sizes live on the layers (`*_per_rank`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

FAMILIES = ("llama", "gpt2")
# Every size is an index into tensors: above int32's range no real model exists, and a typo such as a
# vocab_size of 10^12 would otherwise start a multi-terabyte allocation before anything complained.
MAX_SIZE = 2**31 - 1
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

# HF model_type -> our family. Mistral is Llama (with a sliding window, see _from_hf_llama), Qwen2 Llama with
# a bias on q, k and v, Qwen3 Llama with an RMSNorm over each q and k head before the rotary embedding.
_HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2"}
# HF GPT-2 activation names -> ours ("gelu_new" is the tanh approximation GPT-2 was trained with).
_HF_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class ModelArgs:
    """A decoder-only transformer. family "llama": RMSNorm, RoPE, SwiGLU MLP, grouped-query attention
    (qk_norm: an RMSNorm of head_dim over each q and k head before RoPE, as Qwen3); family "gpt2": LayerNorm,
    learned positions, GELU MLP, biases everywhere."""

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
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    activation: str = "silu"
    eos_token_ids: Tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
                raise ValueError(f"{name} must be an integer in [1, {MAX_SIZE}], got {value!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or \
                not math.isfinite(self.norm_eps) or self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be a finite number > 0, got {self.norm_eps!r}")
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
            if self.qk_norm:
                raise ValueError("qk_norm (a per-head RMSNorm of q and k) is a llama-family option, not gpt2's")
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
            norms = 2 * d + 2 * hd * self.qk_norm
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
        Supports model_type llama, mistral, qwen2, qwen3 and gpt2. Features this decoder does not implement
        (rope scaling, sliding windows shorter than the sequence, other activations), missing fields and
        values of the wrong type or range raise a ValueError naming the field and the expected form."""
        config, source = _read_config(path_or_dict)
        cfg = _ConfigReader(config, source)
        model_type = cfg.text("model_type")
        if model_type not in _HF_MODEL_TYPES:
            raise ValueError(f"{source}: model_type must be one of {sorted(_HF_MODEL_TYPES)}, got {model_type!r}")
        eos_token_ids = cfg.token_ids("eos_token_id")
        if _HF_MODEL_TYPES[model_type] == "gpt2":
            return _from_hf_gpt2(cfg, eos_token_ids)
        return _from_hf_llama(cfg, model_type, eos_token_ids)


_REQUIRED = object()


class _ConfigReader:
    """Typed access to a config.json's fields: a missing field, a value of the wrong type or out of range
    raises a ValueError naming the field, the file and the expected form, before anything is allocated."""

    def __init__(self, config: Dict[str, Any], source: str):
        self.config, self.source = config, source

    def _fail(self, name: str, expected: str, value=_REQUIRED) -> ValueError:
        got = "it is missing" if value is _REQUIRED else f"got {value!r} ({type(value).__name__})"
        return ValueError(f"{self.source}: field {name!r} must be {expected}; {got}")

    def _get(self, name: str, default, expected: str):
        value = self.config.get(name, default)
        if value is _REQUIRED:
            raise self._fail(name, expected)
        return value

    def integer(self, name: str, default=_REQUIRED, minimum: int = 1) -> int:
        expected = f"an integer in [{minimum}, {MAX_SIZE}]"
        value = self._get(name, default, expected)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_SIZE:
            raise self._fail(name, expected, value)
        return value

    def optional_int(self, name: str) -> Optional[int]:
        """An integer >= 1, or absent / null (the caller then derives it)."""
        return None if self.config.get(name) is None else self.integer(name)

    def number(self, name: str, default=_REQUIRED) -> float:
        expected = "a finite number > 0"
        value = self._get(name, default, expected)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self._fail(name, expected, value)
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self._get(name, default, "true or false")
        if not isinstance(value, bool):
            raise self._fail(name, "true or false", value)
        return value

    def text(self, name: str, default=_REQUIRED) -> str:
        value = self._get(name, default, "a string")
        if not isinstance(value, str):
            raise self._fail(name, "a string", value)
        return value

    def token_ids(self, name: str) -> Tuple[int, ...]:
        value = self.config.get(name)
        ids = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise self._fail(name, "a token id (an integer >= 0), a list of them, or null", value)
        return tuple(ids)


def read_json(path: str, what: str, expected: str):
    """The JSON value in the file at path; a file that is not JSON raises naming it (`what` path) and the
    expected form."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc}); expected {expected}") from None


def _read_config(path_or_dict) -> Tuple[Dict[str, Any], str]:
    """(the config as a dict, how to name it in errors)."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "config"
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Hugging Face config at {path}")
    config = read_json(path, "config", "a Hugging Face config.json object")
    if not isinstance(config, dict):
        raise ValueError(f"config {path} holds a JSON {type(config).__name__}; expected an object of fields")
    return config, f"config {path}"


def _rope_theta(cfg: _ConfigReader) -> float:
    """rope_theta from transformers 5's `rope_parameters` or the older top-level field; only the plain
    (unscaled) rotary embedding is implemented."""
    params = cfg.config.get("rope_parameters") or {}
    scaling = cfg.config.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ValueError(f"{cfg.source}: fields 'rope_parameters' and 'rope_scaling' must be objects or null")
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"{cfg.source}: rope_type {rope_type!r} is not supported (only 'default', unscaled RoPE)")
    if "rope_theta" in params:
        return _ConfigReader(params, f"{cfg.source} rope_parameters").number("rope_theta")
    return cfg.number("rope_theta", 10000.0)


def _from_hf_llama(cfg: _ConfigReader, model_type: str, eos_token_ids) -> ModelArgs:
    hidden_act = cfg.text("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"{cfg.source}: hidden_act must be 'silu' for {model_type}, got {hidden_act!r}")
    if cfg.config.get("use_sliding_window"):
        raise ValueError(f"{cfg.source}: use_sliding_window=True is not supported (full attention only)")
    n_heads = cfg.integer("num_attention_heads")
    max_seq_len = cfg.integer("max_position_embeddings", 2048)
    if model_type == "mistral" and cfg.config.get("sliding_window") is not None:
        # Mistral attends to the last sliding_window positions (key k is seen from query q when q - k <
        # sliding_window). Capping the sequence at the window makes that every position, so full attention
        # is exact; generation past the window raises instead of silently attending too far.
        max_seq_len = min(max_seq_len, cfg.integer("sliding_window"))
    attention_bias = cfg.flag("attention_bias", False)
    return ModelArgs(
        family="llama",
        vocab_size=cfg.integer("vocab_size"),
        dim=cfg.integer("hidden_size"),
        n_layers=cfg.integer("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=cfg.optional_int("num_key_value_heads") or n_heads,
        head_dim=cfg.optional_int("head_dim") or 0,
        intermediate_size=cfg.integer("intermediate_size"),
        max_seq_len=max_seq_len,
        norm_eps=cfg.number("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(cfg),
        # Qwen2 always has a bias on q, k and v and none on o_proj; Llama's and Qwen3's attention_bias covers
        # all four; Mistral has none.
        qkv_bias=True if model_type == "qwen2" else attention_bias and model_type != "mistral",
        o_bias=False if model_type in ("qwen2", "mistral") else attention_bias,
        mlp_bias=cfg.flag("mlp_bias", False),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=cfg.flag("tie_word_embeddings", False),
        activation="silu",
        eos_token_ids=eos_token_ids,
    )


def _from_hf_gpt2(cfg: _ConfigReader, eos_token_ids) -> ModelArgs:
    activation = cfg.text("activation_function", "gelu_new")
    if activation not in _HF_GPT2_ACTIVATIONS:
        raise ValueError(f"{cfg.source}: activation_function must be one of {sorted(_HF_GPT2_ACTIVATIONS)}, "
                         f"got {activation!r}")
    if not cfg.flag("scale_attn_weights", True) or cfg.flag("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{cfg.source}: only GPT-2's default attention scale 1/sqrt(head_dim) is supported "
                         "(scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false)")
    dim, n_heads = cfg.integer("n_embd"), cfg.integer("n_head")
    return ModelArgs(
        family="gpt2",
        vocab_size=cfg.integer("vocab_size"),
        dim=dim,
        n_layers=cfg.integer("n_layer"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        intermediate_size=cfg.optional_int("n_inner") or 4 * dim,
        max_seq_len=cfg.integer("n_positions", 1024),
        norm_eps=cfg.number("layer_norm_epsilon", 1e-5),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=cfg.flag("tie_word_embeddings", True),
        activation=_HF_GPT2_ACTIVATIONS[activation],
        eos_token_ids=eos_token_ids,
    )


def _cpu_memory_bytes() -> int:
    """RAM plus swap of this machine: what a process could hold at most, however slowly."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            swap_kib = next((int(line.split()[1]) for line in f if line.startswith("SwapTotal:")), 0)
    except OSError:
        swap_kib = 0
    return total + swap_kib * 1024


def check_fits_in_memory(args: ModelArgs, world_size: int, element_size: int, device) -> None:
    """Raise before allocating when this rank's share of the weights (about n_params / world_size elements)
    exceeds all the memory of the device (for CPU: RAM plus swap): sizes each in range can still describe a
    model no machine holds. Free memory is not the bound (page cache and other processes come and go), so
    this refuses only what cannot work. Meta tensors take no memory; other devices are not checked."""
    import torch

    device = torch.device(device)
    need = args.n_params * element_size // world_size
    if device.type == "cpu":
        have, what = _cpu_memory_bytes(), "in all (RAM and swap)"
    elif device.type == "cuda":
        have, what = torch.cuda.mem_get_info(device)[1], "in all"
    else:
        return
    if need > have:
        raise ValueError(f"the model needs about {need / 2**30:.1f} GiB per rank ({args.n_params} parameters of "
                         f"{element_size} bytes over tp={world_size}; vocab_size={args.vocab_size}, dim={args.dim}, "
                         f"n_layers={args.n_layers}, intermediate_size={args.intermediate_size}), but {device} has "
                         f"{have / 2**30:.1f} GiB {what}")


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
