"""A decode step captured as one CUDA graph, replayed for every new token (generate(compile=True) on a GPU).

Batch-1 decode launches a few hundred small kernels per step; replaying them as a graph removes the CPU
launch cost between them, as gpt-fast's mode="reduce-overhead" does. The capture is explicit so that the
CUDA IPC all-reduce can run in its registered-buffer mode: inside `comm.capture()` its captured kernels
read their inputs in place, and the inputs' addresses are exchanged between ranks when the capture ends
(tp_kernels.comm.cuda_ipc). The graph is bound to one KV cache and one batch size: a new generate call
captures again (milliseconds; the compiled step it captures is compiled once).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

WARMUP_STEPS = 2  # side-stream runs before capture: lazy initialization must not happen inside it


class CapturedDecodeStep:
    """step(model, tokens (B, 1), positions (B, 1), cache) captured once over cache; calling it copies the
    inputs into the graph's static ones, replays, and returns the graph's output tensor (overwritten by the
    next call: read it first)."""

    def __init__(self, step: Callable, model, cache):
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graph capture needs a model on a CUDA device, got {model.device}")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(cache.batch, 1, dtype=torch.long, device=model.device)
        # The warm-up steps write position 0 of every cache row; the prefill that follows overwrites it.
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step(model, self.tokens, self.positions, cache)
        torch.cuda.current_stream(model.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with contextlib.ExitStack() as stack:
            for comm in model.tp.communicators:
                if hasattr(comm, "capture"):  # the CUDA IPC all-reduce: registered-buffer mode
                    stack.enter_context(comm.capture())
            with torch.cuda.graph(self.graph):
                self.out = step(model, self.tokens, self.positions, cache)

    def __call__(self, model, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        if model is not self.model or cache is not self.cache:
            raise ValueError("a captured decode step replays only for the model and cache it was captured with")
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.out
