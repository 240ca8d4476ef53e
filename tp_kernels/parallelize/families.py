"""The plan of each supported Hugging Face family, as data: module-name patterns -> styles, the attention
attributes set per rank, and the modules kept whole. A new family that shares a layout is one line here
(Mistral is Llama's table); a family with a `base_model_tp_plan` in its config needs no line at all
(hf_plan.py derives one), though only the families below are tested against the unconverted model.

Per-rank attributes: Hugging Face attention modules reshape their projections with `view(..., -1,
head_dim)`, so most need only `num_key_value_groups` (how many local query heads share a local KV head,
which changes when KV heads are replicated); GPT-2, OPT and Phi3 read head counts in their forward.
"""
from __future__ import annotations

from typing import Dict

from tp_kernels.parallelize.plan import TPPlan
from tp_kernels.parallelize.styles import Merged

_LLAMA = TPPlan(
    layers={
        "model.embed_tokens": "embedding",
        "model.layers.*.self_attn.q_proj": "q_heads",
        "model.layers.*.self_attn.k_proj": "kv_heads",
        "model.layers.*.self_attn.v_proj": "kv_heads",
        "model.layers.*.self_attn.o_proj": "row",
        "model.layers.*.mlp.gate_proj": "column",
        "model.layers.*.mlp.up_proj": "column",
        "model.layers.*.mlp.down_proj": "row",
        "lm_head": "lm_head",
    },
    per_rank={"model.layers.*.self_attn": {"num_key_value_groups": "kv_groups"}},
    replicated=("model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm", "model.norm"),
)

# Qwen3: RMSNorm over each q and k head (weights of head_dim), the same on every rank.
_QWEN3 = _LLAMA.extend(replicated=("model.layers.*.self_attn.q_norm", "model.layers.*.self_attn.k_norm"))

# Gemma's embedding is scaled by sqrt(hidden) (the embedding style keeps the scale) and its RMSNorms
# multiply by (1 + weight): both are element-wise, the same on every rank. Gemma2 adds soft-capping of the
# attention scores (per head, local) and of the final logits (after the gathered head), and two more norms.
_GEMMA2 = _LLAMA.extend(replicated=("model.layers.*.pre_feedforward_layernorm",
                                    "model.layers.*.post_feedforward_layernorm"))

# Phi3 fuses q, k, v into qkv_proj ([all q; all k; all v]) and gate, up into gate_up_proj ([gate; up]); its
# attention slices qkv at config.num_attention_heads * head_dim and num_key_value_heads * head_dim.
_PHI3 = TPPlan(
    layers={
        "model.embed_tokens": "embedding",
        "model.layers.*.self_attn.qkv_proj": "fused_qkv",
        "model.layers.*.self_attn.o_proj": "row",
        "model.layers.*.mlp.gate_up_proj": Merged(2),
        "model.layers.*.mlp.down_proj": "row",
        "lm_head": "lm_head",
    },
    per_rank={"model.layers.*.self_attn": {"num_key_value_groups": "kv_groups", "num_key_value_heads": "kv_heads",
                                           "config.num_attention_heads": "heads"}},
    replicated=_LLAMA.replicated,
)

# GPT-NeoX stores each head's q, k, v rows together in query_key_value (view(..., n_heads, 3 * head_size)).
_GPT_NEOX = TPPlan(
    layers={
        "gpt_neox.embed_in": "embedding",
        "gpt_neox.layers.*.attention.query_key_value": "qkv_heads",
        "gpt_neox.layers.*.attention.dense": "row",
        "gpt_neox.layers.*.mlp.dense_h_to_4h": "column",
        "gpt_neox.layers.*.mlp.dense_4h_to_h": "row",
        "lm_head": "lm_head",
    },
    replicated=("gpt_neox.layers.*.input_layernorm", "gpt_neox.layers.*.post_attention_layernorm",
                "gpt_neox.final_layer_norm"),
)

# OPT: learned positions (offset by 2) replicated; its attention views k and v with num_heads too.
# project_in / project_out exist when word_embed_proj_dim != hidden_size (OPT-350m): small, replicated.
_OPT = TPPlan(
    layers={
        "model.decoder.embed_tokens": "embedding",
        "model.decoder.layers.*.self_attn.q_proj": "q_heads",
        "model.decoder.layers.*.self_attn.k_proj": "kv_heads",
        "model.decoder.layers.*.self_attn.v_proj": "kv_heads",
        "model.decoder.layers.*.self_attn.out_proj": "row",
        "model.decoder.layers.*.fc1": "column",
        "model.decoder.layers.*.fc2": "row",
        "lm_head": "lm_head",
    },
    per_rank={"model.decoder.layers.*.self_attn": {"num_heads": "heads"}},
    replicated=("model.decoder.embed_positions", "model.decoder.final_layer_norm", "model.decoder.project_in",
                "model.decoder.project_out", "model.decoder.layers.*.self_attn_layer_norm",
                "model.decoder.layers.*.final_layer_norm"),
)

# GPT-2: Conv1D layers (weights stored transposed); c_attn is [all q; all k; all v]; the attention splits
# c_attn's output at split_size and views num_heads heads.
_GPT2 = TPPlan(
    layers={
        "transformer.wte": "embedding",
        "transformer.h.*.attn.c_attn": "fused_qkv",
        "transformer.h.*.attn.c_proj": "row",
        "transformer.h.*.mlp.c_fc": "column",
        "transformer.h.*.mlp.c_proj": "row",
        "lm_head": "lm_head",
    },
    per_rank={"transformer.h.*.attn": {"num_heads": "heads", "embed_dim": "q_width", "split_size": "q_width"}},
    replicated=("transformer.wpe", "transformer.h.*.ln_1", "transformer.h.*.ln_2", "transformer.ln_f"),
)

FAMILY_PLANS: Dict[str, TPPlan] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _QWEN3,
    "GemmaForCausalLM": _LLAMA,
    "Gemma2ForCausalLM": _GEMMA2,
    "Phi3ForCausalLM": _PHI3,
    "GPTNeoXForCausalLM": _GPT_NEOX,
    "OPTForCausalLM": _OPT,
    "GPT2LMHeadModel": _GPT2,
}
