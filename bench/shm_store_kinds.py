"""How the shared-memory all-reduce should publish into its slots: ordinary vs non-temporal stores vs the
learned choice (ShmCommunicator.publish_stores = "ordinary" / "non-temporal" / "auto"), interleaved.

    python bench/shm_store_kinds.py                    # 2 ranks, fp32, 256 KiB .. 16 MiB, out of place
    python bench/shm_store_kinds.py --in-place --sizes 1M,16M

Why interleaved: which kind wins depends on where the host placed the ranks' cores, and on a VM that can
change from one minute to the next. Each round times every kind back to back on the same buffers, so the
three see the same placement; a run that straddles a change shows it as a wide p20-p80. The "probe" rows
time a 4-byte all-reduce per round (a round trip between the ranks) to show which placement a round had.

Writes bench/results/shm_store_kinds.{csv,json}.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from all_reduce import agreed_repeats, launch, parse_size, size_label
from common import Row, markdown_table, timing_from_samples, write_rows

KINDS = ("ordinary", "non-temporal", "auto")
DEFAULT_SIZES = "256K,1M,4M,16M"


def _timed_calls(fn, n: int) -> List[float]:
    dist.barrier()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _bench_rank(tp, args) -> List[dict]:
    from tp_kernels.comm.shm import ShmCommunicator

    comms = {}
    for kind in KINDS:
        comms[kind] = ShmCommunicator(tp.process_group, tp.rank, tp.world_size, f"{tp.name}/stores-{kind}")
        comms[kind].publish_stores = kind
    probe_x = torch.ones(1)
    records = []
    try:
        for n_bytes in args.sizes:
            x = torch.randn(n_bytes // 4)
            out = x if args.in_place else torch.empty_like(x)
            samples: Dict[str, List[float]] = {kind: [] for kind in (*KINDS, "probe")}
            repeats = agreed_repeats(lambda: comms["ordinary"].all_reduce(x, out), args.budget_s / args.rounds / 3,
                                     lo=5, hi=2000)
            for _ in range(args.rounds):
                samples["probe"] += _timed_calls(lambda: comms["ordinary"].all_reduce(probe_x), 200)
                for kind in KINDS:
                    samples[kind] += _timed_calls(lambda: comms[kind].all_reduce(x, out), repeats)
            learned = comms["auto"]._native.store_estimates(n_bytes)
            for kind, seconds in samples.items():
                records.append(dict(kind=kind, n_bytes=n_bytes, timing=timing_from_samples(seconds), learned=learned))
    finally:
        for comm in comms.values():
            comm.close()
    return records


def to_rows(records: List[dict], args) -> List[Row]:
    by_key = {(r["kind"], r["n_bytes"]): r["timing"] for r in records}
    rows = []
    for r in records:
        t, n_bytes, kind = r["timing"], r["n_bytes"], r["kind"]
        ordinary = by_key[("ordinary", n_bytes)]
        compared = kind not in ("ordinary", "probe")
        ns_ordinary, ns_non_temporal = (v * 1e9 for v in r["learned"])
        rows.append(Row.from_timing(
            "shm_store_kinds", kind, t, dtype="fp32", shape="4B" if kind == "probe" else size_label(n_bytes),
            world_size=args.world_size,
            config=f"publish_stores={kind} in_place={args.in_place} rounds={args.rounds}",
            gbps=None if kind == "probe" else n_bytes / t.median_s / 1e9,
            baseline="ordinary" if compared else None, ratio=ordinary.median_s / t.median_s if compared else None,
            notes=("4-byte all-reduce between the rounds: the placement probe" if kind == "probe" else
                   f"auto's learned cost after the run: ordinary {ns_ordinary:.3f} ns/B, non-temporal "
                   f"{ns_non_temporal:.3f} ns/B; ratio = ordinary / this")))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"bytes per rank, comma separated (default {DEFAULT_SIZES})")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per size")
    parser.add_argument("--budget-s", type=float, default=1.5, help="target seconds of timed calls per size")
    parser.add_argument("--in-place", action="store_true", help="all_reduce(x, out=x) instead of into a new buffer")
    parser.add_argument("--no-bind", dest="bind", action="store_false", help="do not pin rank r to core r")
    parser.add_argument("--name", default="shm_store_kinds", help="results file name in bench/results/")
    args = parser.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    rows = to_rows(launch(args.world_size, _bench_rank, args), args)
    print(f"wrote {write_rows(args.name, rows)}")
    print(markdown_table(rows, ["case", "shape", "median_us", "p20_us", "p80_us", "gbps", "ratio"]))


if __name__ == "__main__":
    main()
