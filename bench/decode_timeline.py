"""Where a decode step's time goes, measured on every rank (bench/decode_e2e.py's breakdown columns).

Inside `with StepTimeline() as timeline:` the functions the decoder calls are wrapped by wall-clock
timers (time.perf_counter: CLOCK_MONOTONIC, one clock for every process of the host):

    gemm         torch.nn.functional.linear (o_proj, gate_up, down, the LM head's vocabulary slice)
    qkv_rope     tp_kernels.ops.qkv_rope_kv_cache (the QKV GEMM, RoPE and the cache write, one op)
    attention    torch.nn.functional.scaled_dot_product_attention
    collective   tp_kernels.ops.all_reduce / allreduce_residual_rmsnorm / all_gather (with the residual
                 add + RMSNorm that the reduction carries)
    sampling     GPT.greedy_tokens, less the GEMM and the all-reduce it calls

Only calls inside a decode step count (the step functions of tp_kernels.models.generation are wrapped
too, which also gives each step's total in step_s). Each category's time is exclusive (a timed call inside another is subtracted from the outer one). The
collectives' enter and exit times are kept, so that `split_waits` can tell, for each call, the time a rank
waited for the last rank to arrive from the time the collective itself took once all were there. The
wrappers cost ~1 us per call (~70 calls per step at 8 layers), which is why the step rows of the benchmark
are timed in rounds without them.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn.functional as F

CATEGORIES = ("gemm", "qkv_rope", "attention", "collective", "sampling")


class StepTimeline:
    """Per-step exclusive seconds by category, and the (enter, exit) times of every collective."""

    def __init__(self):
        self.steps: List[Dict[str, float]] = []
        self.collectives: List[List[Tuple[float, float]]] = []
        self.step_s: List[float] = []
        self._in_step = False
        self._nested: List[float] = []  # per open timed call: seconds spent in timed calls inside it
        self._patched: List[Tuple[object, str, Callable]] = []

    def _wrap_step(self, step: Callable) -> Callable:
        def timed_step(*args, **kwargs):
            self.steps.append(defaultdict(float))
            self.collectives.append([])
            self._in_step = True
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.step_s.append(time.perf_counter() - t0)
                self._in_step = False

        return timed_step

    def _wrap(self, category: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if not self._in_step:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            self._nested.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                nested = self._nested.pop()
                if self._nested:
                    self._nested[-1] += t1 - t0
                self.steps[-1][category] += t1 - t0 - nested
                if category == "collective":
                    self.collectives[-1].append((t0, t1))

        return timed

    def _patch(self, owner, name: str, category: Optional[str]) -> None:
        original = getattr(owner, name)
        self._patched.append((owner, name, original))
        setattr(owner, name, self._wrap_step(original) if category is None else self._wrap(category, original))

    def __enter__(self) -> "StepTimeline":
        from tp_kernels import ops
        from tp_kernels.models import generation
        from tp_kernels.models.gpt import GPT

        self._patch(generation, "decode_greedy", None)
        self._patch(generation, "decode_logits", None)

        self._patch(F, "linear", "gemm")
        self._patch(F, "scaled_dot_product_attention", "attention")
        self._patch(ops, "qkv_rope_kv_cache", "qkv_rope")
        for name in ("all_reduce", "allreduce_residual_rmsnorm", "all_gather"):
            self._patch(ops, name, "collective")
        self._patch(GPT, "greedy_tokens", "sampling")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()


def split_waits(per_rank: Sequence[List[List[Tuple[float, float]]]]) -> List[List[Tuple[float, float]]]:
    """For each rank and step: (seconds waiting for the last rank to arrive, seconds of the collectives
    themselves) summed over the step's collectives. per_rank[r][step] is rank r's list of (enter, exit);
    every rank must have made the same calls. Call i's last arrival is max over ranks of enter; a rank waits
    from its own enter until then and the collective's own time runs from then to its exit."""
    n_steps = len(per_rank[0])
    out: List[List[Tuple[float, float]]] = [[] for _ in per_rank]
    for step in range(n_steps):
        calls = [rank_steps[step] for rank_steps in per_rank]
        if len({len(c) for c in calls}) != 1:
            raise ValueError(f"step {step}: ranks made different numbers of collective calls "
                             f"{[len(c) for c in calls]}")
        for rank, rank_calls in enumerate(calls):
            wait = own = 0.0
            for i, (enter, exit_) in enumerate(rank_calls):
                last_arrival = max(c[i][0] for c in calls)
                wait += max(0.0, last_arrival - enter)
                own += exit_ - max(enter, last_arrival)
            out[rank].append((wait, own))
    return out
