"""Modeled (not measured) H100 times of the overlapped row-parallel GEMM + all-reduce, from
tp_kernels.perf.cost_model: sequential (k = 1) vs the best chunk count vs the fused kernel (cost_model.fused_time_s)
vs the bound max(T_gemm, T_comm), for
Llama-70B-like shapes (hidden 8192, intermediate 28672, TP = 8, bf16) over M = 1 .. 8192; next to the
published anchor, Flux (Chang et al. 2024, arXiv:2406.06858): GEMM + reduce-scatter at M=4096, K=49152,
N=12288 on 8 H800s, 1.408 ms sequential -> 0.932 ms overlapped, whose ceiling is 1 + min/max.

    python bench/gemm_overlap_model.py            # rows in bench/results/gemm_overlap_model.{csv,json} + a plot
"""
from __future__ import annotations

import os

import torch

from common import RESULTS_DIR, Row, markdown_table, plot_lines, write_rows
from tp_kernels.comm import ipc_plan
from tp_kernels.perf import cost_model
from tp_kernels.perf.cost_model import HARDWARE

BENCH = "gemm_overlap_model"
WORLD_SIZE = 8
DTYPE = torch.bfloat16
HIDDEN, INTERMEDIATE = 8192, 28672  # Llama-2/3 70B
# row-parallel layers of a Llama-70B block: (name, N, K per rank)
LAYERS = [("o_proj", HIDDEN, HIDDEN // WORLD_SIZE), ("down_proj", HIDDEN, INTERMEDIATE // WORLD_SIZE)]
FLUX = dict(m=4096, k=49152, n=12288, world_size=8, seq_ms=1.408, overlap_ms=0.932)


def _row(case, m, n, k, world_size, hw, seconds, config, collective, baseline=None, ratio=None, notes=""):
    us = seconds * 1e6
    return Row(bench=BENCH, case=case, config=f"{config} collective={collective}", dtype=str(DTYPE).split(".")[-1],
               shape=f"M={m} N={n} K_per_rank={k}", world_size=world_size, median_us=us, p20_us=us, p80_us=us,
               kind="modeled", baseline=baseline, ratio=ratio,
               notes=f"{hw.name}: {hw.source}; {notes}".strip("; "),
               env={"device": f"modeled:{hw.name}", "torch": torch.__version__, "triton": "n/a", "commit": ""})


def model_case(case, m, n, k, world_size, hw, collective):
    seq = cost_model.pipeline_time_s(m, n, k, world_size, DTYPE, hw, 1, collective)
    chunks = cost_model.best_chunks(m, n, k, world_size, DTYPE, hw, collective)
    best = cost_model.pipeline_time_s(m, n, k, world_size, DTYPE, hw, chunks, collective)
    bound = cost_model.overlap_bound_s(m, n, k, world_size, DTYPE, hw, collective)
    algo = ipc_plan.choose_algorithm(m * n * cost_model.dtype_bytes(DTYPE), world_size, hw)  # the launcher's rule
    fused = cost_model.fused_time_s(m, n, k, world_size, DTYPE, hw, collective, algo)
    form = cost_model.best_form(m, n, k, world_size, DTYPE, hw, collective, algo)[0]
    return [_row(case, m, n, k, world_size, hw, seq, "sequential k=1", collective),
            _row(case, m, n, k, world_size, hw, best, f"overlapped best k={chunks}", collective,
                 baseline="sequential k=1", ratio=seq / best),
            _row(case, m, n, k, world_size, hw, bound, "bound max(T_gemm, T_comm)", collective,
                 baseline="sequential k=1", ratio=seq / bound),
            _row(case, m, n, k, world_size, hw, fused, "fused kernel (tile-level overlap, one launch)", collective,
                 baseline="sequential k=1", ratio=seq / fused, notes=f"best_form picks {form}")]


def main() -> None:
    hw = HARDWARE["H100"]
    rows, series = [], {}
    ms = [2 ** i for i in range(14)]  # 1 .. 8192
    for name, n, k in LAYERS:
        seq_us, best_us, bound_us, fused_us = [], [], [], []
        for m in ms:
            seq, best, bound, fused = model_case(name, m, n, k, WORLD_SIZE, hw, "all_reduce")
            rows += [seq, best, bound, fused]
            seq_us.append(seq.median_us)
            best_us.append(best.median_us)
            bound_us.append(bound.median_us)
            fused_us.append(fused.median_us)
        series[f"{name} sequential"] = (ms, seq_us)
        series[f"{name} best k"] = (ms, best_us)
        series[f"{name} bound"] = (ms, bound_us)
        series[f"{name} fused"] = (ms, fused_us)

    # the Flux anchor, modeled on its own hardware (H800) and operation (reduce-scatter)
    h800 = HARDWARE["H800"]
    flux_k = FLUX["k"] // FLUX["world_size"]
    anchor = model_case("flux_anchor_gemm_rs", FLUX["m"], FLUX["n"], flux_k, FLUX["world_size"], h800,
                        "reduce_scatter")
    rows += anchor
    published_ratio = FLUX["seq_ms"] / FLUX["overlap_ms"]
    rows.append(Row(bench=BENCH, case="flux_anchor_gemm_rs", config="published sequential (Flux, 8x H800)",
                    dtype="bfloat16", shape=f"M={FLUX['m']} N={FLUX['n']} K={FLUX['k']}", world_size=8,
                    median_us=FLUX["seq_ms"] * 1e3, p20_us=FLUX["seq_ms"] * 1e3, p80_us=FLUX["seq_ms"] * 1e3,
                    kind="published", notes="Chang et al. 2024, Flux, arXiv:2406.06858",
                    env={"device": "H800 x8 (published)", "torch": "", "triton": "", "commit": ""}))
    rows.append(Row(bench=BENCH, case="flux_anchor_gemm_rs", config="published overlapped (Flux, 8x H800)",
                    dtype="bfloat16", shape=f"M={FLUX['m']} N={FLUX['n']} K={FLUX['k']}", world_size=8,
                    median_us=FLUX["overlap_ms"] * 1e3, p20_us=FLUX["overlap_ms"] * 1e3,
                    p80_us=FLUX["overlap_ms"] * 1e3, kind="published", baseline="published sequential",
                    ratio=published_ratio, notes="Chang et al. 2024, Flux, arXiv:2406.06858",
                    env={"device": "H800 x8 (published)", "torch": "", "triton": "", "commit": ""}))

    write_rows(BENCH, rows)
    plot = plot_lines(os.path.join(RESULTS_DIR, f"{BENCH}.png"),
                      f"MODELED H100 GEMM + all-reduce, TP={WORLD_SIZE}, bf16",
                      "M (tokens)", "time (us, modeled)", series)
    columns = ["case", "shape", "config", "median_us", "ratio"]
    print(markdown_table([r for r in rows if r.case != "flux_anchor_gemm_rs" and
                          int(r.shape.split()[0][2:]) in (1, 16, 256, 1024, 4096, 8192)], columns))
    print()
    anchor_rows = [r for r in rows if r.case == "flux_anchor_gemm_rs"]
    print(markdown_table(anchor_rows, ["config", "kind", "median_us", "ratio"]))
    seq, best, fused = anchor[0].median_us, anchor[1].median_us, anchor[3].median_us
    g = cost_model.gemm_time_s(FLUX["m"], FLUX["n"], flux_k, DTYPE, h800) * 1e6
    c = cost_model.collective_time_s(FLUX["m"] * FLUX["n"] * 2, 8, h800, "reduce_scatter") * 1e6
    print(f"\nFlux anchor: modeled T_gemm={g:.0f} us, T_comm={c:.0f} us, ceiling 1 + min/max = "
          f"{1 + min(g, c) / max(g, c):.2f}x; modeled speedup {seq / best:.2f}x chunked, {seq / fused:.2f}x fused; "
          f"published {published_ratio:.2f}x")
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
