"""What a user would run instead of tp_kernels, on the same checkpoint (bench/decode_e2e.py's peer rows):
Hugging Face transformers eager at TP=1, and transformers' own tensor parallelism at TP=2
(`DistributedConfig(tp_plan="auto")`, gloo on CPU ranks, which needs the accelerate package).

Each runs `model.generate(do_sample=False)` as a user would, with a streamer that timestamps every token it
receives, so the decode steps are timed one by one (prefill excluded) and the greedy tokens are returned for
the caller to compare with ours.
"""
from __future__ import annotations

import time
from typing import List, Optional

import torch

import decode_roofline


def missing_packages(tensor_parallel: bool) -> Optional[str]:
    """Why a peer cannot run here (a package it needs does not import), or None."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return f"transformers does not import ({e})"
    if tensor_parallel:
        try:
            import accelerate  # noqa: F401
        except ImportError as e:
            return f"transformers' tensor parallelism needs accelerate, which does not import ({e})"
    return None


class _StepClock:
    """A generate() streamer: the time each token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: List[float] = []
        self.tokens: List[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > 1:
            self.tokens.append(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def _generate(model, prompt: List[int], new_tokens: int):
    """(greedy tokens, seconds of each decode step) of one generate call."""
    clock = _StepClock()
    ids = torch.tensor([prompt])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, streamer=clock, pad_token_id=0)
    # times[1] is the first new token (the prefill's); each later one is a decode step
    return clock.tokens, [b - a for a, b in zip(clock.times[1:], clock.times[2:])]


def rank_hf(tp, checkpoint: str, prompt: List[int], new_tokens: int, rounds: int, tensor_parallel: bool) -> dict:
    """On each rank (run_on_cpu_ranks): load the checkpoint with transformers, one untimed generate, then
    `rounds` timed ones. Returns the greedy tokens and every decode step's seconds."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if tensor_parallel:
        from transformers import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")  # over the ranks' gloo world group
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kwargs).eval()
    _generate(model, prompt, 2)  # warm-up
    probes = decode_roofline.RoundProbes(tp)  # as bench/decode_e2e.py's rows take them
    tokens, step_s = None, []
    for _ in range(rounds):
        probes.take()
        tokens, steps = _generate(model, prompt, new_tokens)
        step_s += steps
    probes.take()
    return {"tokens": tokens, "step_s": step_s, "threads": torch.get_num_threads(), "probe_gbps": probes.release()}
