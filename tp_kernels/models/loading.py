"""Filling a GPT from a checkpoint with Hugging Face tensor names, each rank reading only its slices.

A source hands out, per tensor name, either a tensor or a lazy safetensors slice
(`safe_open(...).get_slice(name)`); the parallel layers' `load_full` index their arguments only with
`t[a:b]` / `t[:, a:b]`, so a slice reads just this rank's rows or columns from the file. Every name is
checked against the shape the config implies before anything is read, and after loading every tensor of
the checkpoint must have been used: a missing, wrong-shaped or unexpected tensor raises a ValueError
naming it.

GPT-2 checkpoints store their linear layers as Conv1D weights, (in_features, out_features), the
transpose of nn.Linear's. `Transposed` presents such a slice as (out, in): a row range [a:b] of the view
is read as the column range [:, a:b] of the file, so a column-parallel layer (c_attn, c_fc) reads a
strided block (in_features runs of (b - a) elements; only those bytes are copied, though the OS pages in
whole 4 KiB pages around each run), and a row-parallel one (attn.c_proj, mlp.c_proj) reads a contiguous
row range. Peak memory per rank stays at its shard plus one tensor-slice.
"""
from __future__ import annotations

import abc
import os
import re
import warnings
from typing import Dict, KeysView, List, Sequence, Set, Tuple

import torch

from tp_kernels.layers import ParallelLMHead
from tp_kernels.models.config import ModelArgs, read_json

INDEX_FILE = "model.safetensors.index.json"
# Buffers old checkpoints saved that this model recomputes: GPT-2's causal mask, Llama's inverse frequencies.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


def _shape(t) -> Tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())


class Transposed:
    """The (out, in) view of a Conv1D weight stored as (in, out): `view[rows, cols]` reads
    `stored[cols, rows]` and transposes it, so only the requested block is read."""

    def __init__(self, stored):
        self.stored = stored

    def get_shape(self) -> List[int]:
        n_in, n_out = _shape(self.stored)
        return [n_out, n_in]

    def __getitem__(self, key) -> torch.Tensor:
        rows, cols = (key + (slice(None),))[:2] if isinstance(key, tuple) else (key, slice(None))
        return self.stored[cols, rows].T


class TensorSource(abc.ABC):
    """Named full tensors (or lazy slices of them). `get` checks the shape and records the name as used;
    `check_all_used` raises for tensors that nothing asked for."""

    description = "checkpoint"

    def __init__(self):
        self.used: Set[str] = set()

    @abc.abstractmethod
    def names(self) -> KeysView[str]:
        """Every tensor name the source holds (a keys view: O(1) membership, set operations)."""

    @abc.abstractmethod
    def _lookup(self, name: str):
        """The tensor or lazy slice stored under name (known to exist)."""

    def has(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str, expected_shape: Sequence[int]):
        if name not in self.names():
            raise ValueError(f"{self.description} has no tensor {name!r} (expected shape {tuple(expected_shape)})")
        t = self._lookup(name)
        if _shape(t) != tuple(expected_shape):
            raise ValueError(f"{self.description} tensor {name!r} has shape {_shape(t)}, but the config implies "
                             f"{tuple(expected_shape)}")
        self.used.add(name)
        return t

    def skip(self, name: str) -> None:
        """Mark name as deliberately unused (e.g. lm_head.weight of a tied model)."""
        self.used.add(name)

    def check_all_used(self) -> None:
        unexpected = sorted(n for n in self.names() - self.used if not _IGNORED.search(n))
        if unexpected:
            shown = ", ".join(repr(n) for n in unexpected[:8])
            raise ValueError(f"{self.description} has {len(unexpected)} tensor(s) this model does not use: "
                             f"{shown}{' ...' if len(unexpected) > 8 else ''}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Release open files."""


class DictSource(TensorSource):
    """Tensors held in memory (e.g. random_checkpoint)."""

    description = "state dict"

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        super().__init__()
        self.tensors = tensors

    def names(self) -> KeysView[str]:
        return self.tensors.keys()

    def _lookup(self, name: str):
        return self.tensors[name]


class SafetensorsSource(TensorSource):
    """The *.safetensors files of a Hugging Face model directory: the files model.safetensors.index.json
    lists when it exists, else every *.safetensors file. Every file's header is read (and checked) here;
    tensors are read lazily (memory-mapped) and only the slices asked for. A corrupt file or index raises
    naming it."""

    def __init__(self, path: str):
        super().__init__()
        from safetensors import safe_open  # imported here: only loading needs it

        self._safe_open = safe_open
        self.path = os.fspath(path)
        self.description = f"checkpoint {self.path}"
        index_path = os.path.join(self.path, INDEX_FILE)
        self.file_of: Dict[str, str] = {}
        if os.path.isfile(index_path):
            for name, file in self._read_index(index_path).items():
                self.file_of[name] = os.path.join(self.path, file)
            for file in sorted(set(self.file_of.values())):
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"{index_path} lists {os.path.basename(file)}, which does not exist")
                held = self._names_in(file)
                missing = sorted(n for n, f in self.file_of.items() if f == file and n not in held)
                if missing:
                    raise ValueError(f"{index_path} places {missing[:4]} in {os.path.basename(file)}, which does not "
                                     "hold them")
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors file in {self.path}")
            for file in files:
                for name in self._names_in(os.path.join(self.path, file)):
                    self.file_of[name] = os.path.join(self.path, file)
        self._handles: Dict[str, object] = {}

    @staticmethod
    def _read_index(index_path: str) -> Dict[str, str]:
        index = read_json(index_path, "checkpoint index", "an object with a 'weight_map' of tensor name -> file name")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index_path} has no 'weight_map' object of tensor name -> file name")
        return weight_map

    def _open(self, file: str):
        try:
            return self._safe_open(file, framework="pt")
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own SafetensorError, or OSError)
            raise ValueError(f"checkpoint file {file} could not be read as safetensors ({exc}); expected the "
                             "safetensors format: an 8-byte header size, a JSON header, then the tensor data") from None

    def _names_in(self, file: str) -> Set[str]:
        with self._open(file) as handle:
            return set(handle.keys())

    def names(self) -> KeysView[str]:
        return self.file_of.keys()

    def _lookup(self, name: str):
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file].get_slice(name)

    def close(self) -> None:
        self._handles.clear()


# ----------------------------------------------------------------------------------------------------------
# Hugging Face names -> the GPT's layers
# ----------------------------------------------------------------------------------------------------------
def _copy_replicated(param: torch.Tensor, t) -> None:
    with torch.no_grad():
        param.copy_(t[:].to(device=param.device, dtype=param.dtype))


def _load_head(model, src: TensorSource, embedding_name: str) -> None:
    """The LM head. An untied model reads lm_head.weight. A tied one shares the embedding's shard, unless
    the checkpoint also stores an lm_head.weight whose rows differ from the embedding's: transformers 5.24
    then keeps the stored head ("both are present in the checkpoints with different values, so we will NOT
    tie them"), and so does this loader, comparing only this rank's rows (each rank reads only its slice)."""
    a = model.args
    if not a.tie_word_embeddings:
        model.lm_head.load_full(src.get("lm_head.weight", (a.vocab_size, a.dim)))
        return
    if not src.has("lm_head.weight"):
        return
    head = src.get("lm_head.weight", (a.vocab_size, a.dim))
    start = model.embed.vocab_start
    stop = min(start + model.embed.vocab_size_per_rank, a.vocab_size)
    if start >= stop or torch.equal(head[start:stop], src.get(embedding_name, (a.vocab_size, a.dim))[start:stop]):
        return  # the stored head is the embedding table: stay tied
    warnings.warn(f"{src.description}: the config ties the LM head to the embedding, but the checkpoint stores an "
                  "lm_head.weight with different values; keeping the stored head untied, as transformers does (set "
                  "tie_word_embeddings: false in config.json to silence this)", stacklevel=2)
    untied = ParallelLMHead(a.vocab_size, a.dim, model.tp, dtype=model.dtype, device=model.device)
    untied.load_full(head)
    model.lm_head = untied


def _llama_steps(model, src: TensorSource):
    """One loading step per layer (for the progress bar), Llama/Qwen2 names under 'model.'."""
    a = model.args
    d, hd = a.dim, a.head_dim
    q_rows, kv_rows = a.n_heads * hd, a.n_kv_heads * hd

    def embed():
        model.embed.load_full(src.get("model.embed_tokens.weight", (a.vocab_size, d)))
    yield embed

    def block_step(i: int, block):
        p = f"model.layers.{i}."

        def step():
            att = p + "self_attn."
            qkv = [src.get(att + f"{n}_proj.weight", (rows, d)) for n, rows in (("q", q_rows), ("k", kv_rows),
                                                                                 ("v", kv_rows))]
            qkv_bias = [src.get(att + f"{n}_proj.bias", (rows,)) for n, rows in (("q", q_rows), ("k", kv_rows),
                                                                                 ("v", kv_rows))] if a.qkv_bias else []
            block.attn.qkv.load_full_qkv(*qkv, *qkv_bias)
            block.attn.o_proj.load_full(src.get(att + "o_proj.weight", (d, q_rows)),
                                        src.get(att + "o_proj.bias", (d,)) if a.o_bias else None)
            mlp = p + "mlp."
            gate_up = [src.get(mlp + f"{n}_proj.weight", (a.intermediate_size, d)) for n in ("gate", "up")]
            gate_up_bias = [src.get(mlp + f"{n}_proj.bias", (a.intermediate_size,))
                            for n in ("gate", "up")] if a.mlp_bias else None
            block.gate_up.load_full(gate_up, gate_up_bias)
            block.down.load_full(src.get(mlp + "down_proj.weight", (d, a.intermediate_size)),
                                 src.get(mlp + "down_proj.bias", (d,)) if a.mlp_bias else None)
            if a.qk_norm:
                _copy_replicated(block.attn.q_norm, src.get(att + "q_norm.weight", (hd,)))
                _copy_replicated(block.attn.k_norm, src.get(att + "k_norm.weight", (hd,)))
            _copy_replicated(block.input_norm, src.get(p + "input_layernorm.weight", (d,)))
            _copy_replicated(block.post_attn_norm, src.get(p + "post_attention_layernorm.weight", (d,)))
        return step

    for i, block in enumerate(model.blocks):
        yield block_step(i, block)

    def head():
        _copy_replicated(model.final_norm, src.get("model.norm.weight", (d,)))
        _load_head(model, src, "model.embed_tokens.weight")
    yield head


def _gpt2_steps(model, src: TensorSource):
    """GPT-2 names, with or without the 'transformer.' prefix (GPT2LMHeadModel vs the original files)."""
    a = model.args
    d, n_inner = a.dim, a.intermediate_size
    prefix = "transformer." if src.has("transformer.wte.weight") else ""

    def conv1d(name: str, n_in: int, n_out: int) -> Transposed:
        return Transposed(src.get(name, (n_in, n_out)))

    def norm(params, name: str) -> None:
        _copy_replicated(params[0], src.get(name + ".weight", (d,)))
        _copy_replicated(params[1], src.get(name + ".bias", (d,)))

    def embed():
        model.embed.load_full(src.get(prefix + "wte.weight", (a.vocab_size, d)))
        _copy_replicated(model.pos_embed, src.get(prefix + "wpe.weight", (a.max_seq_len, d)))
    yield embed

    def block_step(i: int, block):
        p = f"{prefix}h.{i}."

        def step():
            norm(block.ln_1, p + "ln_1")
            block.attn.qkv.load_full(conv1d(p + "attn.c_attn.weight", d, 3 * d),
                                     src.get(p + "attn.c_attn.bias", (3 * d,)))
            block.attn.o_proj.load_full(conv1d(p + "attn.c_proj.weight", d, d), src.get(p + "attn.c_proj.bias", (d,)))
            norm(block.ln_2, p + "ln_2")
            block.fc.load_full(conv1d(p + "mlp.c_fc.weight", d, n_inner), src.get(p + "mlp.c_fc.bias", (n_inner,)))
            block.proj.load_full(conv1d(p + "mlp.c_proj.weight", n_inner, d), src.get(p + "mlp.c_proj.bias", (d,)))
        return step

    for i, block in enumerate(model.blocks):
        yield block_step(i, block)

    def head():
        norm(model.final_norm, prefix + "ln_f")
        _load_head(model, src, prefix + "wte.weight")
    yield head


def load_weights(model, src: TensorSource, progress: bool = True) -> None:
    """Fill model (a GPT) from src, then check that src held nothing unexpected. A tqdm bar on rank 0."""
    steps = list(_gpt2_steps(model, src) if model.args.family == "gpt2" else _llama_steps(model, src))
    if progress and model.tp.rank == 0:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"loading (tp={model.tp.world_size})", unit="layer")
    for step in steps:
        step()
    src.check_all_used()


# ----------------------------------------------------------------------------------------------------------
# seeded random weights, in the checkpoint layout
# ----------------------------------------------------------------------------------------------------------
def random_checkpoint(args: ModelArgs, seed: int) -> Dict[str, torch.Tensor]:
    """Full float32 weights drawn from seed, named and shaped as a Hugging Face checkpoint of args. Linear
    weights are N(0, 1/fan_in) so activations stay O(1) through the layers, the embedding N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    d, hd, n_inner = args.dim, args.head_dim, args.intermediate_size

    def normal(*shape, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(n_out: int, n_in: int) -> torch.Tensor:
        return normal(n_out, n_in, std=n_in ** -0.5)

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(d, std=0.1)

    out: Dict[str, torch.Tensor] = {}
    if args.family == "gpt2":
        out["transformer.wte.weight"] = normal(args.vocab_size, d, std=1.0)
        out["transformer.wpe.weight"] = normal(args.max_seq_len, d, std=0.1)
        for i in range(args.n_layers):
            p = f"transformer.h.{i}."
            for name, n_in, n_out in (("attn.c_attn", d, 3 * d), ("attn.c_proj", d, d), ("mlp.c_fc", d, n_inner),
                                      ("mlp.c_proj", n_inner, d)):
                out[p + name + ".weight"] = linear(n_out, n_in).T.contiguous()  # Conv1D layout (in, out)
                out[p + name + ".bias"] = normal(n_out, std=0.02)
            for ln in ("ln_1", "ln_2"):
                out[p + ln + ".weight"], out[p + ln + ".bias"] = norm_weight(), normal(d, std=0.02)
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = norm_weight(), normal(d, std=0.02)
    else:
        out["model.embed_tokens.weight"] = normal(args.vocab_size, d, std=1.0)
        for i in range(args.n_layers):
            p = f"model.layers.{i}."
            for name, n_out, n_in, has_bias in (
                    ("self_attn.q_proj", args.n_heads * hd, d, args.qkv_bias),
                    ("self_attn.k_proj", args.n_kv_heads * hd, d, args.qkv_bias),
                    ("self_attn.v_proj", args.n_kv_heads * hd, d, args.qkv_bias),
                    ("self_attn.o_proj", d, args.n_heads * hd, args.o_bias),
                    ("mlp.gate_proj", n_inner, d, args.mlp_bias), ("mlp.up_proj", n_inner, d, args.mlp_bias),
                    ("mlp.down_proj", d, n_inner, args.mlp_bias)):
                out[p + name + ".weight"] = linear(n_out, n_in)
                if has_bias:
                    out[p + name + ".bias"] = normal(n_out, std=0.02)
            if args.qk_norm:
                out[p + "self_attn.q_norm.weight"] = 1.0 + normal(hd, std=0.1)
                out[p + "self_attn.k_norm.weight"] = 1.0 + normal(hd, std=0.1)
            out[p + "input_layernorm.weight"] = norm_weight()
            out[p + "post_attention_layernorm.weight"] = norm_weight()
        out["model.norm.weight"] = norm_weight()
        if not args.tie_word_embeddings:
            out["lm_head.weight"] = linear(args.vocab_size, d)
    return out

