"""Every benchmark family, one after the other, each in its own subprocess with a time limit; then
bench/results/SUMMARY.md, the Markdown summary of every family's CSV, for the README. What `make bench` runs.

    python bench/run_all.py                       # all families
    python bench/run_all.py --only decode_model,decode_e2e
    python bench/run_all.py --summary-only        # rebuild SUMMARY.md from the CSVs already there

A family whose script is missing or fails is reported at the end and makes this script exit with status 1.
A family that runs past its limit (each has ~3x the time of a quiet run: on a busy host a family can take
twice as long) or is not started because the total is used up is stopped and listed as such in SUMMARY.md
and at the end, while every other family's results stay: a busy host alone does not fail `make bench`.
Nothing is skipped silently. Each family's output goes to bench/results/logs/<family>.log.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from common import RESULTS_DIR, markdown_table, read_rows

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Family:
    name: str  # bench/<name>.py, writing bench/results/<name>.csv
    quiet_s: float  # how long a run takes on the 2-core host when nothing else runs (see FAMILIES)
    args: Sequence[str] = ()
    what: str = ""

    @property
    def limit_s(self) -> float:
        """~3x a quiet run: other jobs on a 2-core host stretch a family up to ~2x (decode_e2e: 60-87 s loaded)."""
        return HEADROOM * self.quiet_s


# The families and their quiet-run seconds on the 2-core host (limit: HEADROOM x that). all_reduce 44 s and
# shm_store_kinds 14 s were timed quiet (2026-11-25); all_reduce has one path more since (+1/6). The others
# were timed while other jobs loaded the host, so their quiet times are at most these: kernel_resources 12 s,
# qkv_rope 6 s, decode_model 9 s, decode_e2e 60-87 s (2026-11-25); gemm_overlap_model 7 s, gemm_allreduce
# --quick 24 s at load average 13-19 (2026-12-01); allreduce_rmsnorm took 90 s at that load, given 30 s here
# since a quiet run (not timed yet) is several times faster than one at load 13-19 on 2 cores.
HEADROOM = 3.0
FAMILIES = (
    Family("all_reduce", 52, what="all-reduce latency and bandwidth: shm direct vs op vs in-place op vs gloo"),
    Family("allreduce_rmsnorm", 30, what="all-reduce + residual + RMSNorm, fused vs unfused"),
    Family("shm_store_kinds", 14, what="shm all-reduce publishing stores: ordinary vs non-temporal vs learned"),
    Family("qkv_rope", 6, what="qkv_rope, fused Triton kernel vs unfused PyTorch"),
    Family("kernel_resources", 12, what="Triton kernels compiled for sm_80/sm_90: registers, spills, shared memory"),
    Family("gemm_allreduce", 24, args=("--quick",), what="gemm_allreduce, overlapped vs sequential"),
    Family("gemm_overlap_model", 7, what="modeled H100 GEMM + all-reduce overlap"),
    Family("decode_e2e", 150, args=("--no-compile",),  # the compiled rows add ~2 Inductor compiles: run alone
           what="GPT decode on CPU ranks vs the roofline and transformers, TP 1 and 2, shm vs gloo, step breakdown"),
    Family("decode_model", 9, what="modeled H100/A100 decode, Llama-2-7B/70B, TP 1-8, vs gpt-fast"),
)
# make bench's 10 minutes: families that would start after it are listed as not started (a busy host).
TOTAL_LIMIT_S = 600.0
# Columns of the summary tables, in this order, when a CSV has them (rows of bench.common.Row); a CSV
# with none of them (e.g. kernel_resources) is shown with all its own columns.
SUMMARY_COLUMNS = ("case", "world_size", "dtype", "shape", "median_us", "p20_us", "p80_us", "gbps", "tflops",
                   "ceiling_fraction", "baseline", "ratio", "kind")
LOG_TAIL_LINES = 15


@dataclass
class Outcome:
    family: Family
    ok: bool
    seconds: float
    reason: str = ""
    overran: bool = False  # stopped at its limit, or not started for want of time: a busy host, not a failure


def script_path(family: Family) -> str:
    return os.path.join(BENCH_DIR, f"{family.name}.py")


def run_family(family: Family, limit_s: float, log_dir: str) -> Outcome:
    """Run bench/<family>.py in a subprocess (same interpreter), its output to log_dir/<family>.log."""
    path = script_path(family)
    if not os.path.isfile(path):
        return Outcome(family, False, 0.0, f"script {os.path.relpath(path)} does not exist")
    log_path = os.path.join(log_dir, f"{family.name}.log")
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, path, *family.args], stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=limit_s, cwd=os.path.dirname(BENCH_DIR))
        except subprocess.TimeoutExpired:  # subprocess.run kills the child before raising
            return Outcome(family, False, time.monotonic() - t0,
                           f"ran past its {limit_s:.0f} s limit, ~3x a quiet run: the host was busy "
                           f"(log: {os.path.relpath(log_path)})", overran=True)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-LOG_TAIL_LINES:])
        return Outcome(family, False, seconds, f"exited with status {proc.returncode}; last lines of "
                                               f"{os.path.relpath(log_path)}:\n{tail}")
    return Outcome(family, True, seconds)


def summary_table(rows: List[dict]) -> str:
    columns = [c for c in SUMMARY_COLUMNS if any(r.get(c) is not None for r in rows)]
    if "case" not in columns:
        columns = list(rows[0].keys())
    return markdown_table(rows, columns)


def write_summary(families: Sequence[Family], outcomes: Sequence[Outcome], results_dir: str = RESULTS_DIR) -> str:
    """bench/results/SUMMARY.md: per family its table (from its CSV), its extra Markdown (<name>.md if the
    family writes one), its plots, and the machine and commit the rows came from."""
    failed = {o.family.name: o.reason for o in outcomes if not o.ok and not o.overran}
    overran = {o.family.name: o.reason for o in outcomes if o.overran}
    lines = ["# Benchmark summary", "",
             "Generated by `python bench/run_all.py` from bench/results/*.csv. Rows with kind `measured` were",
             "timed on the machine named under each table; kind `modeled` rows come from tp_kernels' analytic",
             "models (tp_kernels/perf/cost_model.py, decode_model.py) and were not measured.", ""]
    for family in families:
        lines += [f"## {family.name}", "", family.what, "",
                  f"Reproduce: `python bench/{family.name}.py{''.join(' ' + a for a in family.args)}`", ""]
        if family.name in failed:
            lines += [f"**This run failed**: {failed[family.name].splitlines()[0]}", ""]
        if family.name in overran:  # its CSV, if any, is from an earlier run: not shown as this run's
            lines += [f"**Not measured in this run**: {overran[family.name]}", ""]
            continue
        csv_path = os.path.join(results_dir, f"{family.name}.csv")
        if not os.path.isfile(csv_path):
            lines += ["(no results: the CSV is missing)", ""]
            continue
        rows = read_rows(csv_path)
        if not rows:
            lines += ["(the CSV has no rows)", ""]
            continue
        lines += [summary_table(rows), ""]
        for row in rows:  # a row without a time is a case the family could not run: say why
            median = row.get("median_us", 0.0)  # CSVs without the Row schema have no times to miss
            if median is None or (isinstance(median, float) and math.isnan(median)):
                lines.append(f"- `{row.get('case')}` has no time: {row.get('notes') or 'no reason given'}")
        envs = sorted({(str(r.get("device")), str(r.get("torch")), str(r.get("commit"))) for r in rows
                       if r.get("device") is not None})
        for device, torch_version, commit in envs:
            lines.append(f"Machine: {device}; torch {torch_version}; commit {commit}.")
        extra = os.path.join(results_dir, f"{family.name}.md")
        if os.path.isfile(extra):
            with open(extra) as f:
                lines += ["", f.read().strip()]
        for png in sorted(glob.glob(os.path.join(results_dir, f"{family.name}*.png"))):
            name = os.path.basename(png)
            if name[len(family.name):len(family.name) + 1] in (".", "_"):  # not a longer family's plot
                lines += ["", f"![{name}]({name})"]
        lines.append("")
    path = os.path.join(results_dir, "SUMMARY.md")
    os.makedirs(results_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def select(names: Optional[str]) -> List[Family]:
    if not names:
        return list(FAMILIES)
    known = {f.name: f for f in FAMILIES}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"--only: unknown families {unknown}; known: {list(known)}")
    return [known[n] for n in wanted]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma separated families to run (default: all)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild SUMMARY.md from the CSVs")
    args = parser.parse_args(argv)
    families = select(args.only)
    outcomes: List[Outcome] = []
    if not args.summary_only:
        from tqdm import tqdm

        log_dir = os.path.join(RESULTS_DIR, "logs")
        os.makedirs(log_dir, exist_ok=True)
        deadline = time.monotonic() + TOTAL_LIMIT_S
        bar = tqdm(families, desc="bench families", unit="family")
        for family in bar:
            bar.set_postfix_str(family.name)
            left_s = deadline - time.monotonic()
            if left_s <= 1:
                outcomes.append(Outcome(family, False, 0.0, f"not started: the {TOTAL_LIMIT_S:.0f} s total was used up "
                                        "(the host was busy)", overran=True))
                continue
            outcomes.append(run_family(family, min(family.limit_s, left_s), log_dir))
        bar.close()
        for o in outcomes:
            status = "ok    " if o.ok else ("OVERRAN" if o.overran else "FAILED")
            print(f"{status} {o.family.name:20s} {o.seconds:6.1f} s" + ("" if o.ok else f"  {o.reason}"))
    print(f"wrote {write_summary(families, outcomes, results_dir=RESULTS_DIR)}")
    overran = [o.family.name for o in outcomes if o.overran]
    if overran:
        print(f"{len(overran)} families were not measured for want of time (busy host), listed in SUMMARY.md: "
              f"{overran}", file=sys.stderr)
    failed = [o.family.name for o in outcomes if not o.ok and not o.overran]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} families failed or are missing: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
