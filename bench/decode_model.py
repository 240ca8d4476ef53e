"""Modeled (not measured) GPU decode step of Llama-2-7B-like and Llama-2-70B-like configs at TP 1, 2, 4, 8,
with NCCL's all-reduce and with the one-shot custom all-reduce, on H100 and on A100, next to the published
gpt-fast figures measured on 8 A100s (so the A100 rows compare like for like).

    python bench/decode_model.py                       # both models, TP 1/2/4/8, H100 + A100
    python bench/decode_model.py --context-len 1024

Model (tp_kernels.perf.decode_model): step = (weights + KV cache per GPU) / HBM bandwidth + 2 all-reduces
per layer; batch 1, bf16. Every row is kind="modeled"; its notes name the hardware constants' sources.
Published figures: gpt-fast README (pytorch-labs/gpt-fast), bf16, torch.compile, 8x A100-80GB "power
limited to 330W", tokens/s of one sequence.

Writes bench/results/decode_model.{csv,json}, decode_model.png and decode_model.md (the tokens/s table).
"""
from __future__ import annotations

import argparse
import os
from typing import List

from common import RESULTS_DIR, Row, environment, plot_lines, write_rows
from tp_kernels.perf import decode_model as pd
from tp_kernels.perf.cost_model import HARDWARE

BENCH = "decode_model"
MODELS = {"llama-2-7b": pd.LLAMA2_7B, "llama-2-70b": pd.LLAMA2_70B}
TP_DEGREES = (1, 2, 4, 8)
GPUS = ("H100", "A100")
# gpt-fast README, "Benchmarks" table (8x A100-80GB, bf16, tokens/s at batch 1): {model: {tp: tokens/s}}.
GPT_FAST_A100_TOKENS_PER_S = {
    "llama-2-7b": {1: 104.9, 2: 168.8, 4: 254.0, 8: 328.4},
    "llama-2-70b": {2: 21.3, 4: 38.0, 8: 62.5},
}
NCCL_SOURCE = (f"NCCL ring/LL latency {pd.NCCL_RING_LL_BASE_US} us + {pd.NCCL_RING_LL_NVLINK_STEP_US} us per "
               "NVLink step (NCCL src/graph/tuning.cc baseLat/hwLat)")


def model_rows(context_len: int) -> List[Row]:
    env = environment(device="modeled")
    rows: List[Row] = []
    for gpu in GPUS:
        hw = HARDWARE[gpu]
        for model_name, args in MODELS.items():
            for tp in TP_DEGREES:
                # the 70B's bf16 weights (138 GB) do not fit one 80 GB GPU: gpt-fast starts it at TP 2 too
                if pd.weight_bytes_per_rank(args, tp) > 80e9:
                    continue
                published = GPT_FAST_A100_TOKENS_PER_S[model_name].get(tp) if gpu == "A100" else None
                for allreduce in pd.ALLREDUCE_KINDS if tp > 1 else ("none",):
                    step = pd.decode_step(args, tp, hw, "nccl" if allreduce == "none" else allreduce, context_len)
                    step_us = step.total_s * 1e6
                    weight_gbps = pd.weight_bytes_per_rank(args, tp) / step.total_s / 1e9
                    notes = [f"{hw.name}: {hw.hbm_gbps:.0f} GB/s HBM, {hw.link_gbps:.0f} GB/s NVLink/dir "
                             f"({hw.source})"]
                    notes.append(NCCL_SOURCE if allreduce == "nccl" else
                                 f"one-shot latency {hw.link_latency_us} us (cost_model.HARDWARE)"
                                 if allreduce == "custom" else "no communication at TP 1")
                    notes.append(f"tokens/s {step.tokens_per_s:.1f}; comm {100 * step.comm_fraction:.1f}% of the step")
                    if published is not None:
                        notes.append(f"gpt-fast measured {published} tokens/s on A100 = "
                                     f"{published / step.tokens_per_s:.2f} of this model")
                    rows.append(Row(
                        bench=BENCH, case=f"{model_name} {gpu} tp{tp} {allreduce}",
                        config=(f"model={model_name},gpu={gpu},allreduce={allreduce},context={context_len},"
                                f"batch=1,all_reduces={step.n_all_reduces}"),
                        dtype="bf16", shape=f"dim={args.dim},layers={args.n_layers}", world_size=tp,
                        median_us=step_us, p20_us=step_us, p80_us=step_us, kind="modeled", gbps=weight_gbps,
                        ceiling_fraction=weight_gbps / hw.hbm_gbps,
                        baseline="gpt-fast A100" if published is not None else None,
                        ratio=published / step.tokens_per_s if published is not None else None,
                        notes="; ".join(notes), env=env))
    return rows


def tokens_per_s(row: Row) -> float:
    return 1e6 / row.median_us


def tokens_table(rows: List[Row]) -> str:
    """Markdown: per model, GPU and TP degree, modeled tokens/s with NCCL and with the custom all-reduce,
    and gpt-fast's published tokens/s where there is one (A100)."""
    by_case = {}
    for row in rows:
        config = dict(kv.split("=") for kv in row.config.split(","))
        by_case[(config["model"], config["gpu"], row.world_size, config["allreduce"])] = tokens_per_s(row)
    lines = ["| model | GPU | TP | modeled tokens/s, NCCL | modeled tokens/s, custom all-reduce | "
             "gpt-fast published (A100) | published / modeled NCCL |", "|---|---|---|---|---|---|---|"]
    for gpu in GPUS:
        for model_name in MODELS:
            for tp in TP_DEGREES:
                nccl = by_case.get((model_name, gpu, tp, "nccl" if tp > 1 else "none"))
                if nccl is None:
                    continue
                custom = by_case.get((model_name, gpu, tp, "custom" if tp > 1 else "none"))
                published = GPT_FAST_A100_TOKENS_PER_S[model_name].get(tp) if gpu == "A100" else None
                lines.append(f"| {model_name} | {gpu} | {tp} | {nccl:.1f} | {custom:.1f} | "
                             f"{'' if published is None else published} | "
                             f"{'' if published is None else f'{published / nccl:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-len", type=int, default=256,
                        help="tokens already in the KV cache at the modeled step (default 256)")
    args = parser.parse_args()
    rows = model_rows(args.context_len)
    print(f"wrote {write_rows(BENCH, rows)}")
    series = {}
    for row in rows:
        config = dict(kv.split("=") for kv in row.config.split(","))
        if config["allreduce"] == "none":  # TP 1 starts both all-reduce lines
            for allreduce in ("nccl", "custom"):
                label = f"{config['model']} {config['gpu']} {allreduce} (modeled)"
                series.setdefault(label, ([], []))
                series[label][0].append(row.world_size)
                series[label][1].append(tokens_per_s(row))
            continue
        label = f"{config['model']} {config['gpu']} {config['allreduce']} (modeled)"
        series.setdefault(label, ([], []))
        series[label][0].append(row.world_size)
        series[label][1].append(tokens_per_s(row))
    for model_name, published in GPT_FAST_A100_TOKENS_PER_S.items():
        tps = sorted(published)
        series[f"{model_name} A100 gpt-fast (published)"] = (tps, [published[t] for t in tps])
    plot = plot_lines(os.path.join(RESULTS_DIR, f"{BENCH}.png"), "decode tokens/s at batch 1: modeled vs gpt-fast",
                      "TP degree", "tokens/s", series)
    print(f"wrote {plot}")
    table = tokens_table(rows)
    with open(os.path.join(RESULTS_DIR, f"{BENCH}.md"), "w") as f:
        f.write(f"Modeled (not measured), batch 1, bf16, {args.context_len} cached tokens.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
