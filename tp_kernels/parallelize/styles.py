"""How one module is split across the ranks: the styles a TPPlan maps module-name patterns to.

Each style checks the module it is given (its exact type: a subclass may change forward), and returns a
LayerSwap holding three closures: `build` makes this rank's parallel layer from the full module, `load`
fills such a layer from a full module (the meta-device flow), and `gather` is the inverse of `load`: it
collects the full tensors back from every rank (a collective: every rank calls it in the same order), in
the original module's layout, for saving.

| style | module | becomes | this rank holds |
|---|---|---|---|
| `"column"` / `Column()` | Linear, GPT-2 Conv1D | ColumnParallelLinear | rows of W (output features) |
| `"row"` / `Row()` | Linear, GPT-2 Conv1D | RowParallelLinear | columns of W; the bias whole, added once |
| `"q_heads"`, `"kv_heads"` / `Heads(kind)` | Linear | HeadParallelLinear | whole heads; KV heads replicated when tp > their number |
| `"qkv_heads"` / `Heads("qkv")` | Linear with per-head [q, k, v] rows (GPT-NeoX) | HeadParallelLinear | whole heads with their q, k, v |
| `"fused_qkv"` / `FusedQKV()` | Linear, Conv1D with rows [all q; all k; all v] (Phi3, GPT-2) | QKVParallelLinear | its q heads, k heads, v heads |
| `Merged(parts)` | Linear with stacked equal parts (Phi3's gate_up_proj) | MergedColumnParallelLinear | its slice of every part |
| `"embedding"` / `Embedding()` | Embedding (or Gemma's scaled one) | VocabParallelEmbedding | vocabulary rows (padded) |
| `"lm_head"` / `LMHead()` | Linear | ParallelLMHead | vocabulary rows; tied to the embedding's shard if the model ties |
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from tp_kernels import ops
from tp_kernels.distributed import TPGroup
from tp_kernels.layers import (ColumnParallelLinear, HeadParallelLinear, MergedColumnParallelLinear, ParallelLMHead,
                               QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding, heads_of_rank)

# build(full_module, layers_built_so_far) -> layer; load(layer, full_module); gather(layer) -> {param: full tensor}
Build = Callable[[nn.Module, Dict[str, nn.Module]], nn.Module]
Load = Callable[[nn.Module, nn.Module], None]
Gather = Callable[[nn.Module], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class HeadSplit:
    """The attention heads a swap splits: (full, per-rank) counts of query and of KV heads (None where the
    projection holds none of that kind), and the head size."""

    q_heads: Optional[Tuple[int, int]]
    kv_heads: Optional[Tuple[int, int]]
    head_dim: int


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
    gather: Optional[Gather] = field(compare=False, repr=False)  # None when tied
    tied_to: Optional[str] = None  # the module whose weight Parameter this layer shares
    heads: Optional[HeadSplit] = None


class PlanError(ValueError):
    """A plan that does not fit the model; the message names the module."""


@dataclass
class Site:
    """What a style sees of the module it splits: its name, the module, its parent (the attention module
    for projections), the group, and the swaps planned so far (the LM head looks for the embedding)."""

    name: str
    module: nn.Module
    parent: nn.Module
    tp: TPGroup
    swaps: Sequence[LayerSwap]
    model: nn.Module

    def fail(self, what: str) -> PlanError:
        return PlanError(f"parallelize: module {self.name!r}: {what}")

    def divisible(self, n: int, what: str) -> int:
        if n % self.tp.world_size:
            raise self.fail(f"{what} ({n}) is not divisible by tp={self.tp.world_size}")
        return n // self.tp.world_size

    def parent_attribute(self, paths: Sequence[str]) -> Optional[int]:
        """The first of the dotted attribute paths that the parent module has (e.g. 'config.num_attention_heads')."""
        for path in paths:
            value = self.parent
            try:
                for part in path.split("."):
                    value = getattr(value, part)
            except AttributeError:
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None


def describe(module: nn.Module) -> str:
    if type(module) is nn.Linear:
        return f"Linear({module.in_features} -> {module.out_features}{', bias' if module.bias is not None else ''})"
    if _is_conv1d(module):
        return f"Conv1D({module.nx} -> {module.nf}, bias)"
    if isinstance(module, nn.Embedding):
        return f"{type(module).__name__}({module.num_embeddings}, {module.embedding_dim})"
    return type(module).__name__


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed, (in_features, out_features)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return type(module) is Conv1D


def _linear_dims(site: Site, allow_conv1d: bool = True) -> Tuple[int, int, bool]:
    """(in_features, out_features, stored transposed) of an exact nn.Linear or GPT-2 Conv1D."""
    module = site.module
    if type(module) is nn.Linear:
        return module.in_features, module.out_features, False
    if allow_conv1d and _is_conv1d(module):
        return module.nx, module.nf, True
    expected = "Linear or Conv1D" if allow_conv1d else "Linear"
    raise site.fail(f"cannot map it: expected {expected}, found {type(module).__name__}")


def _oriented(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A Linear-layout (out_features, in_features) view of a weight stored either way."""
    return weight.t() if transposed else weight


def _like(old: nn.Module) -> dict:
    """dtype and device of a module's weight, for the layer that replaces it."""
    return dict(dtype=old.weight.dtype, device=old.weight.device)


def _linear_load(transposed: bool) -> Load:
    """load(layer, full): the layer's load_full from a full Linear (or a Conv1D, stored transposed)."""
    def load(layer, full):
        layer.load_full(_oriented(full.weight, transposed), full.bias)
    return load


def _builder(make: Callable[[nn.Module], nn.Module], load: Load) -> Build:
    """build(old, _): the empty layer make(old) makes, filled from old by load."""
    def build(old, _):
        layer = make(old)
        load(layer, old)
        return layer
    return build


def _all_ranks(t: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """(world_size, *t.shape): every rank's t, rank 0 first."""
    with torch.no_grad():
        return ops.all_gather(t.detach().contiguous(), tp, dim=0).view(tp.world_size, *t.shape)


def _distinct_ranks(stacked: torch.Tensor, ranks_per_copy: int) -> torch.Tensor:
    """Of per-rank blocks where each block is held by ranks_per_copy consecutive ranks, one copy of each."""
    return stacked[::ranks_per_copy]


# ----------------------------------------------------------------------------------------------------------
# styles
# ----------------------------------------------------------------------------------------------------------
class Style(ABC):
    """A way to split one module. `swap(site)` checks the module and plans its replacement."""

    @abstractmethod
    def swap(self, site: Site) -> LayerSwap:
        """Check the module at site and plan its replacement; raise PlanError when it does not fit."""

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


@dataclass(frozen=True, repr=True)
class Column(Style):
    """Split the output features; `gather_output=True` all-gathers them (Hugging Face's colwise_gather_output)."""

    gather_output: bool = False

    def swap(self, site: Site) -> LayerSwap:
        n_in, n_out, transposed = _linear_dims(site)
        per_rank = site.divisible(n_out, "out_features")
        tp, gather_output = site.tp, self.gather_output

        load = _linear_load(transposed)
        build = _builder(lambda old: ColumnParallelLinear(n_in, n_out, old.bias is not None, tp, gather_output,
                                                          **_like(old)), load)

        def gather(layer):
            weight = _all_ranks(layer.weight, tp).reshape(n_out, n_in)
            out = {"weight": _oriented(weight, transposed).contiguous()}
            if layer.bias is not None:
                out["bias"] = _all_ranks(layer.bias, tp).reshape(n_out)
            return out

        sharding = f"out {n_out} -> {per_rank} per rank" + (", all-gather of outputs" if gather_output else "")
        return LayerSwap(site.name, describe(site.module), "ColumnParallelLinear", sharding, build, load, gather)


@dataclass(frozen=True, repr=True)
class Row(Style):
    """Split the input features and all-reduce the partial products; `input_is_parallel=False` takes the
    full input and keeps its slice (Hugging Face's rowwise_split_input)."""

    input_is_parallel: bool = True

    def swap(self, site: Site) -> LayerSwap:
        n_in, n_out, transposed = _linear_dims(site)
        per_rank = site.divisible(n_in, "in_features")
        tp, input_is_parallel = site.tp, self.input_is_parallel

        load = _linear_load(transposed)
        build = _builder(lambda old: RowParallelLinear(n_in, n_out, old.bias is not None, tp, input_is_parallel,
                                                       **_like(old)), load)

        def gather(layer):
            weight = _all_ranks(layer.weight, tp).permute(1, 0, 2).reshape(n_out, n_in)  # columns, rank-major
            out = {"weight": _oriented(weight, transposed).contiguous()}
            if layer.bias is not None:
                out["bias"] = layer.bias.detach().clone()  # replicated: the same on every rank
            return out

        sharding = f"in {n_in} -> {per_rank} per rank, all-reduce" + ("" if input_is_parallel else " (splits its input)")
        return LayerSwap(site.name, describe(site.module), "RowParallelLinear", sharding, build, load, gather)


HEAD_DIM_ATTRIBUTES = ("head_dim", "head_size")
N_HEADS_ATTRIBUTES = ("num_heads", "num_attention_heads", "config.num_attention_heads")
N_KV_HEADS_ATTRIBUTES = ("num_key_value_heads", "config.num_key_value_heads")


def _head_dim(site: Site, given: Optional[int]) -> int:
    head_dim = given if given is not None else site.parent_attribute(HEAD_DIM_ATTRIBUTES)
    if head_dim is None or head_dim < 1:
        raise site.fail(f"its parent {type(site.parent).__name__} has no {' or '.join(HEAD_DIM_ATTRIBUTES)} "
                        "attribute to split it by heads; give the style head_dim=")
    return head_dim


@dataclass(frozen=True, repr=True)
class Heads(Style):
    """A projection whose output features are whole heads, split by heads.

    kind "q": query heads (the TP degree must divide them); "kv": key or value heads, replicated on
    tp / n consecutive ranks when tp exceeds their number n, so that each rank holds the KV head its query
    heads use; "qkv": each head's q, k and v rows stored together (GPT-NeoX's query_key_value), 3 *
    head_dim rows per head. head_dim defaults to the parent module's `head_dim` (or `head_size`).
    """

    kind: str = "q"
    head_dim: Optional[int] = None

    def __post_init__(self):
        if self.kind not in ("q", "kv", "qkv"):
            raise ValueError(f"Heads kind must be 'q', 'kv' or 'qkv', got {self.kind!r}")

    def swap(self, site: Site) -> LayerSwap:
        n_in, n_out, _ = _linear_dims(site, allow_conv1d=False)
        head_dim = _head_dim(site, self.head_dim)
        rows_per_head = 3 * head_dim if self.kind == "qkv" else head_dim
        if n_out % rows_per_head:
            raise site.fail(f"out_features ({n_out}) is not a whole number of heads of {rows_per_head} rows")
        n_heads, tp = n_out // rows_per_head, site.tp
        if self.kind != "kv":
            site.divisible(n_heads, "number of query heads")  # only KV heads are replicated
        head_start, n_heads_per_rank = heads_of_rank(n_heads, tp, f"parallelize: module {site.name!r}")
        ranks_per_copy = max(1, tp.world_size // n_heads)
        if ranks_per_copy > 1:
            sharding = f"{n_heads} heads, head {head_start} replicated on {ranks_per_copy} ranks"
        else:
            sharding = f"{n_heads} heads -> {n_heads_per_rank} per rank"

        load = _linear_load(transposed=False)
        build = _builder(lambda old: HeadParallelLinear(n_in, rows_per_head, n_heads, old.bias is not None, tp,
                                                        what=site.name, **_like(old)), load)

        def gather(layer):
            out = {"weight": _distinct_ranks(_all_ranks(layer.weight, tp), ranks_per_copy).reshape(n_out, n_in)}
            if layer.bias is not None:
                out["bias"] = _distinct_ranks(_all_ranks(layer.bias, tp), ranks_per_copy).reshape(n_out)
            return out

        counts = (n_heads, n_heads_per_rank)
        heads = HeadSplit(counts if self.kind != "kv" else None, counts if self.kind != "q" else None, head_dim)
        return LayerSwap(site.name, describe(site.module), "HeadParallelLinear", sharding, build, load, gather,
                         heads=heads)


@dataclass(frozen=True, repr=True)
class FusedQKV(Style):
    """One projection with output rows [all q heads; all k heads; all v heads] (Phi3's qkv_proj, GPT-2's
    c_attn): q, k and v are each split by heads and this rank's slices stacked (QKVParallelLinear).
    n_heads and n_kv_heads default to the parent module's num_heads / num_attention_heads /
    config.num_attention_heads and num_key_value_heads / config.num_key_value_heads (else n_heads)."""

    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None

    def swap(self, site: Site) -> LayerSwap:
        n_in, n_out, transposed = _linear_dims(site)
        head_dim = _head_dim(site, self.head_dim)
        n_heads = self.n_heads if self.n_heads is not None else site.parent_attribute(N_HEADS_ATTRIBUTES)
        if n_heads is None:
            raise site.fail(f"its parent {type(site.parent).__name__} has none of {', '.join(N_HEADS_ATTRIBUTES)}; "
                            "give FusedQKV(n_heads=...)")
        n_kv = self.n_kv_heads if self.n_kv_heads is not None else site.parent_attribute(N_KV_HEADS_ATTRIBUTES)
        n_kv = n_heads if n_kv is None else n_kv
        if n_out != (n_heads + 2 * n_kv) * head_dim:
            raise site.fail(f"expected (n_heads {n_heads} + 2 * n_kv_heads {n_kv}) * head_dim {head_dim} = "
                            f"{(n_heads + 2 * n_kv) * head_dim} outputs (q, k, v), found {n_out}")
        tp = site.tp
        site.divisible(n_heads, "number of query heads")
        _, n_kv_per_rank = heads_of_rank(n_kv, tp, f"parallelize: module {site.name!r}")
        n_heads_per_rank = n_heads // tp.world_size
        ranks_per_kv_copy = max(1, tp.world_size // n_kv)

        load = _linear_load(transposed)
        build = _builder(lambda old: QKVParallelLinear(n_in, head_dim, n_heads, n_kv, old.bias is not None, tp,
                                                       **_like(old)), load)

        def unshard(stacked: torch.Tensor) -> torch.Tensor:
            """(p, rows per rank, ...) of [q_r; k_r; v_r] blocks -> the full [q; k; v]."""
            q_rows, kv_rows = n_heads_per_rank * head_dim, n_kv_per_rank * head_dim
            q, k, v = stacked.split([q_rows, kv_rows, kv_rows], dim=1)
            q = q.reshape(-1, *stacked.shape[2:])
            k = _distinct_ranks(k, ranks_per_kv_copy).reshape(-1, *stacked.shape[2:])
            v = _distinct_ranks(v, ranks_per_kv_copy).reshape(-1, *stacked.shape[2:])
            return torch.cat([q, k, v])

        def gather(layer):
            out = {"weight": _oriented(unshard(_all_ranks(layer.weight, tp)), transposed).contiguous()}
            if layer.bias is not None:
                out["bias"] = unshard(_all_ranks(layer.bias, tp))
            return out

        sharding = f"q, k, v of {n_heads} / {n_kv} heads -> {n_heads_per_rank} / {n_kv_per_rank} per rank"
        heads = HeadSplit((n_heads, n_heads_per_rank), (n_kv, n_kv_per_rank), head_dim)
        return LayerSwap(site.name, describe(site.module), "QKVParallelLinear", sharding, build, load, gather,
                         heads=heads)


@dataclass(frozen=True, repr=True)
class Merged(Style):
    """A projection whose output rows stack `parts` equal parts (Phi3's gate_up_proj = [gate; up]): each
    part is split on its own and this rank's slices are stacked, so `chunk(parts)` of the output gives this
    rank's slice of every part."""

    parts: int = 2

    def swap(self, site: Site) -> LayerSwap:
        n_in, n_out, transposed = _linear_dims(site)
        if self.parts < 1 or n_out % self.parts:
            raise site.fail(f"out_features ({n_out}) is not {self.parts} equal parts")
        part = n_out // self.parts
        part_per_rank = site.divisible(part, f"out_features of each of its {self.parts} parts")
        tp, sizes = site.tp, [part] * self.parts

        load = _linear_load(transposed)
        build = _builder(lambda old: MergedColumnParallelLinear(n_in, sizes, old.bias is not None, tp, **_like(old)),
                         load)

        def unshard(stacked: torch.Tensor) -> torch.Tensor:
            """(p, parts * part_per_rank, ...) -> parts in order, each rank-major."""
            per_part = stacked.reshape(tp.world_size, self.parts, part_per_rank, *stacked.shape[2:])
            return per_part.transpose(0, 1).reshape(n_out, *stacked.shape[2:])

        def gather(layer):
            out = {"weight": _oriented(unshard(_all_ranks(layer.weight, tp)), transposed).contiguous()}
            if layer.bias is not None:
                out["bias"] = unshard(_all_ranks(layer.bias, tp))
            return out

        sharding = f"{self.parts} parts of {part} -> {part_per_rank} per rank each"
        return LayerSwap(site.name, describe(site.module), "MergedColumnParallelLinear", sharding, build, load, gather)


class ScaledVocabParallelEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding times a constant (Gemma scales its embeddings by sqrt(hidden_size)); the scale
    is applied after the all-reduce, in the weight's dtype, as Gemma's embedding does it."""

    def __init__(self, vocab_size: int, dim: int, tp: TPGroup, embed_scale: float, *, dtype=None, device=None):
        super().__init__(vocab_size, dim, tp, dtype=dtype, device=device)
        self.scalar_embed_scale = embed_scale
        self.register_buffer("embed_scale", torch.tensor(embed_scale, device=device), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


def _vocab_rows(layer: nn.Module, tp: TPGroup, t: torch.Tensor) -> torch.Tensor:
    """Every rank's vocabulary rows of t, stacked, without the padding rows."""
    stacked = _all_ranks(t, tp)
    return stacked.reshape(-1, *t.shape[1:])[:layer.vocab_size]


@dataclass(frozen=True, repr=True)
class Embedding(Style):
    """The input embedding, split by vocabulary rows (padded to a multiple of tp); Gemma's scaled embedding
    (an nn.Embedding subclass with `scalar_embed_scale`) keeps its scale."""

    def swap(self, site: Site) -> LayerSwap:
        emb, tp = site.module, site.tp
        scaled = isinstance(emb, nn.Embedding) and type(emb).__name__.endswith("ScaledWordEmbedding") \
            and isinstance(getattr(emb, "scalar_embed_scale", None), (int, float))
        if type(emb) is not nn.Embedding and not scaled:
            raise site.fail(f"cannot map it: expected Embedding, found {type(emb).__name__}")
        vocab = emb.num_embeddings
        rows = -(-vocab // tp.world_size)

        def load(layer, full):
            layer.load_full(full.weight)

        def make(old):
            if scaled:
                return ScaledVocabParallelEmbedding(old.num_embeddings, old.embedding_dim, tp, old.scalar_embed_scale,
                                                    **_like(old))
            return VocabParallelEmbedding(old.num_embeddings, old.embedding_dim, tp, **_like(old))

        build = _builder(make, load)

        def gather(layer):
            return {"weight": _vocab_rows(layer, tp, layer.weight)}

        target = "ScaledVocabParallelEmbedding" if scaled else "VocabParallelEmbedding"
        sharding = f"vocab {vocab} -> {rows} rows per rank (padded to {rows * tp.world_size}), all-reduce"
        if scaled:
            sharding += f", times {emb.scalar_embed_scale:.6g}"
        return LayerSwap(site.name, describe(emb), target, sharding, build, load, gather)


@dataclass(frozen=True, repr=True)
class LMHead(Style):
    """The output projection, split by vocabulary rows, logits all-gathered; when its weight is the
    embedding's (tied), it shares the parallel embedding's shard."""

    def swap(self, site: Site) -> LayerSwap:
        head, tp = site.module, site.tp
        _linear_dims(site, allow_conv1d=False)
        for swap in site.swaps:
            if swap.target.endswith("VocabParallelEmbedding") and \
                    site.model.get_submodule(swap.name).weight is head.weight:
                embedding_name = swap.name
                return LayerSwap(site.name, describe(head), "ParallelLMHead",
                                 f"tied: shares {embedding_name}'s shard, all-gather of logits",
                                 lambda old, layers: ParallelLMHead.tied_to(layers[embedding_name]), None, None,
                                 tied_to=embedding_name)
        if any(head.weight is p for n, p in site.model.named_parameters(remove_duplicate=False)
               if not n.startswith(site.name + ".")):
            raise site.fail("its weight is shared with a module the plan does not split as the embedding")
        rows = -(-head.out_features // tp.world_size)

        load = _linear_load(transposed=False)
        build = _builder(lambda old: ParallelLMHead(old.out_features, old.in_features, tp, old.bias is not None,
                                                    **_like(old)), load)

        def gather(layer):
            out = {"weight": _vocab_rows(layer, tp, layer.weight)}
            if layer.bias is not None:
                out["bias"] = _vocab_rows(layer, tp, layer.bias)
            return out

        return LayerSwap(site.name, describe(head), "ParallelLMHead",
                         f"vocab {head.out_features} -> {rows} rows per rank, all-gather of logits", build, load, gather)


STYLE_NAMES: Dict[str, Style] = {
    "column": Column(), "row": Row(), "q_heads": Heads("q"), "kv_heads": Heads("kv"), "qkv_heads": Heads("qkv"),
    "fused_qkv": FusedQKV(), "embedding": Embedding(), "lm_head": LMHead(),
}


def as_style(value: Union[str, Style], pattern: str) -> Style:
    """A plan entry's style: a Style, or one of the names in STYLE_NAMES."""
    if isinstance(value, Style):
        return value
    if isinstance(value, str) and value in STYLE_NAMES:
        return STYLE_NAMES[value]
    raise ValueError(f"plan entry {pattern!r}: style must be a tp_kernels.parallelize Style or one of "
                     f"{sorted(STYLE_NAMES)}, got {value!r}")
