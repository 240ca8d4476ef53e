"""End-to-end decode on CPU ranks, measured: tokens/s and per-token latency of the GPT decoder
(tp_kernels.models) at TP=1 and TP=2, with the all-reduce backend forced to the shared-memory fast path
("shm") and to plain torch.distributed ("torch", gloo on CPU) in the same run, and the share of each
decode step spent in communication.

    python bench/decode_e2e.py                          # TP 1 and 2, backends shm and torch
    python bench/decode_e2e.py --world-sizes 2 --backends torch --steps 64 --rounds 5

How: each TP degree runs in fresh processes (tp_kernels.models.launch.run_on_cpu_ranks: one gloo group),
one thread per rank. Every rank builds the same seeded random-weight model, then for each
round and each backend, in turn (interleaved, so a load change on the machine hits both alike): the
group's all-reduce chain is set to that backend alone (identity -> backend; a tensor it cannot reduce
raises instead of silently going to another one), a prompt is prefilled and `--steps` decode steps of one
token per sequence (greedy) are timed one by one. A backend that is not in the group's chain (e.g. "shm"
before the shared-memory communicator is built in) gives a row marked missing, with the reason.

Communication time is measured inside the step: every communicator of the chain, and the group's
all_gather (the vocab-parallel logits), is wrapped by a timer. It includes a rank's wait for its peer,
and, where a backend fuses the residual add + RMSNorm into the reduction (shm), that epilogue.

Rows (rank 0's times; ranks are in lock step through the collectives):
  "tp{N} {backend}"       per-token latency: median and p20/p80 over the decode steps; notes: tokens/s
                          (batch / median step time); gbps: this rank's weight bytes per step / median step
  "tp{N} {backend} comm"  communication time per step (median, p20/p80); ratio = its share of the step
                          (sum of comm times / sum of step times), baseline = the step row
The step rows at TP=2 with backend shm have baseline "tp2 torch" and ratio = torch median / shm median.
Writes bench/results/decode_e2e.{csv,json}, decode_e2e.png (tokens/s), decode_e2e_comm.png and
decode_e2e.md (the README table).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from common import RESULTS_DIR, Row, plot_lines, timing_from_samples, write_rows

BENCH = "decode_e2e"
BACKENDS = ("shm", "torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# A Llama-shaped model that decodes in ~10 ms per token on one core: 28 M parameters, 112 MB in fp32, so
# a step streams its weights from DRAM (this host's L3 is 8 MiB) like a GPU step streams HBM, and at
# TP=2 the 17 all-reduces + 1 all-gather of a step (2 per layer, the embedding, the logits) are a visible
# part of it: gloo's ~320 us per small all-reduce (DESIGN.md) would be ~5 ms.
MODEL = dict(family="llama", vocab_size=4096, dim=512, n_layers=8, n_heads=8, n_kv_heads=4,
             intermediate_size=1408, max_seq_len=1024, norm_eps=1e-5)
WEIGHT_SEED = 1234
RANK_TIMEOUT_S = 300.0


# ----------------------------------------------------------------------------------------------------------
# communication timing
# ----------------------------------------------------------------------------------------------------------
class CommTimer:
    """Accumulates the wall-clock seconds spent inside the wrapped collectives."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def call(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def timed_communicator(inner, timer: CommTimer):
    """A Communicator that forwards to inner and times its collectives."""
    from tp_kernels.distributed import Communicator

    class TimedCommunicator(Communicator):
        name = inner.name

        def applies(self, x):
            return inner.applies(x)

        def all_reduce(self, x):
            return timer.call(inner.all_reduce, x)

        def allreduce_residual_rmsnorm(self, x, residual, weight, eps):
            # only called by the ops when the chain's communicators have it (the fused shm path)
            return timer.call(inner.allreduce_residual_rmsnorm, x, residual, weight, eps)

        def close(self):
            inner.close()

    return TimedCommunicator()


def chain_for(communicators: list, backend: str, world_size: int):
    """The chain that forces backend: identity (a no-op above one rank), then backend alone. Returns
    (chain, None), or (None, reason) when the group has no such backend."""
    names = [c.name for c in communicators]
    if world_size == 1:
        return [c for c in communicators if c.name == "identity"], None
    if backend not in names:
        return None, f"backend {backend!r} is not in this group's all-reduce chain {names}"
    return [c for c in communicators if c.name in ("identity", backend)], None


# ----------------------------------------------------------------------------------------------------------
# ranks
# ----------------------------------------------------------------------------------------------------------
@dataclass
class BackendResult:
    step_s: List[float] = field(default_factory=list)
    comm_s: List[float] = field(default_factory=list)
    missing: Optional[str] = None


def _decode_round(model, timer: CommTimer, prompt: torch.Tensor, steps: int, result: Optional[BackendResult]):
    """Prefill prompt (batch, prompt_len), then `steps` greedy decode steps, each timed (when result is
    given) with its communication time."""
    batch, prompt_len = prompt.shape
    cache = model.new_cache(batch, prompt_len + steps)
    last = torch.full((batch,), prompt_len - 1)
    token = model(prompt, cache=cache, logits_at=last).argmax(-1)  # (batch,)
    at_first = torch.zeros(batch, dtype=torch.long)
    for step in range(steps):
        positions = torch.full((batch, 1), prompt_len + step)
        comm_before = timer.seconds
        t0 = time.perf_counter()
        logits = model(token[:, None], positions, cache, logits_at=at_first)  # (batch, vocab)
        token = logits.argmax(-1)
        elapsed = time.perf_counter() - t0
        if result is not None:
            result.step_s.append(elapsed)
            result.comm_s.append(timer.seconds - comm_before)


def rank_decode(tp, model_kw: dict, dtype_name: str, backends: List[str], rounds: int, steps: int, batch: int,
                prompt_len: int) -> dict:
    """On every rank: the decode timings per backend (see the module docstring)."""
    from tp_kernels.models import GPT, ModelArgs

    # One core per rank, as one GPU per rank: TP=1 on one thread, TP=2 on two processes of one thread.
    # (Two threads for TP=1 ran 3x slower per step than one, 108 vs 35 ms, on this loaded 2-core host.)
    torch.set_num_threads(1)
    model = GPT.from_preset(ModelArgs(**model_kw), tp, dtype=DTYPES[dtype_name], seed=WEIGHT_SEED)
    prompt = torch.randint(0, model_kw["vocab_size"], (batch, prompt_len),
                           generator=torch.Generator().manual_seed(WEIGHT_SEED))
    original = list(tp.communicators)
    original_all_gather = tp.all_gather
    timer = CommTimer()
    tp.all_gather = lambda x, dim: timer.call(original_all_gather, x, dim)  # the logits gather
    results: Dict[str, BackendResult] = {}
    chains = {}
    for backend in backends:
        chain, reason = chain_for(original, backend, tp.world_size)
        results[backend] = BackendResult(missing=reason)
        if chain is not None:
            chains[backend] = [timed_communicator(c, timer) for c in chain]
    try:
        with torch.no_grad():
            for backend, chain in chains.items():  # warm-up: the first op call imports torch._dynamo
                tp.communicators = chain
                _decode_round(model, timer, prompt, 2, None)
            for _ in range(rounds):
                for backend, chain in chains.items():
                    tp.communicators = chain
                    _decode_round(model, timer, prompt, steps, results[backend])
    finally:
        tp.communicators = original
        del tp.all_gather  # back to the class's method
    return {"results": results, "weight_bytes_per_rank": model.weight_bytes_per_rank(),
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------------------
def rows_for(world_size: int, out: dict, args: argparse.Namespace, backends: List[str]) -> List[Row]:
    rows: List[Row] = []
    step_rows: Dict[str, Row] = {}
    shape = f"batch={args.batch},prompt={args.prompt_len},steps={args.steps}x{args.rounds}"
    model = ",".join(f"{k}={MODEL[k]}" for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size",
                                                 "vocab_size"))
    for backend in backends:
        result: BackendResult = out["results"][backend]
        label = backend if world_size > 1 else "none"
        case = f"tp{world_size} {label}"
        config = f"backend={label},threads_per_rank={out['threads']},{model}"
        common = dict(config=config, dtype=args.dtype, shape=shape, world_size=world_size)
        if result.missing is not None:
            print(f"MISSING row {case!r}: {result.missing}", file=sys.stderr)
            rows.append(Row(bench=BENCH, case=case, median_us=math.nan, p20_us=math.nan, p80_us=math.nan,
                            notes=f"missing: {result.missing}", **common))
            continue
        step = timing_from_samples(result.step_s)
        comm = timing_from_samples(result.comm_s)
        tokens_per_s = args.batch / step.median_s  # the median: robust to the load of other jobs
        comm_share = sum(result.comm_s) / sum(result.step_s)
        row = Row.from_timing(BENCH, case, step, gbps=out["weight_bytes_per_rank"] / step.median_s / 1e9,
                              notes=f"tokens/s {tokens_per_s:.1f}; communication {100 * comm_share:.1f}% of the step; "
                                    "CPU wall clock (rank 0)", **common)
        step_rows[label] = row
        rows.append(row)
        rows.append(Row.from_timing(BENCH, f"{case} comm", comm, baseline=case, ratio=comm_share,
                                    notes="communication time per step; ratio = share of the step", **common))
    if "shm" in step_rows and "torch" in step_rows:
        shm, gloo = step_rows["shm"], step_rows["torch"]
        shm.baseline, shm.ratio = gloo.case, gloo.median_us / shm.median_us
    return rows


def tokens_per_s_of(row: Row) -> float:
    return float(row.notes.split("tokens/s ")[1].split(";")[0])


def tokens_table(rows: List[Row]) -> str:
    """Markdown for the README: per TP degree and backend, tokens/s, per-token latency, communication."""
    comm_rows = {r.baseline: r for r in rows if r.case.endswith(" comm")}
    lines = ["| TP | all-reduce | tokens/s | per-token latency, ms: median (p20-p80) | communication per step, ms "
             "| communication share | speedup vs torch |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.case.endswith(" comm"):
            continue
        backend = row.config.split(",")[0].split("=")[1]
        if math.isnan(row.median_us):
            lines.append(f"| {row.world_size} | {backend} | {row.notes} | | | | |")
            continue
        comm = comm_rows[row.case]
        speedup = "" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(f"| {row.world_size} | {backend} | {tokens_per_s_of(row):.1f} | {row.median_us / 1e3:.1f} "
                     f"({row.p20_us / 1e3:.1f}-{row.p80_us / 1e3:.1f}) | {comm.median_us / 1e3:.2f} | "
                     f"{100 * comm.ratio:.0f}% | {speedup} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="1,2", help="comma separated TP degrees (default 1,2)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma separated all-reduce backends to force, of {BACKENDS} (default both)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per backend (default 3)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per round (default 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16)
    args = parser.parse_args()
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        parser.error(f"--backends must be a comma separated subset of {BACKENDS}, got {args.backends!r}")
    if any(w < 1 for w in world_sizes) or min(args.rounds, args.steps, args.batch, args.prompt_len) < 1:
        parser.error("world sizes, --rounds, --steps, --batch and --prompt-len must be >= 1")
    if args.prompt_len + args.steps > MODEL["max_seq_len"]:
        parser.error(f"--prompt-len + --steps must be <= {MODEL['max_seq_len']}")

    from tqdm import tqdm

    from tp_kernels.models.launch import run_on_cpu_ranks

    rows: List[Row] = []
    for world_size in tqdm(world_sizes, desc="decode_e2e TP degrees"):
        run_backends = backends if world_size > 1 else backends[:1]  # one rank: identity, whatever the backend
        per_rank = run_on_cpu_ranks(world_size, rank_decode, MODEL, args.dtype, run_backends, args.rounds,
                                    args.steps, args.batch, args.prompt_len, timeout_s=RANK_TIMEOUT_S)
        rows += rows_for(world_size, per_rank[0], args, run_backends)
    print(f"wrote {write_rows(BENCH, rows)}")

    measured = [r for r in rows if not math.isnan(r.median_us)]
    tokens, comm = {}, {}
    for row in measured:
        backend = row.config.split(",")[0].split("=")[1]
        for label in ((backend,) if backend != "none" else backends):  # TP=1 starts every backend's line
            if row.case.endswith(" comm"):
                comm.setdefault(label, ([], []))
                comm[label][0].append(row.world_size)
                comm[label][1].append(row.median_us)
            else:
                tokens.setdefault(label, ([], []))
                tokens[label][0].append(row.world_size)
                tokens[label][1].append(tokens_per_s_of(row))
    if tokens:
        print("wrote " + plot_lines(os.path.join(RESULTS_DIR, f"{BENCH}.png"),
                                    "GPT decode on CPU ranks (measured): tokens/s", "TP degree", "tokens/s",
                                    {f"all-reduce: {k}": v for k, v in tokens.items()}, logy=False))
        print("wrote " + plot_lines(os.path.join(RESULTS_DIR, f"{BENCH}_comm.png"),
                                    "GPT decode on CPU ranks (measured): communication per step", "TP degree",
                                    "us per step", {f"all-reduce: {k}": v for k, v in comm.items()}, logy=False))
    table = tokens_table(rows)
    with open(os.path.join(RESULTS_DIR, f"{BENCH}.md"), "w") as f:
        f.write(f"Measured on CPU ranks ({rows[0].env['device']}), one thread per rank, {args.dtype}, "
                f"{rows[0].shape}; rank 0's wall clock.\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
