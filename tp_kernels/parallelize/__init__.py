"""`parallelize(model, tp)`: tensor parallelism for a Hugging Face causal LM, in place; `save_pretrained`
writes the converted model back as one full checkpoint.

The conversion keeps the model's own forward (attention, norms, rotary embedding, caches, `generate`) and
swaps only the modules that hold the big matrices, each for a tp_kernels layer holding this rank's slice.
Which module becomes what is data, a TPPlan (module-name patterns -> styles, see plan.py and styles.py):

- the families of families.py have a table, tested against the unconverted model at TP 1, 2 and 4:
  Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Phi3, GPT-NeoX, OPT, GPT-2;
- another family whose config has a `base_model_tp_plan` (most recent transformers models) gets a plan
  translated from it (hf_plan.py), with a warning that tp_kernels has not tested it;
- `parallelize(model, tp, plan=TPPlan(...))` converts a custom model, and `plan="hf"` forces the
  translated Hugging Face plan.

Per-rank head counts are set on the attention modules that read them (the model's config keeps describing
the full model). Norms and position tables stay replicated. Every rank ends up with the same hidden states
and the same full logits.

The whole plan is built and checked first (every module with parameters accounted for, every pattern
matching, head and feature counts divisible, per-rank attributes holding their full-model values), then
every new layer is built, and only then are modules swapped, so an error leaves the model untouched.
`parallelize(..., dry_run=True)` returns the plan without converting.

A model on the meta device gets the same plan and parallel layers on meta; `plan.load_from(model,
full_model)` then fills all of it (see ParallelPlan.load_from).

transformers is imported when parallelize is called, not when tp_kernels is imported.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Optional, Tuple, Union

import torch.nn as nn

from tp_kernels.distributed import TPGroup
from tp_kernels.parallelize.families import FAMILY_PLANS
from tp_kernels.parallelize.hf_plan import hf_tp_plan, plan_from_hf
from tp_kernels.parallelize.plan import AttributeChange, ParallelPlan, PerRankConfig, TPPlan
from tp_kernels.parallelize.planner import make_plan
from tp_kernels.parallelize.saving import save_pretrained
from tp_kernels.parallelize.styles import (Column, Embedding, FusedQKV, Heads, LayerSwap, LMHead, Merged, PlanError,
                                           Row, Style)

__all__ = ["parallelize", "save_pretrained", "TPPlan", "ParallelPlan", "LayerSwap", "AttributeChange",
           "PerRankConfig", "PlanError", "Style", "Column", "Row", "Heads", "FusedQKV", "Merged", "Embedding",
           "LMHead", "FAMILY_PLANS", "SUPPORTED_ARCHITECTURES"]

SUPPORTED_ARCHITECTURES = tuple(FAMILY_PLANS)
PLAN_ATTRIBUTE = "tp_kernels_plan"  # set on a converted model: its ParallelPlan (save_pretrained reads it)

_warned_derived = set()


def parallelize(model: nn.Module, tp: TPGroup, dry_run: bool = False,
                plan: Union[None, str, TPPlan, Mapping] = None):
    """Convert a Hugging Face causal LM (or any model, given a plan) to tensor parallelism over `tp`, in
    place, and return it; with dry_run=True return the ParallelPlan and change nothing.

    plan: None (the family's table, else the model's own Hugging Face plan), "hf" (the model's Hugging Face
    plan), a TPPlan, or a mapping of module-name pattern -> style (a TPPlan's `layers`).

    Plain PyTorch equivalent of the converted model's output: on every rank,
    `model(input_ids).logits` equals the unconverted model's logits (up to float rounding).

    Raises TypeError for an architecture with no plan, ValueError naming the module for a module the plan
    cannot map, a pattern that matches nothing or a head / feature count the TP degree does not divide; the
    model is then unchanged.
    """
    if not isinstance(tp, TPGroup):
        raise TypeError(f"tp must be a tp_kernels.TPGroup, got {type(tp).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    done: Optional[ParallelPlan] = getattr(model, PLAN_ATTRIBUTE, None)
    if done is not None:
        raise ValueError(f"parallelize: this {type(model).__name__} was already converted (tp={done.world_size}); "
                         "convert an unconverted model")
    table, source = resolve_plan(model, plan)
    parallel_plan = make_plan(model, tp, table, source)
    if dry_run:
        return parallel_plan
    new_layers = {}
    for swap in sorted(parallel_plan.swaps, key=lambda s: s.tied_to is not None):  # tied heads after their tables
        new_layers[swap.name] = swap.build(model.get_submodule(swap.name), new_layers)
    for swap in parallel_plan.swaps:  # everything that can fail is done: now change the model
        parent_name, _, child = swap.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new_layers[swap.name])
    for change in parallel_plan.attribute_changes:
        change.apply(model)
    setattr(model, PLAN_ATTRIBUTE, parallel_plan)
    return model


def resolve_plan(model: nn.Module, plan) -> Tuple[TPPlan, str]:
    """(the TPPlan to apply, where it came from)."""
    arch = type(model).__name__
    if isinstance(plan, TPPlan):
        return plan, "user plan"
    if isinstance(plan, Mapping):
        return TPPlan(plan), "user plan"
    if plan == "hf":
        return plan_from_hf(model), "translated from the model's Hugging Face tp_plan"
    if plan is not None:
        raise TypeError(f"plan must be None, 'hf', a TPPlan or a mapping of pattern -> style, got {plan!r}")
    if arch in FAMILY_PLANS and type(model).__module__.startswith("transformers."):
        return FAMILY_PLANS[arch], "tp_kernels table"
    if hf_tp_plan(model):
        if arch not in _warned_derived:
            _warned_derived.add(arch)
            warnings.warn(f"tp_kernels.parallelize: {arch} has no tp_kernels table; using a plan translated from "
                          "its Hugging Face tp_plan, which tp_kernels has not tested for this family. Compare the "
                          "logits with the unconverted model once (python/examples/parallelize_hf_model.py "
                          "--model DIR)", stacklevel=3)
        return plan_from_hf(model), "translated from the model's Hugging Face tp_plan"
    raise TypeError(f"parallelize has no plan for {arch}: tp_kernels has tables for {', '.join(FAMILY_PLANS)}, "
                    "and its config has no base_model_tp_plan; pass plan=TPPlan(...) (see the README)")
