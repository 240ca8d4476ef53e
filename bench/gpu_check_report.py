"""What `make gpu-check` (bench/gpu_check.py) reports: per-step results parsed from pytest's output, the
one-screen summary with the benchmarks' headline figures, and the files in bench/results/gpu/."""
from __future__ import annotations

import csv
import glob
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

STEPS_CSV = "gpu_check.csv"
STEPS_PNG = "gpu_check.png"
MAX_LISTED = 5  # failures / skip reasons shown per step on the screen (all are in SUMMARY.md and the logs)
SCREEN_WIDTH = 160  # characters of a failure or skip line on the screen (whole in SUMMARY.md)

# `tests/gpu/test_x.py::test_a[p] PASSED   [ 10%]` (pytest -v), or with pytest-xdist
# `[gw3] [ 10%] PASSED tests/gpu/test_x.py::test_a[p]`: counted while a group runs, so an overrun group
# still reports what it finished
_PROGRESS = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
_PROGRESS_XDIST = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::\S+)", re.M)
# `==== 1 failed, 10 passed, 2 skipped in 12.34s ====`: the whole group's counts, when it finished
_FINAL = re.compile(r"^=+ (.*\d+ \w+.*) in [\d.]+s.* =+$", re.M)
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
# -rs short summary: `SKIPPED [2] tests/gpu/test_x.py:33: needs >= 2 CUDA GPUs`
_SKIP = re.compile(r"^SKIPPED \[(\d+)\] (\S+?:\d+): (.*)$", re.M)
# -rfE short summary: `FAILED tests/gpu/test_x.py::test_a - AssertionError: ...`
_FAILURE = re.compile(r"^((?:FAILED|ERROR) \S+.*)$", re.M)
_STATUS_KEY = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
               "XFAIL": "xfailed", "XPASS": "xpassed"}


@dataclass
class StepResult:
    name: str
    kind: str
    budget_s: float
    seconds: float
    status: str  # ok | passed | skipped | failed | overran | not present | no tests | not started
    detail: str = ""
    log: str = ""
    counts: Dict[str, int] = field(default_factory=dict)
    skip_reasons: List[str] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)

    def counts_text(self) -> str:
        order = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
        return ", ".join(f"{self.counts[k]} {k}" for k in order if self.counts.get(k))


def _progress(output: str) -> List[Tuple[str, str]]:
    """(node id, status) of every test pytest -v reported, in order."""
    return _PROGRESS.findall(output) + [(nodeid, status) for status, nodeid in _PROGRESS_XDIST.findall(output)]


def _grouped_skips(found: Sequence[Tuple[str, str, str]]) -> List[str]:
    """`N x reason (file:line, file:line)` per distinct reason: one GPU skips many tests for one reason."""
    by_reason: Dict[str, Tuple[int, List[str]]] = {}
    for n, where, reason in found:
        count, places = by_reason.get(reason, (0, []))
        by_reason[reason] = (count + int(n), places + [where])
    return [f"{count} x {reason} ({', '.join(places)})" for reason, (count, places) in by_reason.items()]


def parse_pytest_output(output: str) -> Tuple[Dict[str, int], List[str], List[str]]:
    """(counts, skip reasons, failure lines) of a pytest -v -rfEs run, finished or killed midway."""
    finals = _FINAL.findall(output)
    if finals:
        counts = {}
        for n, word in _COUNT.findall(finals[-1]):
            counts["error" if word.startswith("error") else word] = int(n)
    else:  # killed before its summary: count the tests it reported
        last: Dict[str, str] = {}
        for nodeid, status in _progress(output):
            last[nodeid] = _STATUS_KEY[status]
        counts = {}
        for status in last.values():
            counts[status] = counts.get(status, 0) + 1
    skips = _grouped_skips(_SKIP.findall(output))
    failures = _FAILURE.findall(output)
    if not failures:
        failures = [f"{status} {nodeid}" for nodeid, status in _progress(output) if status in ("FAILED", "ERROR")]
    return counts, skips, failures


# ----------------------------------------------------------------------------------------------------------
# headline figures from the benchmarks' CSVs
# ----------------------------------------------------------------------------------------------------------
def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def headline_lines(rows: Sequence[dict]) -> List[str]:
    """One line per (bench, case vs baseline) with its ratios' median and range; benches without ratios
    list their rows' times; cases that could not run say why."""
    lines = []
    ratios: Dict[Tuple[str, str, str], List[float]] = {}
    for r in rows:
        if r.get("kind") == "measured" and _finite(r.get("ratio")):
            ratios.setdefault((r["bench"], r["case"], r.get("baseline") or "?"), []).append(r["ratio"])
    for (bench, case, baseline), values in ratios.items():
        lines.append(f"{bench}: {case} vs {baseline}: {statistics.median(values):.2f}x median "
                     f"({min(values):.2f}-{max(values):.2f}x over {len(values)} cases)")
    with_ratio = {b for b, _, _ in ratios}
    for r in rows:
        if r.get("bench") in with_ratio or r.get("kind") != "measured":
            continue
        if not _finite(r.get("median_us")):
            lines.append(f"{r['bench']}: {r['case']} {r.get('config', '')}: not run: {r.get('notes') or 'no reason'}")
            continue
        extra = f", {r['gbps']:.0f} GB/s" if _finite(r.get("gbps")) else ""
        if _finite(r.get("ceiling_fraction")):
            extra += f" ({100 * r['ceiling_fraction']:.0f}% of the ceiling)"
        lines.append(f"{r['bench']}: {r['case']} {r.get('config', '')}: {r['median_us']:.1f} us median{extra}")
    return lines


def bench_csvs(results_dir: str) -> List[str]:
    return [p for p in sorted(glob.glob(os.path.join(results_dir, "*.csv"))) if os.path.basename(p) != STEPS_CSV]


# ----------------------------------------------------------------------------------------------------------
# the summary and the files
# ----------------------------------------------------------------------------------------------------------
def summary_lines(results: Sequence[StepResult], facts: Dict[str, str], results_dir: str,
                  elapsed_s: float) -> List[str]:
    """The one-screen summary: a line per step, the first skip reasons and failures, the headline figures."""
    budget = sum(r.budget_s for r in results)
    lines = [f"gpu-check: {facts['name']} x{facts['count']} (TORCH_CUDA_ARCH_LIST={facts['arch_list']}), "
             f"torch {facts['torch']}, CUDA {facts['cuda']}; {elapsed_s:.0f} s (budgets {budget:.0f} s)",
             f"{'step':18s} {'result':12s} {'time / budget':>14s}  tests"]
    for r in results:
        lines.append(f"{r.name:18s} {r.status:12s} {r.seconds:6.0f} / {r.budget_s:3.0f} s  "
                     f"{_join(r.counts_text(), r.detail)}")
    for r in results:
        for reason in r.skip_reasons[:MAX_LISTED]:
            lines.append(f"  {r.name} skipped: {reason}"[:SCREEN_WIDTH])
        for failure in r.failures[:MAX_LISTED]:
            lines.append(f"  {r.name} {failure}"[:SCREEN_WIDTH])
        hidden = max(0, len(r.skip_reasons) - MAX_LISTED) + max(0, len(r.failures) - MAX_LISTED)
        if hidden:
            lines.append(f"  {r.name}: {hidden} more in {r.log}")
    from common import read_rows  # imports torch: not needed by --dry-run

    rows = [row for path in bench_csvs(results_dir) for row in read_rows(path)]
    devices = sorted({str(r.get("device")) for r in rows if r.get("kind") == "measured"})
    lines.append(f"headline figures (measured on {', '.join(devices) or 'nothing: no benchmark rows'}):")
    lines += [f"  {line}" for line in headline_lines(rows)]
    lines.append(f"results: {os.path.relpath(results_dir)}/ (SUMMARY.md, {STEPS_CSV}, {STEPS_PNG}, logs/)")
    return lines


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def write_results(results: Sequence[StepResult], summary: Sequence[str], results_dir: str) -> None:
    """gpu_check.csv, gpu_check.png and SUMMARY.md (the summary, every skip reason and failure, and each
    benchmark's table) in results_dir."""
    from common import read_rows
    from run_all import summary_table

    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, STEPS_CSV), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "kind", "status", "seconds", "budget_s", "passed", "failed", "error", "skipped",
                         "detail", "log"])
        for r in results:
            writer.writerow([r.name, r.kind, r.status, f"{r.seconds:.1f}", f"{r.budget_s:.0f}",
                             *(r.counts.get(k, 0) for k in ("passed", "failed", "error", "skipped")), r.detail, r.log])
    plot_note = _plot_steps(results, os.path.join(results_dir, STEPS_PNG))
    lines = ["# gpu-check results", "", "Written by `make gpu-check` (bench/gpu_check.py).", "", "```", *summary,
             "```", ""]
    if plot_note:
        lines += [plot_note, ""]
    else:
        lines += [f"![time per step vs its budget]({STEPS_PNG})", ""]
    for r in results:
        if r.skip_reasons or r.failures:
            lines += [f"## {r.name}: skips and failures", ""]
            lines += [f"- skipped: {s}" for s in r.skip_reasons] + [f"- {f}" for f in r.failures] + [""]
    for path in bench_csvs(results_dir):
        rows = read_rows(path)
        name = os.path.splitext(os.path.basename(path))[0]
        lines += [f"## {name}", ""]
        lines += [summary_table(rows), ""] if rows else ["(no rows)", ""]
        for png in sorted(glob.glob(os.path.join(results_dir, f"{name}*.png"))):
            lines += [f"![{os.path.basename(png)}]({os.path.basename(png)})", ""]
    with open(os.path.join(results_dir, "SUMMARY.md"), "w") as f:
        f.write("\n".join(lines))


_STATUS_COLOR = {"ok": "tab:green", "passed": "tab:green", "skipped": "tab:gray", "no tests": "tab:gray",
                 "not present": "tab:gray", "failed": "tab:red", "overran": "tab:orange", "not started": "white"}


def _plot_steps(results: Sequence[StepResult], path: str) -> Optional[str]:
    """Bars of each step's time inside an outline of its budget; None when written, else why not."""
    try:
        import matplotlib
    except ImportError as exc:
        return f"(no {STEPS_PNG}: {exc})"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(results) + 1.6))
    ordered = list(results)[::-1]
    names = [r.name for r in ordered]
    ax.barh(names, [r.budget_s for r in ordered], color="none", edgecolor="black", label="budget")
    ax.barh(names, [r.seconds for r in ordered], color=[_STATUS_COLOR.get(r.status, "tab:blue") for r in ordered],
            label="time taken (colour: result)")
    label_gap = 0.01 * max(r.budget_s for r in ordered)
    for y, r in enumerate(ordered):
        ax.text(r.seconds + label_gap, y, r.status, va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_title("gpu-check: time per step vs its budget")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
