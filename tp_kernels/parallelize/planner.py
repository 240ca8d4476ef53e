"""TPPlan + model -> ParallelPlan: match every pattern to the model's modules and check everything, changing
nothing. Every module that holds parameters must be split by a layers entry or be replicated; every
layers and per_rank pattern must match a module; each per-rank attribute's current value must be the full
model's value of its quantity (so a plan that does not fit the model raises instead of converting it)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from tp_kernels.distributed import TPGroup
from tp_kernels.parallelize.plan import QUANTITIES, AttributeChange, ParallelPlan, TPPlan, pattern_regex
from tp_kernels.parallelize.styles import HeadSplit, LayerSwap, PlanError, Site, Style


def make_plan(model: nn.Module, tp: TPGroup, table: TPPlan, source: str) -> ParallelPlan:
    arch = type(model).__name__
    _check_no_active_dropout(model, arch)
    modules = dict(model.named_modules())
    swaps = _plan_swaps(model, modules, tp, table, arch)
    changes = _plan_attribute_changes(modules, swaps, table, tp, arch)
    replicated = _plan_replicated(model, {s.name for s in swaps}, table, arch)
    return ParallelPlan(arch, source, tp.world_size, tp.rank, tuple(swaps), tuple(changes), tuple(replicated))


def _matches(patterns: Dict[str, object], modules: Dict[str, nn.Module], what: str, arch: str) -> Dict[str, str]:
    """module name -> the one pattern that matches it; every pattern must match at least one module."""
    regexes = {p: pattern_regex(p) for p in patterns}
    found: Dict[str, str] = {}
    for name in modules:
        hits = [p for p, rx in regexes.items() if rx.match(name)]
        if len(hits) > 1:
            raise PlanError(f"parallelize: module {name!r} of {arch} matches several {what} patterns: {hits}")
        if hits:
            found[name] = hits[0]
    unmatched = sorted(set(patterns) - set(found.values()))
    if unmatched:
        raise PlanError(f"parallelize: plan {what} pattern(s) {unmatched} match no module of {arch} (a model or "
                        "transformers version the plan does not know?)")
    return found


def _plan_swaps(model, modules, tp, table: TPPlan, arch: str) -> List[LayerSwap]:
    swaps: List[LayerSwap] = []
    for name, pattern in _matches(table.layers, modules, "layers", arch).items():
        style: Style = table.layers[pattern]
        parent = modules[name.rpartition(".")[0]]
        try:
            swaps.append(style.swap(Site(name, modules[name], parent, tp, tuple(swaps), model)))
        except PlanError:
            raise
        except ValueError as exc:  # a layer's own check (e.g. heads_of_rank): say which module
            raise PlanError(f"parallelize: module {name!r} of {arch}: {exc}") from None
    return swaps


def _attention_heads(name: str, swaps: List[LayerSwap]) -> Tuple[Tuple[int, int], Tuple[int, int], int]:
    """(query heads, KV heads, head_dim), each (full, per rank), of the projections directly under name."""
    splits: List[HeadSplit] = [s.heads for s in swaps if s.heads is not None and s.name.rpartition(".")[0] == name]
    if not splits:
        raise PlanError(f"parallelize: module {name!r} has per-rank attributes in the plan, but none of its "
                        "children is split by heads")
    q = {s.q_heads for s in splits if s.q_heads is not None}
    kv = {s.kv_heads for s in splits if s.kv_heads is not None} or q
    head_dims = {s.head_dim for s in splits}
    if len(q) != 1 or len(kv) != 1 or len(head_dims) != 1:
        raise PlanError(f"parallelize: module {name!r}: its projections disagree on the heads: query {sorted(q)}, "
                        f"KV {sorted(kv)}, head_dim {sorted(head_dims)}")
    (q_heads,), (kv_heads,), (head_dim,) = q, kv, head_dims
    if q_heads[0] % kv_heads[0]:
        raise PlanError(f"parallelize: module {name!r}: n_heads ({q_heads[0]}) must be a multiple of n_kv_heads "
                        f"({kv_heads[0]})")
    return q_heads, kv_heads, head_dim


def _quantity(quantity: str, q_heads: int, kv_heads: int, head_dim: int) -> int:
    return {"heads": q_heads, "kv_heads": kv_heads, "kv_groups": q_heads // kv_heads,
            "q_width": q_heads * head_dim}[quantity]


def _read_attribute(module: nn.Module, path: str) -> Optional[object]:
    value = module
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _plan_attribute_changes(modules, swaps, table: TPPlan, tp: TPGroup, arch: str) -> List[AttributeChange]:
    changes: List[AttributeChange] = []
    for name, pattern in _matches(table.per_rank, modules, "per_rank", arch).items():
        (q_full, q_rank), (kv_full, kv_rank), head_dim = _attention_heads(name, swaps)
        for attribute, quantity in table.per_rank[pattern].items():
            current = _read_attribute(modules[name], attribute)
            expected = _quantity(quantity, q_full, kv_full, head_dim)
            if current is None:
                raise PlanError(f"parallelize: module {name!r} of {arch} has no attribute {attribute!r} to set per "
                                "rank (a transformers version this plan does not know?)")
            if current != expected:
                raise PlanError(f"parallelize: module {name!r}: attribute {attribute!r} is {current}, but the plan "
                                f"sets it to the {QUANTITIES[quantity]}, whose full-model value is {expected}: the "
                                "plan does not fit this model")
            changes.append(AttributeChange(name, attribute, expected, _quantity(quantity, q_rank, kv_rank, head_dim)))
    return changes


def _plan_replicated(model: nn.Module, swapped, table: TPPlan, arch: str) -> List[str]:
    regexes = [pattern_regex(p) for p in table.replicated]
    replicated = []
    for name, module in model.named_modules():
        if name in swapped or not list(module.parameters(recurse=False)):
            continue
        if table.replicate_unlisted or any(rx.match(name) for rx in regexes):
            replicated.append(name)
            continue
        raise PlanError(f"parallelize: cannot map module {name!r} ({type(module).__name__}) of {arch}: it holds "
                        "parameters but the plan neither splits it nor lists it as replicated")
    return replicated


def _check_no_active_dropout(model: nn.Module, arch: str) -> None:
    """Dropout draws its mask from each rank's own generator, so in training mode the activations that every
    rank must hold identically would differ from rank to rank: refuse rather than diverge."""
    if not model.training:
        return
    for name, module in model.named_modules():
        rates = [module.p] if isinstance(module, nn.Dropout) else \
            [getattr(module, attr, 0.0) for attr in ("attention_dropout", "dropout")]  # OPT's attention: dropout
        p = max((r for r in rates if isinstance(r, float)), default=0.0)
        if p > 0:
            raise PlanError(f"parallelize: {arch} is in training mode and module {name!r} has dropout {p}; call "
                            "model.eval() first (dropout masks differ per rank, so the ranks' replicated activations "
                            "would diverge)")
