"""The two plan objects: `TPPlan`, what a user or a family table writes (module-name patterns -> styles), and
`ParallelPlan`, what `parallelize` makes of it for one model on one rank (every module named, checked).

Patterns are dotted module names in which `*` stands for one name component, as in Hugging Face's
`base_model_tp_plan`: `model.layers.*.self_attn.q_proj` matches the q_proj of every layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from tp_kernels.parallelize.styles import LayerSwap, Style, as_style

# The per-rank values an attention module's attributes can be set to, from the heads its projections split.
QUANTITIES = {
    "heads": "query heads on this rank",
    "kv_heads": "KV heads on this rank",
    "kv_groups": "query heads per KV head (heads / kv_heads)",
    "q_width": "query features on this rank (heads * head_dim)",
}


@dataclass(frozen=True)
class TPPlan:
    """How to split a model, as data.

    layers: module-name pattern -> style (a name such as "column", "row", "q_heads", "kv_heads",
        "fused_qkv", "embedding", "lm_head", or a Style object such as Merged(2)); each pattern must match at
        least one module.
    per_rank: attention-module pattern -> {attribute: quantity}: attributes the module's forward reads that
        must hold this rank's value (see QUANTITIES), e.g. {"num_key_value_groups": "kv_groups"}. A dotted
        attribute "config.num_attention_heads" gives the module its own view of the config with that field
        per rank (the model's config keeps describing the full model).
    replicated: patterns of the modules with parameters that every rank keeps whole (norms, position tables).
    replicate_unlisted: keep every other module with parameters whole too (Hugging Face's rule for its own
        plans); when False such a module raises, naming it.
    """

    layers: Mapping[str, Union[str, Style]]
    per_rank: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    replicated: Sequence[str] = ()
    replicate_unlisted: bool = False

    def __post_init__(self):
        if not isinstance(self.layers, Mapping) or not self.layers:
            raise TypeError(f"TPPlan layers must be a non-empty mapping of module-name pattern -> style, "
                            f"got {self.layers!r}")
        styles = {}
        for pattern, style in self.layers.items():
            _check_pattern(pattern, "layers")
            styles[pattern] = as_style(style, pattern)
        object.__setattr__(self, "layers", styles)
        if not isinstance(self.per_rank, Mapping):
            raise TypeError(f"TPPlan per_rank must be a mapping of pattern -> {{attribute: quantity}}, "
                            f"got {self.per_rank!r}")
        for pattern, attributes in self.per_rank.items():
            _check_pattern(pattern, "per_rank")
            if not isinstance(attributes, Mapping):
                raise TypeError(f"TPPlan per_rank[{pattern!r}] must map attribute -> quantity, got {attributes!r}")
            for attribute, quantity in attributes.items():
                if quantity not in QUANTITIES:
                    raise ValueError(f"TPPlan per_rank[{pattern!r}][{attribute!r}]: quantity must be one of "
                                     f"{sorted(QUANTITIES)}, got {quantity!r}")
        if isinstance(self.replicated, str):
            raise TypeError(f"TPPlan replicated must be a sequence of patterns, got the string {self.replicated!r}")
        for pattern in self.replicated:
            _check_pattern(pattern, "replicated")
        object.__setattr__(self, "replicated", tuple(self.replicated))

    def extend(self, layers: Optional[Mapping] = None, per_rank: Optional[Mapping] = None,
               replicated: Sequence[str] = ()) -> "TPPlan":
        """A copy with entries added or replaced (for a family that is another one plus a few modules)."""
        return TPPlan({**self.layers, **(layers or {})}, {**self.per_rank, **(per_rank or {})},
                      tuple(self.replicated) + tuple(replicated), self.replicate_unlisted)


def _check_pattern(pattern, where: str) -> None:
    if not isinstance(pattern, str) or not pattern or any(not part for part in pattern.split(".")):
        raise ValueError(f"TPPlan {where}: a pattern must be a dotted module name (with * for one component), "
                         f"got {pattern!r}")


def pattern_regex(pattern: str) -> "re.Pattern[str]":
    return re.compile("^" + r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))
                      + "$")


@dataclass(frozen=True)
class AttributeChange:
    """An attribute of a module set from its full-model value to this rank's value. A dotted attribute
    (config.num_attention_heads) is set on the module's own per-rank view of the config."""

    name: str
    attribute: str
    full: int
    per_rank: int

    def apply(self, model: nn.Module) -> None:
        module = model.get_submodule(self.name)
        owner_name, _, field_name = self.attribute.rpartition(".")
        if not owner_name:
            setattr(module, field_name, self.per_rank)
            return
        if owner_name != "config":
            raise ValueError(f"per-rank attribute {self.attribute!r}: only config.<field> may be dotted")
        config = module.config
        if not isinstance(config, PerRankConfig):
            config = PerRankConfig(config)
            module.config = config
        config.set_per_rank(field_name, self.per_rank)


class PerRankConfig:
    """A module's view of the model's config after parallelize: the fields set with `set_per_rank` hold this
    rank's values; every other field is read from (and written to) the model's config itself, so later
    changes there (e.g. the attention implementation) are seen."""

    def __init__(self, full):
        object.__setattr__(self, "_full", full)
        object.__setattr__(self, "_per_rank", {})

    def set_per_rank(self, name: str, value) -> None:
        object.__getattribute__(self, "_per_rank")[name] = value

    @property
    def full_config(self):
        return object.__getattribute__(self, "_full")

    def __getattr__(self, name: str):  # called only for names not found on the view itself
        per_rank = object.__getattribute__(self, "_per_rank")
        if name in per_rank:
            return per_rank[name]
        return getattr(object.__getattribute__(self, "_full"), name)

    def __setattr__(self, name: str, value) -> None:
        if name in object.__getattribute__(self, "_per_rank"):
            raise AttributeError(f"{name} is set per rank by tp_kernels.parallelize; change the model instead")
        setattr(object.__getattribute__(self, "_full"), name, value)

    def __repr__(self) -> str:
        return f"PerRankConfig({object.__getattribute__(self, '_per_rank')} over {type(self.full_config).__name__})"


@dataclass(frozen=True)
class ParallelPlan:
    """What `parallelize` does to a model on one rank. `print(plan)` shows it as a table."""

    architecture: str
    source: str  # where the plan came from: the family table, the model's base_model_tp_plan, the user's
    world_size: int
    rank: int
    swaps: Tuple[LayerSwap, ...]
    attribute_changes: Tuple[AttributeChange, ...]
    replicated: Tuple[str, ...]  # modules with parameters that every rank keeps whole

    def __str__(self) -> str:
        lines = [f"ParallelPlan: {self.architecture} at tp={self.world_size} (rank {self.rank}), {self.source}: "
                 f"{len(self.swaps)} modules swapped, {len(self.attribute_changes)} attributes set per rank, "
                 f"{len(self.replicated)} modules replicated"]
        widths = [max((len(getattr(s, f)) for s in self.swaps), default=0) for f in ("name", "source", "target")]
        for s in self.swaps:
            lines.append(f"  {s.name:<{widths[0]}}  {s.source:<{widths[1]}}  -> {s.target:<{widths[2]}}  {s.sharding}")
        if self.attribute_changes:
            lines.append("attributes set per rank:")
            lines += [f"  {c.name}.{c.attribute}: {c.full} -> {c.per_rank}" for c in self.attribute_changes]
        if self.replicated:
            lines.append("replicated on every rank: " + ", ".join(self.replicated))
        return "\n".join(lines)

    def swapped_names(self) -> Set[str]:
        return {s.name for s in self.swaps}

    def load_from(self, model: nn.Module, full_model: nn.Module, device=None) -> None:
        """Fill every parameter and buffer of `model`, converted with this plan (on the meta device, or
        materialized), from `full_model`, an unconverted model holding the full weights: the swapped layers
        get this rank's slices of full_model's same-named modules, everything else (norms, position tables,
        rotary inv_freq and other buffers) a copy of full_model's same-named tensor. A model still on meta is
        first materialized with `to_empty` on `device` (default: full_model's device). Raises naming the
        tensor when full_model lacks one or holds it on meta; afterwards nothing of `model` is left unfilled.
        """
        if getattr(full_model, "tp_kernels_plan", None) is not None:
            raise ValueError("load_from: full_model was converted by parallelize; pass an unconverted model")
        if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
            target = device if device is not None else next(full_model.parameters()).device
            model.to_empty(device=target)
        swapped = self.swapped_names()
        for swap in self.swaps:
            layer = model.get_submodule(swap.name)
            if swap.tied_to is not None:  # to_empty makes a Parameter per module, which unties them
                layer.weight = model.get_submodule(swap.tied_to).weight
                continue
            try:
                full = full_model.get_submodule(swap.name)
            except AttributeError:
                raise ValueError(f"load_from: full_model has no module {swap.name!r}") from None
            _check_not_meta(full.named_parameters(), swap.name)
            swap.load(layer, full)
        with torch.no_grad():
            for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
                for name, tensor in tensors:
                    if name.rpartition(".")[0] in swapped and kind == "parameter":
                        continue
                    source = _named_tensor(full_model, kind, name)
                    _check_not_meta([(name, source)], "full_model")
                    if source.shape != tensor.shape:
                        raise ValueError(f"load_from: full_model {kind} {name!r} has shape {tuple(source.shape)}, "
                                         f"the converted model's {tuple(tensor.shape)}")
                    tensor.copy_(source)


def _named_tensor(module: nn.Module, kind: str, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name) if kind == "parameter" else module.get_buffer(name)
    except AttributeError:
        raise ValueError(f"load_from: full_model has no {kind} {name!r} to fill the converted model's") from None


def _check_not_meta(named, where: str) -> None:
    for name, t in named:
        if t.is_meta:
            raise ValueError(f"load_from: {where}: tensor {name!r} of full_model is on the meta device (it holds no "
                             "values); load the full model's weights first")
