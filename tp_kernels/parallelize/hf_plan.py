"""A TPPlan from a model's own Hugging Face tensor-parallel plan (`model.tp_plan`, built by transformers
from the config's `base_model_tp_plan` plus the class's entries such as lm_head), for families without a
table in families.py.

Hugging Face styles -> ours:
    colwise                         -> "q_heads" / "kv_heads" / "qkv_heads" for a projection of an attention
                                       module (whose `head_dim` it must then split by whole heads, so that KV
                                       heads can be replicated when tp exceeds them), else "column"
    colwise_gather_output, _rep     -> "lm_head" for the output embedding, else Column(gather_output=True)
    rowwise                         -> "row"
    rowwise_split_input, _rep       -> Row(input_is_parallel=False)
    embedding_rowwise               -> "embedding"
    replicated_with_grad_allreduce, replicate -> replicated
Any other style (packed, expert, sequence parallel...) raises naming the module. As in transformers, modules
the plan does not name are replicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch.nn as nn

from tp_kernels.parallelize.plan import TPPlan, pattern_regex
from tp_kernels.parallelize.styles import (HEAD_DIM_ATTRIBUTES, N_HEADS_ATTRIBUTES, N_KV_HEADS_ATTRIBUTES, Column,
                                           Embedding, Heads, LayerSwap, LMHead, Row, Site, Style)


@dataclass(frozen=True, repr=True)
class HFColwise(Style):
    """Hugging Face's colwise: by whole heads under an attention module, else a plain column split."""

    def swap(self, site: Site) -> LayerSwap:
        head_dim = site.parent_attribute(HEAD_DIM_ATTRIBUTES)
        if head_dim is None:
            return Column().swap(site)
        out_features = getattr(site.module, "out_features", 0)
        n_heads = site.parent_attribute(N_HEADS_ATTRIBUTES)
        n_kv = site.parent_attribute(N_KV_HEADS_ATTRIBUTES) or n_heads
        units = out_features // head_dim if out_features % head_dim == 0 else None
        if units is not None and units == n_heads:
            kind = "q"
        elif units is not None and units == n_kv:
            kind = "kv"
        elif units is not None and n_heads is not None and units == 3 * n_heads and n_kv == n_heads:
            kind = "qkv"  # each head's q, k, v rows together: a plain column split of whole heads
        else:
            raise site.fail(f"'colwise' in the model's tp_plan, under an attention module with head_dim {head_dim}, "
                            f"{n_heads} query and {n_kv} KV heads, but its {out_features} outputs are none of "
                            "those head counts: cannot tell how to split it by heads")
        return Heads(kind).swap(site)


@dataclass(frozen=True, repr=True)
class HFColwiseGather(Style):
    """Hugging Face's colwise_gather_output: the LM head, or a column split whose output is gathered."""

    def swap(self, site: Site) -> LayerSwap:
        output_embeddings = getattr(site.model, "get_output_embeddings", lambda: None)()
        if site.module is output_embeddings:
            return LMHead().swap(site)
        return Column(gather_output=True).swap(site)


_STYLES: Dict[str, Optional[Style]] = {
    "colwise": HFColwise(),
    "colwise_gather_output": HFColwiseGather(),
    "colwise_rep": HFColwiseGather(),
    "rowwise": Row(),
    "rowwise_split_input": Row(input_is_parallel=False),
    "rowwise_rep": Row(input_is_parallel=False),
    "embedding_rowwise": Embedding(),
    "replicated_with_grad_allreduce": None,
    "replicate": None,
}


def hf_tp_plan(model: nn.Module) -> Dict[str, str]:
    """The model's full Hugging Face TP plan (module-name pattern -> style name), or {} when it has none."""
    plan = dict(getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {})
    config = getattr(model, "config", None)
    base = getattr(config, "base_model_tp_plan", None) or {}
    if not plan and base:
        prefix = getattr(model, "base_model_prefix", "")
        plan = {(f"{prefix}.{k}" if prefix and hasattr(model, prefix) else k): v for k, v in base.items()}
    return plan


def plan_from_hf(model: nn.Module) -> TPPlan:
    """Translate the model's Hugging Face TP plan; raises ValueError for a style it has no equivalent of."""
    arch = type(model).__name__
    hf_plan = hf_tp_plan(model)
    if not hf_plan:
        raise ValueError(f"{arch} has no Hugging Face tensor-parallel plan (config.base_model_tp_plan)")
    layers, replicated = {}, []
    for pattern, hf_style in hf_plan.items():
        if hf_style not in _STYLES:
            raise ValueError(f"parallelize: module pattern {pattern!r} of {arch}: Hugging Face style {hf_style!r} has "
                             f"no tp_kernels equivalent (known: {sorted(_STYLES)})")
        style = _STYLES[hf_style]
        if style is None:
            replicated.append(pattern)
        else:
            layers[pattern] = style
    return TPPlan(layers, _per_rank_attributes(model, layers), replicated, replicate_unlisted=True)


def _per_rank_attributes(model: nn.Module, layers: Dict[str, Style]) -> Dict[str, Dict[str, str]]:
    """num_key_value_groups of the attention modules whose projections are split by heads: it changes when KV
    heads are replicated. Transformers' own TP sets nothing per rank, its attention views heads with -1."""
    per_rank = {}
    names = [name for name, _ in model.named_modules()]
    for pattern, style in layers.items():
        if not isinstance(style, HFColwise):
            continue
        rx = pattern_regex(pattern)
        first = next((n for n in names if rx.match(n)), None)
        if first is None:
            continue
        parent_name, parent_pattern = first.rpartition(".")[0], pattern.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        has_heads = any(isinstance(getattr(parent, a, None), int) for a in HEAD_DIM_ATTRIBUTES)
        if has_heads and isinstance(getattr(parent, "num_key_value_groups", None), int):
            per_rank[parent_pattern] = {"num_key_value_groups": "kv_groups"}
    return per_rank
