"""Batched generation with a static KV cache: one prefill over the right-padded prompts, then one decode
step per new token, each sequence stopping at an end-of-sequence token.

The decode step is a module-level function of (model, tokens, positions, cache), so that
`generate(..., compile=True)` can hand it to torch.compile(fullgraph=True) as gpt-fast does: one graph over
the static cache with the custom ops inside (greedy: up to the next token; sampling: up to the logits, the
draw staying in eager mode with its torch.Generator)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from tp_kernels.models.sampling import check_sampling_args, sample


@dataclass
class GenerationStats:
    """Wall-clock times of one generate call on this rank. A decode step is one forward of one token per
    sequence; weight_bytes_per_rank is this rank's parameter memory, decode_bytes_per_rank what a decode
    step reads on this rank (GPT.decode_bytes_per_rank at the middle step's cache length)."""

    prefill_s: float
    decode_s: float
    n_prompt_tokens: int
    n_decode_steps: int
    batch: int
    weight_bytes_per_rank: int
    decode_bytes_per_rank: int = 0
    step_s: Tuple[float, ...] = ()  # each decode step's wall clock, in order
    compile_s: float = 0.0  # generate(compile=True): the first (compiling) call of the decode step, untimed above

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.n_prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.n_decode_steps * self.batch / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def decode_weight_gb_per_s(self) -> float:
        """Bytes a decode step reads per rank (weights and cache) divided by the step time (GB = 1e9 bytes)."""
        if self.n_decode_steps == 0 or self.decode_s <= 0:
            return float("nan")
        return self.decode_bytes_per_rank * self.n_decode_steps / self.decode_s / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_greedy(model, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """One decode step, greedy: tokens and positions (B, 1) -> the next tokens (B,), the same on every rank
    (the vocabulary-parallel argmax: no logits gathered)."""
    return model.greedy_tokens(model.hidden_states(tokens, positions, cache)[:, 0])


def decode_logits(model, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """One decode step: tokens and positions (B, 1) -> full-vocabulary logits (B, vocab), on every rank."""
    return model(tokens, positions, cache)[:, 0]


_COMPILED: Dict[Callable, Callable] = {}


def compiled_step(step: Callable) -> Callable:
    """step compiled once per process: torch.compile(fullgraph=True) with static shapes (a new batch size
    or cache length compiles again). On a GPU, generate then captures it as a CUDA graph (cuda_graph.py)."""
    if step not in _COMPILED:
        _COMPILED[step] = torch.compile(step, fullgraph=True, dynamic=False)
    return _COMPILED[step]


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
             eos_token_ids: Optional[Sequence[int]] = None, pad_token_id: int = 0, compile: bool = False):
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens.

    Prompts may differ in length: they are right-padded with pad_token_id (any valid id; pad tokens are
    never attended to) and each keeps its true positions. A sequence stops after emitting a token in
    eos_token_ids (default: the model config's), which is included in its output; generation ends when
    every sequence has stopped. Sampling uses a torch.Generator seeded with seed on the model's device, so
    every rank of a TP group draws the same tokens.

    Returns (new tokens per prompt as lists of ints, GenerationStats).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling_args(temperature, top_k, top_p)
    eos = tuple(model.args.eos_token_ids if eos_token_ids is None else eos_token_ids)
    device = model.device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    prompt_len = int(lengths.max())
    max_seq = prompt_len + max_new_tokens
    if max_seq > model.args.max_seq_len:
        raise ValueError(f"longest prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {max_seq} exceeds "
                         f"the model's max_seq_len ({model.args.max_seq_len})")
    input_ids = torch.full((batch, prompt_len), pad_token_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        input_ids[b, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.new_cache(batch, max_seq)
    greedy = temperature == 0
    step_fn = decode_greedy if greedy else decode_logits
    compile_s = 0.0
    if compile:
        step_fn = compiled_step(step_fn)
        # Compile now, outside the timed steps, with a step at position 0 of every row: the prefill below
        # writes positions 0..prompt_len-1 of every row, so what this step wrote is overwritten.
        t_compile = time.perf_counter()
        step_fn(model, input_ids[:, :1], torch.zeros(batch, 1, dtype=torch.long, device=device), cache)
        if device.type == "cuda":
            from tp_kernels.models.cuda_graph import CapturedDecodeStep

            step_fn = CapturedDecodeStep(step_fn, model, cache)
        _sync(device)
        compile_s = time.perf_counter() - t_compile

    def next_tokens(step_out: torch.Tensor) -> torch.Tensor:
        return step_out if greedy else sample(step_out, temperature, top_k, top_p, generator)

    _sync(device)
    t0 = time.perf_counter()
    h = model.hidden_states(input_ids, cache=cache, logits_at=lengths - 1)  # (B, dim)
    token = next_tokens(model.greedy_tokens(h) if greedy else model.lm_head(h))  # (B,)
    _sync(device)
    t1 = time.perf_counter()

    outputs: List[List[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    n_decode_steps = 0
    step_s = []
    for step in range(max_new_tokens):
        for b, t in enumerate(token.tolist()):
            if not finished[b]:
                outputs[b].append(t)
                finished[b] = t in eos
        if all(finished) or step == max_new_tokens - 1:
            break
        # (B, 1): where each sequence's newest token goes. A finished sequence keeps decoding (its tokens
        # are dropped) so the batch keeps its shape.
        positions = (lengths + step)[:, None]
        t_step = time.perf_counter()
        token = next_tokens(step_fn(model, token[:, None], positions, cache))
        step_s.append(time.perf_counter() - t_step)  # CPU: the step is done; GPU: launched (tolist() syncs)
        n_decode_steps += 1
    _sync(device)
    t2 = time.perf_counter()
    stats = GenerationStats(prefill_s=t1 - t0, decode_s=t2 - t1, n_prompt_tokens=int(lengths.sum()),
                            n_decode_steps=n_decode_steps, batch=batch,
                            weight_bytes_per_rank=model.weight_bytes_per_rank(),
                            decode_bytes_per_rank=model.decode_bytes_per_rank(prompt_len + n_decode_steps // 2, batch),
                            step_s=tuple(step_s), compile_s=compile_s)
    return outputs, stats
