"""A Llama-style transformer block, unsharded (plain PyTorch) and sharded (tp_kernels layers and ops), for
the test that the sharded block equals the unsharded one at every world size.

The block is RMSNorm -> fused QKV + RoPE (ops.qkv_rope) -> causal GQA attention -> o_proj whose reduction is
fused with the residual add and the next RMSNorm (ops.allreduce_residual_rmsnorm) -> SwiGLU MLP
(MergedColumnParallelLinear, RowParallelLinear = ops.gemm_allreduce) -> residual add. The unsharded block is
plain PyTorch modules; the parallel one is built from it with the layers' from_linear constructors.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tp_kernels import layers, ops, reference
from tp_kernels.distributed import TPGroup


class ReferenceBlock(nn.Module):
    """The unsharded block in plain PyTorch (names as in Hugging Face Llama)."""

    def __init__(self, hidden: int = 64, intermediate: int = 128, n_heads: int = 4, n_kv_heads: int = 2,
                 max_position: int = 256, eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = n_heads, n_kv_heads, hidden // n_heads, eps
        self.input_norm = nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.post_attention_norm = nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.q_proj = nn.Linear(hidden, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.register_buffer("cos_sin", reference.rope_cos_sin_cache(max_position, self.head_dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        h = reference.rmsnorm(x, self.input_norm, self.eps)
        q = self.q_proj(h).view(batch, seq, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h).view(batch, seq, self.n_kv_heads, self.head_dim)
        cos_sin = self.cos_sin[torch.arange(seq)]  # (seq, head_dim)
        q = torch.stack([reference.apply_rope(q[b], cos_sin, "neox") for b in range(batch)])
        k = torch.stack([reference.apply_rope(k[b], cos_sin, "neox") for b in range(batch)])
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True)  # (batch, n_heads, seq, head_dim)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(batch, seq, hidden))
        h = reference.rmsnorm(x, self.post_attention_norm, self.eps)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ParallelBlock(nn.Module):
    """The same block on one rank of a TP group: this rank's heads and intermediate features."""

    def __init__(self, ref: ReferenceBlock, tp: TPGroup):
        super().__init__()
        self.tp, self.eps, self.head_dim = tp, ref.eps, ref.head_dim
        self.input_norm = ref.input_norm.detach().clone()
        self.post_attention_norm = ref.post_attention_norm.detach().clone()
        self.qkv = layers.QKVParallelLinear.from_linears(ref.q_proj, ref.k_proj, ref.v_proj, tp, head_dim=ref.head_dim)
        self.o_proj = layers.RowParallelLinear.from_linear(ref.o_proj, tp)
        self.gate_up = layers.MergedColumnParallelLinear.from_linears([ref.gate_proj, ref.up_proj], tp)
        self.down_proj = layers.RowParallelLinear.from_linear(ref.down_proj, tp)
        self.cos_sin = ref.cos_sin

    @classmethod
    def from_reference(cls, ref: ReferenceBlock, tp: TPGroup) -> "ParallelBlock":
        return cls(ref, tp)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        tokens = x.reshape(batch * seq, hidden)  # (T, hidden)
        h = reference.rmsnorm(tokens, self.input_norm, self.eps)
        positions = torch.arange(seq).repeat(batch)  # (T,)
        q, k, v = ops.qkv_rope(h, self.qkv.weight, self.qkv.bias, self.cos_sin, positions,
                               n_heads_per_rank=self.qkv.n_heads_per_rank,
                               n_kv_heads_per_rank=self.qkv.n_kv_heads_per_rank, head_dim=self.head_dim)

        def heads_first(t):  # (T, n, head_dim) -> (batch, n, seq, head_dim)
            return t.view(batch, seq, t.shape[1], self.head_dim).transpose(1, 2)

        attn = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                              enable_gqa=True)
        attn = attn.transpose(1, 2).reshape(batch * seq, -1)  # (T, n_heads_per_rank * head_dim)
        # o_proj's partial product; its reduction is fused with the residual add and the next norm.
        partial = F.linear(attn, self.o_proj.weight)
        h, residual = ops.allreduce_residual_rmsnorm(partial, tokens, self.post_attention_norm, self.eps, self.tp)
        gate, up = self.gate_up.split(self.gate_up(h))
        out = residual + self.down_proj(F.silu(gate) * up)
        return out.view(batch, seq, hidden)
