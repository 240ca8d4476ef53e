"""Shared benchmark machinery: timing, the one row schema (CSV + JSON), environment facts, plots.

Every benchmark script builds `Row`s and calls `write_rows(name, rows)`; rows from different machines can
be compared because each carries the device, versions, commit and the full config. A row is `measured`
(timed here) or `modeled` (from tp_kernels.perf.cost_model, with its hardware constants named in `notes`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

# TP_KERNELS_BENCH_RESULTS_DIR sends every family's files elsewhere (make gpu-check: bench/results/gpu/)
RESULTS_DIR = (os.environ.get("TP_KERNELS_BENCH_RESULTS_DIR")
               or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    n: int


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    idx = q * (len(sorted_values) - 1)
    lo, hi = int(idx), min(int(idx) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (idx - lo)


def measure(fn: Callable[[], object], warmup: int = 5, repeats: int = 50, min_time_s: float = 0.0) -> Timing:
    """Wall-clock time of fn() on the CPU: warm-up calls, then `repeats` timed calls (more while the total
    is under min_time_s); median and p20/p80 of the per-call times."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def timing_from_samples(seconds: Sequence[float]) -> Timing:
    """Median and p20/p80 of per-call times taken elsewhere (e.g. one per decode step)."""
    if not seconds:
        raise ValueError("timing_from_samples needs at least one sample")
    ordered = sorted(seconds)
    return Timing(statistics.median(ordered), _quantile(ordered, 0.2), _quantile(ordered, 0.8), len(ordered))


def measure_cuda(fn: Callable[[], object]) -> Timing:
    """GPU time of fn() with triton.testing.do_bench (CUDA events, L2 flushed): median, p20, p80."""
    import triton.testing

    median_ms, p20_ms, p80_ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return Timing(median_ms / 1e3, p20_ms / 1e3, p80_ms / 1e3, 0)


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: Optional[str] = None) -> dict:
    """The facts every row carries: device, versions, commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device is None:
        device = (torch.cuda.get_device_name() if torch.cuda.is_available()
                  else f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}")
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "commit": _commit()}


@dataclass
class Row:
    """One benchmark result. `config` is a free-form string with everything else that defines the case
    (algorithm, chunks, backend...); `baseline` names the row this one's `ratio` is relative to."""

    bench: str
    case: str
    config: str
    dtype: str
    shape: str
    world_size: int
    median_us: float
    p20_us: float
    p80_us: float
    kind: str = "measured"  # or "modeled"
    gbps: Optional[float] = None
    tflops: Optional[float] = None
    ceiling_fraction: Optional[float] = None
    baseline: Optional[str] = None
    ratio: Optional[float] = None
    notes: str = ""
    env: dict = field(default_factory=environment)

    @classmethod
    def from_timing(cls, bench: str, case: str, timing: Timing, **kw) -> "Row":
        return cls(bench=bench, case=case, median_us=timing.median_s * 1e6, p20_us=timing.p20_s * 1e6,
                   p80_us=timing.p80_s * 1e6, **kw)

    def flat(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("env"))
        return d


def write_rows(name: str, rows: Sequence[Row], results_dir: str = RESULTS_DIR) -> str:
    """Write rows to results_dir/name.csv and name.json; returns the CSV path."""
    os.makedirs(results_dir, exist_ok=True)
    flat = [r.flat() for r in rows]
    csv_path = os.path.join(results_dir, f"{name}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0].keys()) if flat else ["bench"])
        writer.writeheader()
        writer.writerows(flat)
    with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
        json.dump(flat, f, indent=1)
    return csv_path


# Row fields that stay strings even when they look like numbers (a commit "1234e56", a shape "4096").
_TEXT_FIELDS = {f.name for f in dataclasses.fields(Row) if f.type in ("str", "Optional[str]")} | {
    "device", "torch", "triton", "commit"}


def _parse_cell(name: str, text: str):
    """A CSV cell back to int, float, None (empty) or the string itself."""
    if text == "":
        return None
    if name in _TEXT_FIELDS:
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_rows(csv_path: str) -> List[dict]:
    """The flat rows of a CSV written by write_rows (or any CSV), numbers parsed back, empty cells None."""
    with open(csv_path, newline="") as f:
        return [{k: _parse_cell(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def markdown_table(rows: Sequence, columns: Sequence[str]) -> str:
    """A Markdown table of the given flat-row columns (for the README); rows are Rows or flat dicts
    (read_rows)."""
    flat = [r if isinstance(r, dict) else r.flat() for r in rows]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in flat]
    return "\n".join(lines)


def plot_lines(path: str, title: str, xlabel: str, ylabel: str, series: dict, logx: bool = True,
               logy: bool = True) -> str:
    """series: {label: (xs, ys)}. Saves a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
