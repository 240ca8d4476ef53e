"""End-to-end decode on CPU ranks, measured against the machine's roofline and against the tools a user
would pick instead: tokens/s of the GPT decoder (tp_kernels.models) at TP=1 and TP=2, the fraction of the
memory-bandwidth ceiling each reaches, where each step's time goes, and Hugging Face transformers on the
same checkpoint.

    python bench/decode_e2e.py                          # everything (~5 min on 2 quiet cores)
    python bench/decode_e2e.py --no-compile --no-peers  # our eager rows only (~1.5 min)

The model: the `llama-156m` preset (hidden 1024, 8 layers, 16 heads, 4 KV heads, FFN 2816, vocab 32000,
156 M parameters, fp32) with seeded random weights, written once as a Hugging Face checkpoint that every
row loads. Batch 1, a 16-token prompt, 48 greedy new tokens per generate call, `--rounds` calls per row.

Rows, each in fresh processes (tp_kernels.models.launch.run_on_cpu_ranks):
  roofline       GB/s of a matrix-vector product over 256 MiB of fp32 (bench/decode_roofline.py): one
                 process on 1 and on 2 threads, and two one-thread processes at once, at the start (the
                 header); each row below also probes it in its own processes between its rounds
  tp1 eager      ours, one process, 2 threads, tp_kernels.models.generate
  tp1 compiled   the same with generate(compile=True) (torch.compile(fullgraph=True) of the decode step)
  tp2 shm eager  ours, 2 ranks of one thread, collectives forced to the shared-memory backend
  tp2 torch eager                                           ... forced to torch.distributed (gloo)
  tp2 shm compiled
  hf eager tp1   transformers' generate, 2 threads (bench/decode_peers.py)
  hf tp_plan tp2 transformers with DistributedConfig(tp_plan="auto"), 2 ranks of one thread, gloo
At TP=2 the variants of a rank alternate round by round (interleaved), so a load change on the host
hits them alike. Every row's greedy tokens are compared with "tp1 eager"'s.

Per row: per-token latency (median, p20/p80 over every decode step), tokens/s = 1 / median, the roofline
in tokens/s = (GB/s a rank streams while every rank of the row streams at once, on its own threads: the
median of probes taken in the row's processes before each timed round and after the last, since the shared
host's bandwidth moves within minutes) / (bytes a step reads per rank, GPT.decode_bytes_per_rank: the
weights less the embedding rows not looked up, plus the KV cache) and the fraction of it reached; the calls each all-reduce backend received per
token; and for our eager rows, from one extra round with timers on (bench/decode_timeline.py): GEMMs,
qkv_rope (its GEMM + RoPE + cache write), attention, the collectives' own time and the time a rank waited
in them for the other, sampling, and the rest (Python, dispatch, small ops) = the step less all those.
Writes bench/results/decode_e2e.{csv,json,md} and decode_e2e.png.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

import decode_peers
import decode_roofline
from common import RESULTS_DIR, Row, plot_lines, timing_from_samples, write_rows
from decode_timeline import CATEGORIES, StepTimeline, split_waits

BENCH = "decode_e2e"
PRESET = "llama-156m"
WEIGHT_SEED = 1234
RANK_TIMEOUT_S = 900.0
TARGETS = (  # (name, what it divides, the target), from issue 15
    ("TP=2 / two-process roofline", 0.85),
    ("TP=2 / our TP=1", 1.5),
    ("TP=2 / transformers tp_plan TP=2", 2.5),
    ("TP=2 / transformers eager TP=1", 1.6),
)


@dataclass(frozen=True)
class Variant:
    """One of our rows: the all-reduce backend forced (None at TP=1) and whether the step is compiled."""

    backend: Optional[str]
    compile: bool

    def case(self, world_size: int) -> str:
        mode = "compiled" if self.compile else "eager"
        return f"tp{world_size} {mode}" if self.backend is None else f"tp{world_size} {self.backend} {mode}"


# ----------------------------------------------------------------------------------------------------------
# the checkpoint
# ----------------------------------------------------------------------------------------------------------
def write_checkpoint(path: str, preset: str) -> str:
    """The preset's seeded random weights as a Hugging Face Llama directory (config.json, model.safetensors)."""
    from safetensors.torch import save_file

    from tp_kernels.models import PRESETS
    from tp_kernels.models.loading import random_checkpoint

    args = PRESETS[preset]
    if args.family != "llama" or args.tie_word_embeddings:
        raise ValueError(f"--preset must be an untied llama-family preset, got {preset!r}")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab_size,
              "hidden_size": args.dim, "intermediate_size": args.intermediate_size,
              "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
              "num_key_value_heads": args.n_kv_heads, "max_position_embeddings": args.max_seq_len,
              "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "tie_word_embeddings": False,
              "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": None}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(random_checkpoint(args, WEIGHT_SEED), os.path.join(path, "model.safetensors"))
    return path


# ----------------------------------------------------------------------------------------------------------
# our rows, on each rank
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def counting_backend_calls(tp):
    """Counts of the calls each backend received inside the block: "torch" = torch.distributed collectives
    (patched at the module, where TorchCommunicator looks them up), "shm" = steps of the shared-memory
    communicator (its own sequence number, which its C++ op path advances too)."""
    import torch.distributed as dist

    counts = {"torch": 0, "shm": 0}
    names = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_tensor",
             "broadcast")
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def counted(fn):
        def call(*args, **kwargs):
            counts["torch"] += 1
            return fn(*args, **kwargs)
        return call

    shm = [c for c in tp.communicators if c.name == "shm"]
    shm_before = sum(c.sequence for c in shm)
    for name, fn in originals.items():
        setattr(dist, name, counted(fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        counts["shm"] = sum(c.sequence for c in shm) - shm_before


def rank_ours(tp, checkpoint: str, prompt: List[int], new_tokens: int, rounds: int, variants: List[Variant]) -> dict:
    """On every rank: per variant, the decode steps' seconds, tokens, backend calls per token, compile time,
    and for eager variants the breakdown of one timed-on round."""
    from tp_kernels.models import GPT, generate

    model = GPT.from_pretrained(checkpoint, tp, progress=False)
    out = {v: {"step_s": [], "tokens": None, "calls_per_token": None, "compile_s": 0.0} for v in variants}
    probes = decode_roofline.RoundProbes(tp)

    def run(variant: Variant):
        # backend None (TP=1): the group's own choice
        forced = tp.use_backend(variant.backend) if variant.backend else contextlib.nullcontext()
        with forced, counting_backend_calls(tp) as calls:
            tokens, stats = generate(model, [prompt], new_tokens, eos_token_ids=(), compile=variant.compile)
        per_token = {k: v / (stats.n_decode_steps + 1) for k, v in calls.items()}  # the prefill makes as many
        return tokens[0], stats, per_token

    with torch.no_grad():
        for variant in variants:  # warm-up; a compiled variant compiles here
            out[variant]["compile_s"] = run(variant)[1].compile_s
        for _ in range(rounds):
            probes.take()
            for variant in variants:
                tokens, stats, per_token = run(variant)
                out[variant]["step_s"] += stats.step_s
                out[variant]["tokens"], out[variant]["calls_per_token"] = tokens, per_token
        probes.take()
        for variant in variants:
            if variant.compile:
                continue
            with StepTimeline() as timeline:
                run(variant)
            out[variant]["timeline"] = (timeline.steps, timeline.collectives, timeline.step_s)
    kv_len = len(prompt) + new_tokens // 2
    return {"variants": out, "decode_bytes_per_rank": model.decode_bytes_per_rank(kv_len),
            "threads": torch.get_num_threads(), "probe_gbps": probes.release()}


# ----------------------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------------------
def breakdown(per_rank: List[dict], variant: Variant) -> Dict[str, float]:
    """Rank 0's mean ms per step by category, with the collectives split into own time and waiting (and
    rank 1's waiting at TP=2); rest = the timed-on round's mean step less the parts."""
    timelines = [r["variants"][variant]["timeline"] for r in per_rank]
    steps, collectives, step_s = timelines[0]
    waits = split_waits([t[1] for t in timelines])
    n = len(steps)
    parts = {c: 1e3 * sum(s.get(c, 0.0) for s in steps) / n for c in CATEGORIES if c != "collective"}
    parts["collective own"] = 1e3 * sum(w[1] for w in waits[0]) / n
    parts["collective wait"] = 1e3 * sum(w[0] for w in waits[0]) / n
    parts["rest"] = 1e3 * statistics.mean(step_s) - sum(parts.values())
    if len(waits) > 1:
        parts["rank 1 wait"] = 1e3 * sum(w[0] for w in waits[1]) / n
    return parts


def row_ceiling(per_rank: List[dict], decode_bytes: int) -> tuple:
    """The row's ceiling in tokens/s (the median of its probes' GB/s per rank over the bytes a step reads per
    rank) and a note with the probes' spread."""
    median, lo, hi = decode_roofline.gbps_per_rank([r["probe_gbps"] for r in per_rank])
    note = f"probes GB/s per rank: {lo:.1f}-{hi:.1f}, median {median:.1f} of {len(per_rank[0]['probe_gbps'])}"
    return median * 1e9 / decode_bytes, note


def step_row(case: str, world_size: int, step_s: List[float], threads: int, decode_bytes: int, ceiling: float,
             notes: List[str], config: str) -> Row:
    timing = timing_from_samples(step_s)
    tokens_per_s = 1 / timing.median_s
    notes = [f"tokens/s {tokens_per_s:.1f}", f"roofline {ceiling:.1f} tokens/s"] + notes
    return Row.from_timing(BENCH, case, timing, config=f"{config},threads_per_rank={threads}", dtype="fp32",
                           shape=f"batch=1,{config}", world_size=world_size,
                           gbps=decode_bytes / timing.median_s / 1e9, ceiling_fraction=tokens_per_s / ceiling,
                           notes="; ".join(notes))


def tokens_note(tokens: Optional[List[int]], reference: List[int]) -> str:
    if tokens == reference:
        return "greedy tokens equal tp1 eager's"
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return f"TOKENS DIFFER from tp1 eager's at new token {first}"


def decode_bytes_of(preset: str, world_size: int, kv_len: int) -> int:
    """What our step reads per rank at world_size (for a peer row when our row of that degree did not run),
    from a model built on the meta device: no weights, no collectives."""
    from tp_kernels.distributed import TPGroup
    from tp_kernels.models import GPT, PRESETS

    tp = TPGroup(rank=0, world_size=world_size, name=f"{BENCH}.bytes.tp{world_size}")
    try:
        return GPT(PRESETS[preset], tp, device="meta").decode_bytes_per_rank(kv_len)
    finally:
        tp.close()


def tokens_per_s(row: Row) -> float:
    return 1e6 / row.median_us


# ----------------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------------
def _note(row: Row, key: str) -> str:
    return next((n.split(key, 1)[1].strip() for n in row.notes.split("; ") if n.startswith(key)), "")


def compile_note(row: Row) -> str:
    seconds = _note(row, "compile")
    return f"(compiled: {seconds})" if seconds else ""


def ceiling_cell(row: Row) -> str:
    """'51.3 (11.3-13.1)': the row's ceiling in tokens/s and its probes' range in GB/s per rank."""
    probes = _note(row, "probes GB/s per rank:").split(",")[0]
    ceiling = _note(row, "roofline").split()[0]
    return f"{ceiling} ({probes})" if probes else ceiling


def markdown(rows: List[Row], roofline: dict, targets: List[tuple]) -> str:
    lines = [f"Roofline probe at the start of the run (matrix-vector product over 256 MiB fp32): one process "
             f"{roofline['one_process_1_thread']:.1f} GB/s on 1 thread, {roofline['one_process_2_threads']:.1f} GB/s "
             f"on 2; two processes at once {roofline['two_processes_total']:.1f} GB/s in total "
             f"({' + '.join(f'{g:.1f}' for g in roofline['two_processes_each'])}). Each row's ceiling comes from "
             "its own probes instead: in its processes, every rank at once, before each timed round and after "
             "the last (median; their range per rank in the column).", "",
             "| row | tokens/s | ms/token, median (p20-p80) | roofline tokens/s (probes, GB/s per rank) | fraction "
             "| step breakdown, ms | all-reduce calls/token | tokens |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if math.isnan(row.median_us):
            lines.append(f"| {row.case} | {row.notes} | | | | | | |")
            continue
        lines.append(f"| {row.case} | {tokens_per_s(row):.1f} | {row.median_us / 1e3:.1f} "
                     f"({row.p20_us / 1e3:.1f}-{row.p80_us / 1e3:.1f}) | {ceiling_cell(row)} | "
                     f"{100 * row.ceiling_fraction:.0f}% | {_note(row, 'breakdown ms:') or compile_note(row)} | "
                     f"{_note(row, 'calls/token:')} "
                     f"| {'equal' if 'equal' in row.notes else 'DIFFER' if 'DIFFER' in row.notes else ''} |")
    lines += ["", "| target (issue 15) | measured | target | met |", "|---|---|---|---|"]
    for name, value, target in targets:
        met = "n/a" if value is None else "yes" if value >= target else "no"
        lines.append(f"| {name} | {'n/a' if value is None else f'{value:.2f}'} | {target} | {met} |")
    return "\n".join(lines)


def target_values(rows: Dict[str, Row], roofline_fraction_case: str) -> List[tuple]:
    def ratio(a: str, b: str) -> Optional[float]:
        if a in rows and b in rows and not math.isnan(rows[a].median_us) and not math.isnan(rows[b].median_us):
            return tokens_per_s(rows[a]) / tokens_per_s(rows[b])
        return None

    ours = roofline_fraction_case
    values = [rows[ours].ceiling_fraction if ours in rows else None, ratio(ours, "tp1 eager"),
              ratio(ours, "hf tp_plan tp2"), ratio(ours, "hf eager tp1")]
    return [(f"{name} ({ours})", value, target) for (name, target), value in zip(TARGETS, values)]


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="1,2", help="our TP degrees (default 1,2)")
    parser.add_argument("--backends", default="shm,torch", help="backends forced at TP=2 (default shm,torch)")
    parser.add_argument("--rounds", type=int, default=3, help="timed generate calls per row (default 3)")
    parser.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per generate call (default 48)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--preset", default=PRESET, help=f"an untied llama-family preset (default {PRESET})")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (they compile for ~1 min)")
    parser.add_argument("--no-peers", action="store_true", help="skip the Hugging Face transformers rows")
    parser.add_argument("--checkpoint", default=None,
                        help="directory for the checkpoint (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    if not set(world_sizes) <= {1, 2} or not world_sizes or not set(backends) <= {"shm", "torch"} or not backends:
        parser.error("--world-sizes must be a subset of 1,2 and --backends of shm,torch")
    if min(args.rounds, args.new_tokens, args.prompt_len) < 2:
        parser.error("--rounds, --new-tokens and --prompt-len must be >= 2")

    from tqdm import tqdm

    from tp_kernels.models.launch import run_on_cpu_ranks

    from tp_kernels.models import PRESETS

    if args.preset not in PRESETS:
        parser.error(f"--preset must be one of {sorted(PRESETS)}")
    vocab_size = PRESETS[args.preset].vocab_size
    prompt = torch.randint(0, vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(WEIGHT_SEED)).tolist()
    own_dir = args.checkpoint is None
    checkpoint = tempfile.mkdtemp(prefix="tp_kernels-decode_e2e-") if own_dir else args.checkpoint
    config = f"model={args.preset},prompt={args.prompt_len},new_tokens={args.new_tokens}x{args.rounds}"
    rows: List[Row] = []
    failures: List[str] = []
    try:
        if not os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
            write_checkpoint(checkpoint, args.preset)
        print("measuring the roofline", flush=True)
        roofline = decode_roofline.measure(run_on_cpu_ranks)
        reference: Optional[List[int]] = None
        decode_bytes: Dict[int, int] = {}  # per TP degree: what our step reads per rank
        modes = [False] + ([] if args.no_compile else [True])
        for world_size in tqdm(world_sizes, desc="decode_e2e: our TP degrees"):
            variants = [Variant(b if world_size > 1 else None, c) for c in modes
                        for b in (backends if world_size > 1 else [None]) if not (c and b == "torch")]
            per_rank = run_on_cpu_ranks(world_size, rank_ours, checkpoint, prompt, args.new_tokens, args.rounds,
                                        variants, timeout_s=RANK_TIMEOUT_S)
            first = per_rank[0]
            decode_bytes[world_size] = first["decode_bytes_per_rank"]
            # the variants ran in the same processes, between the same probes: one ceiling for all
            ceiling, probe_note = row_ceiling(per_rank, first["decode_bytes_per_rank"])
            for variant in variants:
                result = first["variants"][variant]
                if reference is None:  # tp1 eager, or the first row there is
                    reference = result["tokens"]
                notes = [probe_note]
                if not variant.compile:
                    parts = breakdown(per_rank, variant)
                    notes.append("breakdown ms: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
                else:
                    notes.append(f"compile {result['compile_s']:.0f} s (first call)")
                calls = result["calls_per_token"]
                notes.append("calls/token: " + ", ".join(f"{k} {v:.0f}" for k, v in calls.items()))
                notes.append(tokens_note(result["tokens"], reference))
                if "DIFFER" in notes[-1]:
                    failures.append(f"{variant.case(world_size)}: {notes[-1]}")
                rows.append(step_row(variant.case(world_size), world_size, result["step_s"], first["threads"],
                                     first["decode_bytes_per_rank"], ceiling, notes,
                                     f"{config},backend={variant.backend},compile={variant.compile}"))
        if not args.no_peers:
            for world_size, case in ((1, "hf eager tp1"), (2, "hf tp_plan tp2")):
                missing = decode_peers.missing_packages(tensor_parallel=world_size > 1)
                if missing is not None:
                    print(f"SKIPPED row {case!r}: {missing}", file=sys.stderr)
                    rows.append(Row(bench=BENCH, case=case, config=config, dtype="fp32", shape="batch=1",
                                    world_size=world_size, median_us=math.nan, p20_us=math.nan, p80_us=math.nan,
                                    notes=f"skipped: {missing}"))
                    continue
                per_rank = run_on_cpu_ranks(world_size, decode_peers.rank_hf, checkpoint, prompt, args.new_tokens,
                                            args.rounds, world_size > 1, timeout_s=RANK_TIMEOUT_S)
                # the roofline of our step at this TP degree (transformers reads the same weights)
                step_bytes = decode_bytes.get(world_size) or decode_bytes_of(args.preset, world_size,
                                                                            args.prompt_len + args.new_tokens // 2)
                ceiling, probe_note = row_ceiling(per_rank, step_bytes)
                rows.append(step_row(case, world_size, per_rank[0]["step_s"], per_rank[0]["threads"], step_bytes,
                                     ceiling, [probe_note, tokens_note(per_rank[0]["tokens"], reference)],
                                     f"{config},transformers"))
    finally:
        if own_dir:
            shutil.rmtree(checkpoint, ignore_errors=True)

    by_case = {r.case: r for r in rows}
    targets = target_values(by_case, "tp2 shm eager")
    if not args.no_compile:
        targets += target_values(by_case, "tp2 shm compiled")
    for row in rows:  # roofline columns also in the CSV: the row names its ceiling
        row.baseline = "roofline"
    print(f"wrote {write_rows(BENCH, rows)}")
    table = markdown(rows, roofline, targets)
    with open(os.path.join(RESULTS_DIR, f"{BENCH}.md"), "w") as f:
        f.write(f"Measured on CPU ranks ({rows[0].env['device']}), fp32, batch 1, {config}; rank 0's wall "
                f"clock.\n\n{table}\n")
    series: Dict[str, tuple] = {}
    for row in rows:
        if math.isnan(row.median_us):
            continue
        if row.case.startswith("hf"):
            labels = ["transformers (eager at TP=1, tp_plan at TP=2)"]
        elif row.world_size == 1:  # TP=1 starts the line of every TP=2 backend of its mode
            mode = row.case.split()[-1]
            labels = [f"ours {b} {mode}" for b in backends] if mode == "eager" else [f"ours shm {mode}"]
        else:
            labels = ["ours " + row.case.split(" ", 1)[1]]
        for label in labels:
            series.setdefault(label, ([], []))
            series[label][0].append(row.world_size)
            series[label][1].append(tokens_per_s(row))
    for row in rows:
        if not math.isnan(row.median_us) and row.case.startswith("tp") and row.case.endswith("eager"):
            series.setdefault("roofline", ([], []))
            if row.world_size not in series["roofline"][0]:
                series["roofline"][0].append(row.world_size)
                series["roofline"][1].append(tokens_per_s(row) / row.ceiling_fraction)
    print("wrote " + plot_lines(os.path.join(RESULTS_DIR, f"{BENCH}.png"), "GPT decode on CPU ranks (measured)",
                                "TP degree", "tokens/s", series, logx=False))
    print(table)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
