"""Tiny random-weight Hugging Face models written to disk with save_pretrained, for the parity tests.

Shapes are chosen to hit the odd cases: vocab 101 is divisible by neither 2 nor 4; the Llama model has
grouped-query attention (4 heads, 2 KV heads: replicated at TP=4) and is saved sharded with an index; the
Qwen2 model has one KV head (replicated at TP=2 and 4), QKV biases and a tied head; Qwen3 normalizes each q and
k head (its norms get random weights too) and its attention is wider than hidden. initializer_range 0.2
(HF's default is 0.02) makes logits O(5), so a wrong weight shows far above rounding.
"""
import json
import os

import torch

VOCAB = 101


def build(family: str):
    """(model class, HF model) of the tiny test model of family llama, mistral, qwen2, qwen3 or gpt2, in float32."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    if family == "llama":
        cls, config = LlamaForCausalLM, LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, initializer_range=0.2,
            bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    elif family == "qwen2":
        cls, config = Qwen2ForCausalLM, Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=True)
    elif family == "mistral":  # the sliding window caps the decoder's max_seq_len (longer than the tests)
        cls, config = MistralForCausalLM, MistralConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, sliding_window=40, initializer_range=0.2,
            bos_token_id=None, eos_token_id=None)
    elif family == "qwen3":  # head_dim 32: the attention (128 wide) is wider than hidden (64)
        cls, config = Qwen3ForCausalLM, Qwen3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=64, initializer_range=0.2,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    elif family == "gpt2":
        cls, config = GPT2LMHeadModel, GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
            bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(f"unknown family {family!r}")
    model = cls(config).eval()
    with torch.no_grad():  # HF initializes biases and norms to constants; random ones catch swapped tensors
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return cls, model


def save(model, path: str, sharded: bool = False) -> str:
    """save_pretrained as safetensors; sharded=True splits into files of <= 64 KB with an index."""
    model.save_pretrained(path, max_shard_size="64KB" if sharded else "1GB")
    if sharded and not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        raise AssertionError("save_pretrained did not shard the checkpoint")
    return path


def llama_hf_config(args) -> dict:
    """A Llama config.json dict for tp_kernels ModelArgs args (for checkpoints written by hand)."""
    return {"model_type": "llama", "vocab_size": args.vocab_size, "hidden_size": args.dim,
            "intermediate_size": args.intermediate_size, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
            "max_position_embeddings": args.max_seq_len, "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "tie_word_embeddings": args.tie_word_embeddings}


def write_checkpoint(path: str, config: dict, tensors: dict) -> str:
    """config.json and one model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    return path
