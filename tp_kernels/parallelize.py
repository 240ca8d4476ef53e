"""`parallelize(model, tp)`: tensor parallelism for a Hugging Face causal LM, in place.

Supported: LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel. The conversion keeps the model's own
forward (attention, norms, rotary embedding, caches, `generate`) and swaps only the modules that hold the
big matrices, each for a tp_kernels layer holding this rank's slice:

    attention   q, k, v  -> HeadParallelLinear by heads (KV heads replicated when tp > n_kv_heads);
                GPT-2's fused c_attn -> QKVParallelLinear;  o_proj / c_proj -> RowParallelLinear
    MLP         gate, up / c_fc -> ColumnParallelLinear;  down / c_proj -> RowParallelLinear
    embedding   VocabParallelEmbedding;  LM head: ParallelLMHead (sharing the embedding's shard if tied)

and sets the per-rank head counts the attention modules read (Llama/Qwen2 `num_key_value_groups`,
GPT-2 `num_heads`, `embed_dim`, `split_size`). The model's config is left as it is: it describes the full
model. Norms and GPT-2's position table are small and stay replicated. Every rank ends up with the same
hidden states and the same full logits.

The whole plan is built and checked first (architecture, every module with parameters accounted for, head
and feature counts divisible), then every new layer is built, and only then are modules swapped, so an
error leaves the model untouched. `parallelize(..., dry_run=True)` returns the plan without converting.

A model on the meta device gets the same plan and parallel layers on meta; filling them is then the
caller's job: each layer's `load_full(...)`, or `ParallelPlan.load_from(model, full_model)`.

transformers is imported when parallelize is called, not when tp_kernels is imported.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch.nn as nn

from tp_kernels.distributed import TPGroup
from tp_kernels.layers import HeadParallelLinear, heads_of_rank
from tp_kernels.layers import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                               VocabParallelEmbedding)

__all__ = ["parallelize", "ParallelPlan", "LayerSwap", "AttributeChange", "SUPPORTED_ARCHITECTURES"]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")

# build(old_module, new_layers_so_far) -> new layer; load(new_layer, full_module) fills it from full weights
Build = Callable[[nn.Module, Dict[str, nn.Module]], nn.Module]
Load = Callable[[nn.Module, nn.Module], None]


@dataclass(frozen=True)
class LayerSwap:
    """One module replaced by a parallel layer: where (`name`), what is there (`source`), what it becomes
    (`target`) and how it is split (`sharding`)."""

    name: str
    source: str
    target: str
    sharding: str
    build: Build = field(compare=False, repr=False)
    load: Optional[Load] = field(compare=False, repr=False)  # None when tied
    tied_to: Optional[str] = None  # the module whose weight Parameter this layer shares


@dataclass(frozen=True)
class AttributeChange:
    """An attribute of a module set from its full-model value to this rank's value."""

    name: str
    attribute: str
    full: int
    per_rank: int


@dataclass(frozen=True)
class ParallelPlan:
    """What `parallelize` does to a model on one rank. `print(plan)` shows it as a table."""

    architecture: str
    world_size: int
    rank: int
    swaps: Tuple[LayerSwap, ...]
    attribute_changes: Tuple[AttributeChange, ...]
    replicated: Tuple[str, ...]  # modules with parameters that every rank keeps whole

    def __str__(self) -> str:
        lines = [f"ParallelPlan: {self.architecture} at tp={self.world_size} (rank {self.rank}): "
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

    def load_from(self, model: nn.Module, full_model: nn.Module) -> None:
        """Fill the parallel layers of `model` (converted with this plan, e.g. on meta and then
        materialized with `model.to_empty(device=...)`) with this rank's slices of the same-named modules
        of `full_model`, an unconverted model holding the full weights. Only the swapped layers are
        filled; replicated parameters and buffers stay the caller's to copy. Tied layers are tied again:
        `to_empty` from meta makes a new Parameter per module, which unties them."""
        for swap in self.swaps:
            layer = model.get_submodule(swap.name)
            if swap.tied_to is not None:
                layer.weight = model.get_submodule(swap.tied_to).weight
            else:
                swap.load(layer, full_model.get_submodule(swap.name))


def parallelize(model: nn.Module, tp: TPGroup, dry_run: bool = False):
    """Convert a Hugging Face LlamaForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel to tensor parallelism
    over `tp`, in place, and return it; with dry_run=True return the ParallelPlan and change nothing.

    Plain PyTorch equivalent of the converted model's output: on every rank,
    `model(input_ids).logits` equals the unconverted model's logits (up to float rounding).

    Raises TypeError for another architecture, ValueError naming the module for a module it cannot map
    or a head / feature count the TP degree does not divide; the model is then unchanged.
    """
    if not isinstance(tp, TPGroup):
        raise TypeError(f"tp must be a tp_kernels.TPGroup, got {type(tp).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    plan = make_plan(model, tp)
    if dry_run:
        return plan
    new_layers: Dict[str, nn.Module] = {}
    for swap in plan.swaps:  # everything that can fail, before the model is touched
        new_layers[swap.name] = swap.build(model.get_submodule(swap.name), new_layers)
    for name, layer in new_layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    for change in plan.attribute_changes:
        setattr(model.get_submodule(change.name), change.attribute, change.per_rank)
    return model


def make_plan(model: nn.Module, tp: TPGroup) -> ParallelPlan:
    """The ParallelPlan of `model` on this rank of `tp`, every check done; the model is not changed."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"tp_kernels.parallelize needs the transformers package ({exc})") from exc
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

    if isinstance(model, (LlamaForCausalLM, Qwen2ForCausalLM)):
        builder = _LlamaPlanner(model, tp)
    elif isinstance(model, GPT2LMHeadModel):
        builder = _GPT2Planner(model, tp)
    else:
        raise TypeError(f"parallelize supports {', '.join(SUPPORTED_ARCHITECTURES)}; got "
                        f"{type(model).__name__}, which it has no plan for")
    return builder.plan()


# ----------------------------------------------------------------------------------------------------------
# planners: one per model family; each lists the swaps, then `plan()` checks that nothing is left unmapped
# ----------------------------------------------------------------------------------------------------------
def _describe(module: nn.Module) -> str:
    from transformers.pytorch_utils import Conv1D

    if type(module) is nn.Linear:
        return f"Linear({module.in_features} -> {module.out_features}{', bias' if module.bias is not None else ''})"
    if type(module) is Conv1D:
        return f"Conv1D({module.nx} -> {module.nf}, bias)"
    if type(module) is nn.Embedding:
        return f"Embedding({module.num_embeddings}, {module.embedding_dim})"
    return type(module).__name__


class _Planner(abc.ABC):
    """Collects swaps and attribute changes for one model; subclasses walk their architecture."""

    replicated_types: Tuple[type, ...] = ()
    replicated_names: Set[str] = set()

    def __init__(self, model: nn.Module, tp: TPGroup):
        self.model, self.tp = model, tp
        self.arch = type(model).__name__
        self.swaps: List[LayerSwap] = []
        self.changes: List[AttributeChange] = []

    # -- looking modules up ----------------------------------------------------------------------------
    def expect(self, name: str, types: Sequence[type]) -> nn.Module:
        """The submodule `name`, which must be exactly one of `types` (a subclass may change forward)."""
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"parallelize: {self.arch} has no module {name!r}, which its plan needs") from None
        if type(module) not in tuple(types):
            expected = " or ".join(t.__name__ for t in types)
            raise ValueError(f"parallelize: cannot map module {name!r} of {self.arch}: expected {expected}, "
                             f"found {type(module).__name__}")
        return module

    def divisible(self, n: int, name: str, what: str) -> int:
        if n % self.tp.world_size:
            raise ValueError(f"parallelize: module {name!r}: {what} ({n}) is not divisible by "
                             f"tp={self.tp.world_size}")
        return n // self.tp.world_size

    def heads(self, out_features: int, head_dim: int, name: str) -> int:
        if out_features % head_dim:
            raise ValueError(f"parallelize: module {name!r}: out_features ({out_features}) is not a whole number "
                             f"of heads of head_dim {head_dim}")
        return out_features // head_dim

    def add(self, name: str, module: nn.Module, target: str, sharding: str, build: Build,
            load: Optional[Load], tied_to: Optional[str] = None) -> None:
        self.swaps.append(LayerSwap(name, _describe(module), target, sharding, build, load, tied_to))

    def set_per_rank(self, name: str, attribute: str, per_rank: int) -> None:
        module = self.model.get_submodule(name)
        if not hasattr(module, attribute):
            raise ValueError(f"parallelize: module {name!r} of {self.arch} has no attribute {attribute!r} to set "
                             "per rank (a transformers version this plan does not know?)")
        self.changes.append(AttributeChange(name, attribute, int(getattr(module, attribute)), per_rank))

    # -- swaps shared by the families ------------------------------------------------------------------
    def add_embedding(self, name: str) -> nn.Embedding:
        emb = self.expect(name, (nn.Embedding,))
        tp, vocab = self.tp, emb.num_embeddings
        rows = -(-vocab // tp.world_size)

        def build(old, _):
            layer = VocabParallelEmbedding(old.num_embeddings, old.embedding_dim, tp, dtype=old.weight.dtype,
                                           device=old.weight.device)
            load(layer, old)
            return layer

        def load(layer, full):
            layer.load_full(full.weight)

        self.add(name, emb, "VocabParallelEmbedding",
                 f"vocab {vocab} -> {rows} rows per rank (padded to {rows * tp.world_size}), all-reduce", build, load)
        return emb

    def add_lm_head(self, name: str, embedding_name: str, embedding: nn.Embedding) -> None:
        head = self.expect(name, (nn.Linear,))
        tp = self.tp
        if head.weight is embedding.weight:
            self.add(name, head, "ParallelLMHead", f"tied: shares {embedding_name}'s shard, all-gather of logits",
                     lambda old, new_layers: ParallelLMHead.tied_to(new_layers[embedding_name]), None,
                     tied_to=embedding_name)
            return
        rows = -(-head.out_features // tp.world_size)

        def build(old, _):
            layer = ParallelLMHead(old.out_features, old.in_features, tp, old.bias is not None,
                                   dtype=old.weight.dtype, device=old.weight.device)
            load(layer, old)
            return layer

        def load(layer, full):
            layer.load_full(full.weight, full.bias)

        self.add(name, head, "ParallelLMHead", f"vocab {head.out_features} -> {rows} rows per rank, all-gather "
                 "of logits", build, load)

    def add_linear(self, name: str, module: nn.Module, kind: str, transposed: bool) -> None:
        """A column- or row-parallel swap of an nn.Linear (or of a GPT-2 Conv1D, whose weight is stored
        transposed as (in, out))."""
        tp = self.tp
        in_features, out_features = (module.nx, module.nf) if transposed else (module.in_features,
                                                                                module.out_features)

        def full_weight(full):
            return full.weight.t() if transposed else full.weight  # (out_features, in_features)

        def load(layer, full):
            layer.load_full(full_weight(full), full.bias)

        if kind == "column":
            per_rank = self.divisible(out_features, name, "out_features")
            cls, sharding = ColumnParallelLinear, f"out {out_features} -> {per_rank} per rank"
        else:
            per_rank = self.divisible(in_features, name, "in_features")
            cls, sharding = RowParallelLinear, f"in {in_features} -> {per_rank} per rank, all-reduce"

        def build(old, _):
            layer = cls(in_features, out_features, old.bias is not None, tp, dtype=old.weight.dtype,
                        device=old.weight.device)
            load(layer, old)
            return layer

        self.add(name, module, cls.__name__, sharding, build, load)

    def add_heads(self, name: str, module: nn.Linear, head_dim: int, n_heads: int) -> int:
        """A q, k or v projection split by heads; returns this rank's number of heads."""
        tp = self.tp
        head_start, n_heads_per_rank = heads_of_rank(n_heads, tp, f"parallelize: module {name!r}")
        if tp.world_size > n_heads:
            sharding = f"{n_heads} heads, head {head_start} replicated on {tp.world_size // n_heads} ranks"
        else:
            sharding = f"{n_heads} heads -> {n_heads_per_rank} per rank"

        def build(old, _):
            layer = HeadParallelLinear(old.in_features, head_dim, n_heads, old.bias is not None, tp,
                                       dtype=old.weight.dtype, device=old.weight.device, what=name)
            load(layer, old)
            return layer

        def load(layer, full):
            layer.load_full(full.weight, full.bias)

        self.add(name, module, "HeadParallelLinear", sharding, build, load)
        return n_heads_per_rank

    def add_fused_qkv(self, name: str, conv, hidden: int, head_dim: int, n_heads: int) -> None:
        """GPT-2's c_attn: one Conv1D (hidden -> 3 * hidden) with output columns [q | k | v], every one of
        n_heads heads; each of q, k, v is split by heads and this rank's slices are stacked."""
        tp = self.tp
        n_heads_per_rank = self.divisible(n_heads, name, "number of heads")

        def build(old, _):
            layer = QKVParallelLinear(hidden, head_dim, n_heads, n_heads, True, tp, dtype=old.weight.dtype,
                                      device=old.weight.device)
            load(layer, old)
            return layer

        def load(layer, full):
            layer.load_full(full.weight.t(), full.bias)  # Conv1D weight (hidden, 3 * hidden) -> rows [q; k; v]

        self.add(name, conv, "QKVParallelLinear", f"q, k, v of {n_heads} heads -> {n_heads_per_rank} per rank",
                 build, load)

    def check_no_active_dropout(self) -> None:
        """Dropout draws its mask from each rank's own generator, so in training mode the activations that
        every rank must hold identically would differ from rank to rank: refuse rather than diverge."""
        if not self.model.training:
            return
        for name, module in self.model.named_modules():
            p = module.p if isinstance(module, nn.Dropout) else getattr(module, "attention_dropout", 0.0)
            if isinstance(p, float) and p > 0:
                raise ValueError(f"parallelize: {self.arch} is in training mode and module {name!r} has dropout "
                                 f"{p}; call model.eval() first (dropout masks differ per rank, so the ranks' "
                                 "replicated activations would diverge)")

    # -- the final check -------------------------------------------------------------------------------
    def plan(self) -> ParallelPlan:
        self.check_no_active_dropout()
        self.walk()
        swapped = {s.name for s in self.swaps}
        replicated = []
        for name, module in self.model.named_modules():
            if name in swapped or not list(module.parameters(recurse=False)):
                continue
            if name in self.replicated_names or type(module) in self.replicated_types:
                replicated.append(name)
                continue
            raise ValueError(f"parallelize: cannot map module {name!r} ({type(module).__name__}) of {self.arch}: "
                             "it holds parameters but is neither a layer the plan splits nor one it may replicate")
        return ParallelPlan(self.arch, self.tp.world_size, self.tp.rank, tuple(self.swaps), tuple(self.changes),
                            tuple(replicated))

    @abc.abstractmethod
    def walk(self) -> None:
        """List the swaps and attribute changes of the architecture."""


class _LlamaPlanner(_Planner):
    """LlamaForCausalLM and Qwen2ForCausalLM: separate q/k/v/o and gate/up/down nn.Linear projections."""

    def __init__(self, model, tp):
        super().__init__(model, tp)
        from transformers.models.llama import modeling_llama as llama
        from transformers.models.qwen2 import modeling_qwen2 as qwen2

        self.attention_types = (llama.LlamaAttention, qwen2.Qwen2Attention)
        self.mlp_types = (llama.LlamaMLP, qwen2.Qwen2MLP)
        self.replicated_types = (llama.LlamaRMSNorm, qwen2.Qwen2RMSNorm)

    def walk(self) -> None:
        embedding = self.add_embedding("model.embed_tokens")
        for i in range(len(self.model.model.layers)):
            attn_name, mlp_name = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            attn = self.expect(attn_name, self.attention_types)
            q, k, v, o = (self.expect(f"{attn_name}.{proj}", (nn.Linear,))
                          for proj in ("q_proj", "k_proj", "v_proj", "o_proj"))
            head_dim = attn.head_dim
            n_heads = self.heads(q.out_features, head_dim, f"{attn_name}.q_proj")
            n_kv_heads = self.heads(k.out_features, head_dim, f"{attn_name}.k_proj")
            if v.out_features != k.out_features or n_heads % n_kv_heads:
                raise ValueError(f"parallelize: module {attn_name!r}: v_proj has {v.out_features} outputs and k_proj "
                                 f"{k.out_features}; n_heads ({n_heads}) must be a multiple of n_kv_heads "
                                 f"({n_kv_heads})")
            self.divisible(n_heads, f"{attn_name}.q_proj", "number of query heads")  # only KV heads replicate
            n_heads_per_rank = self.add_heads(f"{attn_name}.q_proj", q, head_dim, n_heads)
            n_kv_heads_per_rank = self.add_heads(f"{attn_name}.k_proj", k, head_dim, n_kv_heads)
            self.add_heads(f"{attn_name}.v_proj", v, head_dim, n_kv_heads)
            self.add_linear(f"{attn_name}.o_proj", o, "row", transposed=False)
            # the attention repeats each local KV head for the local query heads of its group
            self.set_per_rank(attn_name, "num_key_value_groups", n_heads_per_rank // n_kv_heads_per_rank)
            self.expect(mlp_name, self.mlp_types)
            for proj, kind in (("gate_proj", "column"), ("up_proj", "column"), ("down_proj", "row")):
                self.add_linear(f"{mlp_name}.{proj}", self.expect(f"{mlp_name}.{proj}", (nn.Linear,)), kind,
                                transposed=False)
        self.add_lm_head("lm_head", "model.embed_tokens", embedding)


class _GPT2Planner(_Planner):
    """GPT2LMHeadModel: fused c_attn (q, k, v) and c_proj, MLP c_fc and c_proj, all Conv1D (weights stored
    transposed); learned positions (wpe) stay replicated; the head is tied to wte in the released models."""

    replicated_types = (nn.LayerNorm,)
    replicated_names = {"transformer.wpe"}

    def walk(self) -> None:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2MLP
        from transformers.pytorch_utils import Conv1D

        embedding = self.add_embedding("transformer.wte")
        self.expect("transformer.wpe", (nn.Embedding,))
        for i in range(len(self.model.transformer.h)):
            attn_name, mlp_name = f"transformer.h.{i}.attn", f"transformer.h.{i}.mlp"
            attn = self.expect(attn_name, (GPT2Attention,))
            c_attn = self.expect(f"{attn_name}.c_attn", (Conv1D,))
            n_heads, head_dim, hidden = attn.num_heads, attn.head_dim, attn.embed_dim
            if c_attn.nf != 3 * hidden:
                raise ValueError(f"parallelize: cannot map module {attn_name + '.c_attn'!r}: expected 3 * {hidden} "
                                 f"outputs (q, k, v), found {c_attn.nf}")
            n_heads_per_rank = self.divisible(n_heads, attn_name, "num_heads")
            self.add_fused_qkv(f"{attn_name}.c_attn", c_attn, hidden, head_dim, n_heads)
            self.add_linear(f"{attn_name}.c_proj", self.expect(f"{attn_name}.c_proj", (Conv1D,)), "row",
                            transposed=True)
            # forward splits c_attn's output at split_size and views heads of head_dim: per rank sizes
            self.set_per_rank(attn_name, "num_heads", n_heads_per_rank)
            self.set_per_rank(attn_name, "embed_dim", n_heads_per_rank * head_dim)
            self.set_per_rank(attn_name, "split_size", n_heads_per_rank * head_dim)
            self.expect(mlp_name, (GPT2MLP,))
            self.add_linear(f"{mlp_name}.c_fc", self.expect(f"{mlp_name}.c_fc", (Conv1D,)), "column", transposed=True)
            self.add_linear(f"{mlp_name}.c_proj", self.expect(f"{mlp_name}.c_proj", (Conv1D,)), "row", transposed=True)
        self.add_lm_head("lm_head", "transformer.wte", embedding)
