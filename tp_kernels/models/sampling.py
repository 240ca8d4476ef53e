"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Under tensor parallelism every rank holds the same logits (the LM head gathers them), so every rank
draws with a generator seeded alike and picks the same token without communicating.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,), int64.

    temperature 0 is greedy (argmax). Otherwise, as Hugging Face orders them: divide by temperature, keep
    the top_k largest logits, keep the smallest set of tokens whose probability sums to at least top_p
    (always at least the most likely one), then draw from the renormalized distribution with generator.
    """
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def greedy_vocab_parallel(local_logits: torch.Tensor, vocab_start: int, n_real: int, tp) -> torch.Tensor:
    """argmax over the full vocabulary of logits split by vocabulary across the ranks of tp, without
    gathering them: local_logits (B, vocab_size_per_rank) is this rank's slice, whose first n_real columns
    are the token ids vocab_start.. (the rest is padding). Returns the same (B,) int64 on every rank.

    Plain PyTorch equivalent: ``torch.cat(all ranks' local_logits[:, :n_real], dim=-1).argmax(-1)``.
    Each rank puts its slice's (max, token id) in its own column of a zeroed (B, world_size, 2) tensor and
    one all-reduce sums them (x + 0 is exact); the first rank holding the largest value wins, which is
    argmax's first-occurrence rule since ranks hold increasing ids. The values are compared in float32
    (exact for fp32/fp16/bf16 logits; ids are exact below 2^24), in float64 for float64 logits.
    """
    if local_logits.dim() != 2:
        raise ValueError(f"local_logits must be (batch, vocab_size_per_rank), got shape {tuple(local_logits.shape)}")
    # With several ranks, a vocabulary smaller than its padded split leaves the last ranks only padding rows
    # (n_real 0): they take part in the all-reduce with no candidate.
    lowest = 0 if tp.world_size > 1 else 1
    if not lowest <= n_real <= local_logits.shape[-1]:
        raise ValueError(f"n_real must be in [{lowest}, {local_logits.shape[-1]}], got {n_real}")
    if n_real == 0:
        best = torch.full(local_logits.shape[:1], float("-inf"), dtype=local_logits.dtype, device=local_logits.device)
        index = torch.zeros(local_logits.shape[:1], dtype=torch.int64, device=local_logits.device)
    else:
        best, index = local_logits[:, :n_real].max(dim=-1)  # (B,) each: this slice's max, its first position
    if tp.world_size == 1:
        return index
    from tp_kernels import ops

    dtype = torch.float64 if local_logits.dtype == torch.float64 else torch.float32
    if vocab_start + n_real > (1 << 53 if dtype == torch.float64 else 1 << 24):
        raise ValueError(f"token ids up to {vocab_start + n_real} are not exact in {dtype}")
    table = torch.zeros(local_logits.shape[0], tp.world_size, 2, dtype=dtype, device=local_logits.device)
    table[:, tp.rank, 0] = best.to(dtype)
    table[:, tp.rank, 1] = (index + vocab_start).to(dtype)
    table = ops.all_reduce(table, tp)  # (B, world_size, 2): every rank's (max, id)
    winner = table[..., 0].argmax(dim=-1, keepdim=True)  # (B, 1): the first rank with the largest max
    return table[..., 1].gather(-1, winner).squeeze(-1).to(torch.int64)
