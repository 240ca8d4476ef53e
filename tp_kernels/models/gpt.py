"""A minimal tensor-parallel GPT decoder (Llama family: Llama, Mistral, Qwen2, Qwen3; GPT-2) built from
tp_kernels.layers and tp_kernels.ops.

Every rank holds its shard of each weight matrix and a static KV cache for its own KV heads; `forward`
returns full-vocabulary logits on every rank. Per layer, the communication is two reductions: the
attention output projection and the MLP down projection (row-parallel). In the Llama family each is
followed by a residual add and an RMSNorm, so each is done by `allreduce_residual_rmsnorm` on the
partial product `F.linear(x_r, W_r)`; in the GPT-2 family (LayerNorm) they go through RowParallelLinear
(`gemm_allreduce`).

Batches of prompts of different lengths are right-padded: every token carries its true position, the
cache row of sequence b holds its tokens at their positions, and token (b, s) attends to cache positions
0..positions[b, s] of row b. Pad tokens write garbage past a prompt's end, which is never attended to: a
query at position p sees only keys at positions <= p, and decoding overwrites position p before reading it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tp_kernels import ops, reference
from tp_kernels.distributed import TPGroup
from tp_kernels.layers import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                               RowParallelLinear, VocabParallelEmbedding)
from tp_kernels.models.config import PRESETS, ModelArgs, check_fits_in_memory
from tp_kernels.models.sampling import greedy_vocab_parallel

__all__ = ["GPT", "KVCache", "ModelArgs", "PRESETS"]


@dataclass
class KVCache:
    """This rank's static cache: per layer, k and v of shape (batch, max_seq, n_kv_heads_per_rank, head_dim)."""

    k: List[torch.Tensor]
    v: List[torch.Tensor]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq(self) -> int:
        return self.k[0].shape[1]


class AttentionWindow(NamedTuple):
    """What the attention of every layer shares in one forward, made once per forward: the tokens' positions
    and cache rows, flat (B * S,); the cache positions 0..kv_len-1 read; and the mask (B, 1, S, kv_len), None
    when every token sees the whole window."""

    batch: int
    seq: int
    positions: torch.Tensor
    cache_rows: torch.Tensor
    kv_len: int
    mask: Optional[torch.Tensor]


class Attention(nn.Module):
    """Causal self-attention over this rank's heads: fused QKV projection + RoPE + cache write, SDPA over
    the cache, and the output projection's row-parallel weight (reduced by the caller's chosen op)."""

    def __init__(self, args: ModelArgs, tp: TPGroup, dtype, device):
        super().__init__()
        self.qkv = QKVParallelLinear(args.dim, args.head_dim, args.n_heads, args.n_kv_heads, args.qkv_bias, tp,
                                     dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(args.n_heads * args.head_dim, args.dim, args.o_bias, tp,
                                        dtype=dtype, device=device)
        self.rope_style = "neox" if args.family == "llama" else "none"
        # Qwen3: an RMSNorm over each q and k head (weights of head_dim, the same for every head and rank)
        self.q_norm = nn.Parameter(torch.ones(args.head_dim, dtype=dtype, device=device)) if args.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(args.head_dim, dtype=dtype, device=device)) if args.qk_norm else None
        self.norm_eps = args.norm_eps

    def forward(self, x: torch.Tensor, window: "AttentionWindow", cos_sin: Optional[torch.Tensor],
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x (B * S, dim) -> attention output before o_proj, (B * S, n_heads_per_rank * head_dim)."""
        batch, seq = window.batch, window.seq
        n_heads_per_rank, head_dim = self.qkv.n_heads_per_rank, self.qkv.head_dim
        if self.q_norm is not None:
            q = self._qkv_normed_rope_kv_cache(x, window.positions, window.cache_rows, cos_sin, k_cache, v_cache)
        else:
            q = ops.qkv_rope_kv_cache(x, self.qkv.weight, self.qkv.bias, cos_sin, window.positions, window.cache_rows,
                                      k_cache, v_cache, n_heads_per_rank=n_heads_per_rank,
                                      n_kv_heads_per_rank=self.qkv.n_kv_heads_per_rank, head_dim=head_dim,
                                      rope_style=self.rope_style)  # (B * S, n_heads_per_rank, head_dim)
        q = q.view(batch, seq, n_heads_per_rank, head_dim).transpose(1, 2)  # (B, n_heads_per_rank, S, head_dim)
        k = k_cache[:batch, :window.kv_len].transpose(1, 2)  # (B, n_kv_heads_per_rank, kv_len, head_dim)
        v = v_cache[:batch, :window.kv_len].transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=window.mask, enable_gqa=True)  # (B, n_heads_pr, S, hd)
        return o.transpose(1, 2).reshape(batch * seq, n_heads_per_rank * head_dim)

    def _qkv_normed_rope_kv_cache(self, x, positions, cache_rows, cos_sin, k_cache, v_cache) -> torch.Tensor:
        """qkv_rope_kv_cache with Qwen3's per-head RMSNorm of q and k between the projection and RoPE, which
        the fused op has no place for: the projection and head split (rope 'none'), then the norms, RoPE and
        the cache write. x (T, dim) -> q (T, n_heads_per_rank, head_dim)."""
        q, k, v = ops.qkv_rope(x, self.qkv.weight, self.qkv.bias, None, positions,
                               n_heads_per_rank=self.qkv.n_heads_per_rank,
                               n_kv_heads_per_rank=self.qkv.n_kv_heads_per_rank, head_dim=self.qkv.head_dim,
                               rope_style="none")  # (T, heads, head_dim) each
        angles = cos_sin[positions]  # (T, head_dim)
        q = reference.apply_rope(reference.rmsnorm(q, self.q_norm, self.norm_eps), angles, self.rope_style)
        k = reference.apply_rope(reference.rmsnorm(k, self.k_norm, self.norm_eps), angles, self.rope_style)
        reference.write_kv_cache(k, v, positions, cache_rows, k_cache, v_cache)
        return q


def _row_parallel_partial(layer: RowParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """This rank's term X_r A_r^T of a row-parallel layer, for a fused op to reduce. The bias is added on
    rank 0 only, so the sum over ranks holds it once."""
    partial = F.linear(x, layer.weight)  # (T, out_features)
    if layer.bias is not None and layer.tp.rank == 0:
        partial = partial + layer.bias
    return partial


def _reduce_add_rmsnorm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        tp: TPGroup):
    """allreduce_residual_rmsnorm over tp; on one rank the reduction is the identity, so add_rmsnorm alone
    (the op would copy the partial sum first: 16 needless copies and Python fallbacks per decode step)."""
    if tp.world_size == 1:
        return ops.add_rmsnorm(partial, residual, weight, eps)
    return ops.allreduce_residual_rmsnorm(partial, residual, weight, eps, tp)


class LlamaBlock(nn.Module):
    """Pre-norm block with RMSNorm and a SwiGLU MLP. It takes the input already normalized by its
    input_norm (the previous block's fused reduction did that) and returns the next norm's output."""

    def __init__(self, args: ModelArgs, tp: TPGroup, dtype, device):
        super().__init__()
        self.tp, self.eps = tp, args.norm_eps
        self.attn = Attention(args, tp, dtype, device)
        self.input_norm = nn.Parameter(torch.ones(args.dim, dtype=dtype, device=device))
        self.post_attn_norm = nn.Parameter(torch.ones(args.dim, dtype=dtype, device=device))
        self.gate_up = MergedColumnParallelLinear(args.dim, [args.intermediate_size] * 2, args.mlp_bias, tp,
                                                  dtype=dtype, device=device)
        self.down = RowParallelLinear(args.intermediate_size, args.dim, args.mlp_bias, tp, dtype=dtype, device=device)

    def forward(self, normed, residual, next_norm, window, cos_sin, k_cache, v_cache):
        """normed, residual (B * S, dim) -> next_norm(residual after this block), that residual."""
        o = self.attn(normed, window, cos_sin, k_cache, v_cache)
        normed, residual = _reduce_add_rmsnorm(_row_parallel_partial(self.attn.o_proj, o), residual,
                                               self.post_attn_norm, self.eps, self.tp)
        # the merged projection's weight, without the module call and its input check (~4 us a layer): normed
        # comes from the norm above, (B * S, dim) by construction; gate, up: (B * S, intermediate_size_per_rank) each
        gate, up = self.gate_up.split(F.linear(normed, self.gate_up.weight, self.gate_up.bias))
        return _reduce_add_rmsnorm(_row_parallel_partial(self.down, F.silu(gate) * up), residual, next_norm,
                                   self.eps, self.tp)


class GPT2Block(nn.Module):
    """Pre-norm block with LayerNorm, biases and a GELU MLP; reductions through RowParallelLinear."""

    def __init__(self, args: ModelArgs, tp: TPGroup, dtype, device):
        super().__init__()
        self.eps = args.norm_eps
        self.gelu_approximate = "tanh" if args.activation == "gelu_tanh" else "none"
        self.attn = Attention(args, tp, dtype, device)
        self.ln_1 = nn.ParameterList([nn.Parameter(torch.ones(args.dim, dtype=dtype, device=device)),
                                      nn.Parameter(torch.zeros(args.dim, dtype=dtype, device=device))])
        self.ln_2 = nn.ParameterList([nn.Parameter(torch.ones(args.dim, dtype=dtype, device=device)),
                                      nn.Parameter(torch.zeros(args.dim, dtype=dtype, device=device))])
        self.fc = ColumnParallelLinear(args.dim, args.intermediate_size, True, tp, dtype=dtype, device=device)
        self.proj = RowParallelLinear(args.intermediate_size, args.dim, True, tp, dtype=dtype, device=device)

    def forward(self, h, window, cos_sin, k_cache, v_cache):
        """h (B * S, dim) -> h after this block."""
        x = layer_norm(h, self.ln_1, self.eps)  # (B * S, dim)
        h = h + self.attn.o_proj(self.attn(x, window, cos_sin, k_cache, v_cache))
        x = F.gelu(self.fc(layer_norm(h, self.ln_2, self.eps)), approximate=self.gelu_approximate)
        return h + self.proj(x)


def layer_norm(x: torch.Tensor, weight_bias: nn.ParameterList, eps: float) -> torch.Tensor:
    """LayerNorm in float32, rounded once to x's dtype."""
    weight, bias = weight_bias
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


class GPT(nn.Module):
    """The decoder on one rank of tp. Build it with `GPT(args, tp)` (random weights, one shard per rank),
    `GPT.from_pretrained(path, tp)` or `GPT.from_preset(name, tp, seed=...)`."""

    def __init__(self, args: ModelArgs, tp: TPGroup, *, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
        if not isinstance(tp, TPGroup):
            raise TypeError(f"tp must be a tp_kernels.TPGroup, got {type(tp).__name__}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
        self.args, self.tp = args, tp
        check_fits_in_memory(args, tp.world_size, torch.empty((), dtype=dtype).element_size(), device)
        self.embed = VocabParallelEmbedding(args.vocab_size, args.dim, tp, dtype=dtype, device=device)
        if args.family == "gpt2":
            self.pos_embed = nn.Parameter(torch.zeros(args.max_seq_len, args.dim, dtype=dtype, device=device))
            self.blocks = nn.ModuleList(GPT2Block(args, tp, dtype, device) for _ in range(args.n_layers))
            self.final_norm = nn.ParameterList([nn.Parameter(torch.ones(args.dim, dtype=dtype, device=device)),
                                                nn.Parameter(torch.zeros(args.dim, dtype=dtype, device=device))])
            self.register_buffer("cos_sin", None, persistent=False)
        else:
            self.blocks = nn.ModuleList(LlamaBlock(args, tp, dtype, device) for _ in range(args.n_layers))
            self.final_norm = nn.Parameter(torch.ones(args.dim, dtype=dtype, device=device))
            # In the model's dtype, as Hugging Face rounds cos and sin before rotating.
            self.register_buffer("cos_sin", reference.rope_cos_sin_cache(
                args.max_seq_len, args.head_dim, args.rope_theta, dtype=dtype, device=device), persistent=False)
        if args.tie_word_embeddings:
            self.lm_head = ParallelLMHead.tied_to(self.embed)
        else:
            self.lm_head = ParallelLMHead(args.vocab_size, args.dim, tp, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def weight_bytes_per_rank(self) -> int:
        """Bytes of this rank's parameters (a tied table counted once): what it holds in memory."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def decode_bytes_per_rank(self, kv_len: int, batch: int = 1) -> int:
        """Bytes a one-token decode step reads from memory on this rank: every weight except the rows of
        the embedding table it does not look up (a tied table is read whole by the LM head), and the keys and
        values of kv_len cached positions per sequence. A step cannot take less than this over the memory
        bandwidth (the decode roofline)."""
        table = self.embed.weight
        skipped_rows = 0 if self.args.tie_word_embeddings else max(0, table.shape[0] - batch)
        cache_row = 2 * self.blocks[0].attn.qkv.n_kv_heads_per_rank * self.args.head_dim * table.element_size()
        return (self.weight_bytes_per_rank() - skipped_rows * table.shape[1] * table.element_size()
                + len(self.blocks) * batch * kv_len * cache_row)

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], tp: TPGroup, dtype: torch.dtype = torch.float32,
                        device: Union[str, torch.device] = "cpu", progress: bool = True) -> "GPT":
        """Load a local Hugging Face model directory (config.json and *.safetensors, one file or sharded with
        model.safetensors.index.json); each rank reads only its own slices of the weights."""
        from tp_kernels.models.loading import SafetensorsSource, load_weights

        model = cls(ModelArgs.from_hf_config(path), tp, dtype=dtype, device=device)
        with SafetensorsSource(path) as source:
            load_weights(model, source, progress=progress)
        return model

    @classmethod
    def from_preset(cls, name_or_args: Union[str, ModelArgs], tp: TPGroup, dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu", seed: int = 0) -> "GPT":
        """A model with seeded random weights: the full weights are drawn from `seed` and sharded, so the
        same seed gives the same model at every TP degree."""
        from tp_kernels.models.loading import DictSource, load_weights, random_checkpoint

        args = name_or_args if isinstance(name_or_args, ModelArgs) else ModelArgs.from_name(name_or_args)
        model = cls(args, tp, dtype=dtype, device=device)
        load_weights(model, DictSource(random_checkpoint(args, seed)), progress=False)
        return model

    def new_cache(self, batch: int, max_seq: int) -> KVCache:
        """An empty static cache for batch sequences of up to max_seq tokens."""
        if batch < 1 or not 1 <= max_seq <= self.args.max_seq_len:
            raise ValueError(f"need batch >= 1 and 1 <= max_seq <= max_seq_len ({self.args.max_seq_len}), got "
                             f"batch={batch}, max_seq={max_seq}")
        qkv = self.blocks[0].attn.qkv
        shape = (batch, max_seq, qkv.n_kv_heads_per_rank, qkv.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        cache = KVCache([torch.zeros(shape, **kw) for _ in self.blocks], [torch.zeros(shape, **kw) for _ in self.blocks])
        # static addresses: torch.compile(mode="reduce-overhead") then keeps its CUDA graphs (written-to inputs
        # that are not static make it skip them) and does not copy the caches into graph memory per call
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t)
        return cache

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits over the full vocabulary, on every rank.

        input_ids (B, S); positions (B, S), the position of each token in its sequence (default 0..S-1);
        cache: the KVCache that keys and values are written to and read from (default: a fresh one for
        this call, i.e. a full recomputation); logits_at (B,): if given, only the logits of token
        logits_at[b] of each row are computed. Returns (B, S, vocab_size), or (B, vocab_size) with
        logits_at, in the model's dtype.
        """
        return self.lm_head(self.hidden_states(input_ids, positions, cache, logits_at))

    def greedy_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """argmax(self.lm_head(h), -1) for final hidden states h (B, dim), the same (B,) int64 on every
        rank, without gathering the logits: each rank takes the argmax of its vocabulary slice and one
        all-reduce of 2 numbers per rank and row picks the winner (ties: the lowest token id, as argmax)."""
        head = self.lm_head
        local = F.linear(h, head.weight, head.bias)  # (B, vocab_size_per_rank)
        n_real = max(0, min(head.vocab_size_per_rank, head.vocab_size - head.vocab_start))  # 0: padding only
        return greedy_vocab_parallel(local, head.vocab_start, n_real, self.tp)

    def hidden_states(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                      cache: Optional[KVCache] = None, logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What forward hands the LM head: the final norm's output, (B, S, dim), or (B, dim) with logits_at.
        Same arguments as forward."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be a 2-D (batch, seq) int tensor, got {input_ids.dtype} "
                             f"of shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if positions is None:
            positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        if tuple(positions.shape) != (batch, seq):
            raise ValueError(f"positions must have input_ids' shape {(batch, seq)}, got {tuple(positions.shape)}")
        if torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            # A compiled or captured step has static shapes: it attends over the whole static cache (the mask
            # hides the positions not written yet), as gpt-fast does. int(positions.max()) would be a
            # data-dependent guard (a host sync in a capture); a position past the cache still raises on CPU,
            # in the cache write (an index out of range).
            if cache is None:
                raise ValueError("a compiled forward needs a cache (model.new_cache): its size fixes the shapes")
            kv_len, whole_window = cache.max_seq, False
        else:
            lowest, highest = self._check_positions(positions, batch, cache)
            kv_len = highest + 1
            # one token per sequence, all at the newest position (batch-1 decode): each sees every key of the
            # window, so no mask (it cost 2 ops per step and SDPA's masked path per layer)
            whole_window = seq == 1 and lowest == highest
        if cache is None:
            cache = self.new_cache(batch, kv_len)
        # token (b, s) sees the keys of row b at positions <= positions[b, s]
        mask = None if whole_window else \
            torch.arange(kv_len, device=positions.device) <= positions[:, None, :, None]  # (B, 1, S, kv_len)
        cache_rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, seq)  # (B, S)
        window = AttentionWindow(batch, seq, positions.reshape(-1), cache_rows.reshape(-1), kv_len, mask)

        h = self.embed(input_ids).view(batch * seq, -1)  # (B * S, dim)
        if self.args.family == "gpt2":
            h = h + self.pos_embed[window.positions]
            for i, block in enumerate(self.blocks):
                h = block(h, window, None, cache.k[i], cache.v[i])
            h = layer_norm(h, self.final_norm, self.args.norm_eps)
        else:
            # residual starts as the embedding: add_rmsnorm with a zero residual is the first RMSNorm alone
            h, residual = ops.add_rmsnorm(h, torch.zeros_like(h), self.blocks[0].input_norm, self.args.norm_eps)
            for i, block in enumerate(self.blocks):
                next_norm = self.blocks[i + 1].input_norm if i + 1 < len(self.blocks) else self.final_norm
                h, residual = block(h, residual, next_norm, window, self.cos_sin, cache.k[i], cache.v[i])
        h = h.view(batch, seq, -1)  # (B, S, dim)
        if logits_at is None:
            return h
        return h[torch.arange(batch, device=h.device), logits_at]  # (B, dim)

    def _check_positions(self, positions: torch.Tensor, batch: int, cache: Optional[KVCache]) -> Tuple[int, int]:
        """The smallest and the largest position, after checking that every position fits max_seq_len and the
        cache. One host sync per forward: the largest sizes the attended cache window."""
        lowest, highest = (int(t) for t in torch.aminmax(positions))
        if lowest < 0 or highest >= self.args.max_seq_len:
            raise ValueError(f"positions must be in [0, max_seq_len={self.args.max_seq_len}), got "
                             f"[{lowest}, {highest}]")
        if cache is not None and (cache.batch < batch or cache.max_seq <= highest):
            raise ValueError(f"cache (batch {cache.batch}, max_seq {cache.max_seq}) is too small for batch {batch} "
                             f"at position {highest}")
        return lowest, highest
