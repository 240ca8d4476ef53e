"""Fused all-reduce + residual add + RMSNorm against the same work in separate steps, on CPU ranks with
the shared-memory communicator, at decode sizes (hidden 4096, 1 to 16 tokens).

    python bench/allreduce_rmsnorm.py
    python bench/allreduce_rmsnorm.py --tokens 1,16 --dtypes fp32 --hidden 8192

Writes bench/results/allreduce_rmsnorm.{csv,json} and allreduce_rmsnorm.png.

Paths (rank 0's times; every rank runs the same calls back to back):
  fused-op       tp_kernels.ops.allreduce_residual_rmsnorm(x, residual, weight, eps, tp)
  3-steps-op     ops.all_reduce(x, tp); h = y + residual; torch.nn.functional.rms_norm(h.float(), ...)
                 (the three steps separately, in torch)
  2-steps-op     ops.all_reduce(x, tp); ops.add_rmsnorm(y, residual, weight, eps)
  fused-direct   ShmCommunicator.allreduce_residual_rmsnorm (no op dispatch)
  2-steps-direct ShmCommunicator.all_reduce, then torch.ops.tp_kernels.add_rmsnorm
The ratio of each fused row is against the 3-steps row of the same layer (op or direct: 3-steps-direct is
the direct all_reduce followed by the torch add and rms_norm).
"""
from __future__ import annotations

import argparse
import os
from typing import List

import torch
import torch.nn.functional as F

from all_reduce import DTYPES, check_backend_proof, launch, parse_dtypes, shm_steps_of_one_call, time_collective
from common import RESULTS_DIR, Row, markdown_table, plot_lines, write_rows

EPS = 1e-6


def _bench_rank(tp, args) -> List[dict]:
    from tqdm import tqdm

    from tp_kernels import ops

    comm = tp.communicator_for(torch.ones(1))
    if comm.name != "shm":
        raise RuntimeError(f"expected the shm communicator in the chain, got {comm.name}")
    add_rmsnorm = torch.ops.tp_kernels.add_rmsnorm
    records = []
    cases = [(d, t) for d in args.dtypes for t in args.tokens]
    bar = tqdm(cases, desc="allreduce+rmsnorm", disable=tp.rank != 0)
    for dtype_name, n_tokens in bar:
        dtype = DTYPES[dtype_name]
        x = torch.randn(n_tokens, args.hidden).to(dtype)
        residual = torch.randn(n_tokens, args.hidden).to(dtype)
        weight = torch.randn(args.hidden).to(dtype)

        def three_steps(reduce):
            h = reduce(x) + residual
            return F.rms_norm(h.float(), (args.hidden,), weight.float(), EPS).to(dtype), h

        paths = {
            "fused-op": lambda: ops.allreduce_residual_rmsnorm(x, residual, weight, EPS, tp),
            "3-steps-op": lambda: three_steps(lambda t: ops.all_reduce(t, tp)),
            "2-steps-op": lambda: ops.add_rmsnorm(ops.all_reduce(x, tp), residual, weight, EPS),
            "fused-direct": lambda: comm.allreduce_residual_rmsnorm(x, residual, weight, EPS),
            "3-steps-direct": lambda: three_steps(comm.all_reduce),
            "2-steps-direct": lambda: add_rmsnorm(comm.all_reduce(x), residual, weight, EPS),
        }
        for path, fn in paths.items():
            bar.set_postfix_str(f"{dtype_name} T={n_tokens} {path}")
            shm_steps = shm_steps_of_one_call(fn, [comm])
            check_backend_proof(path, shm_steps, through_shm=True)  # every path reduces through shm
            records.append(dict(path=path, dtype=dtype_name, n_tokens=n_tokens, shm_steps=shm_steps,
                                timing=time_collective(fn, args.budget_s)))
    return records


def to_rows(records: List[dict], hidden: int, world_size: int) -> List[Row]:
    by_key = {(r["path"], r["dtype"], r["n_tokens"]): r["timing"] for r in records}
    rows = []
    for r in records:
        layer = r["path"].split("-")[-1]  # op or direct
        baseline = f"3-steps-{layer}"
        base = by_key[(baseline, r["dtype"], r["n_tokens"])]
        t = r["timing"]
        n_bytes = r["n_tokens"] * hidden * torch.tensor([], dtype=DTYPES[r["dtype"]]).element_size()
        rows.append(Row.from_timing(
            "allreduce_rmsnorm", r["path"], t, config=f"path={r['path']} hidden={hidden} eps={EPS}",
            dtype=r["dtype"], shape=f"({r['n_tokens']}, {hidden})", world_size=world_size,
            gbps=n_bytes / t.median_s / 1e9, baseline=None if r["path"] == baseline else baseline,
            ratio=None if r["path"] == baseline else base.median_s / t.median_s,
            notes=f"shm steps in one untimed call: {r['shm_steps']}; "
                  "ratio = baseline time / this time; gbps = bytes of x per rank / time"))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", default="1,2,4,8,16", help="comma separated token counts")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma separated, of fp32, bf16, fp16")
    parser.add_argument("--budget-s", type=float, default=0.3, help="target seconds of timed calls per case")
    parser.add_argument("--name", default="allreduce_rmsnorm", help="results file name in bench/results/")
    parser.add_argument("--no-bind", dest="bind", action="store_false", help="do not pin rank r to core r")
    args = parser.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.dtypes = parse_dtypes(parser, args.dtypes)
    rows = to_rows(launch(args.world_size, _bench_rank, args), args.hidden, args.world_size)
    print(f"wrote {write_rows(args.name, rows)}")
    print(markdown_table(rows, ["case", "dtype", "shape", "median_us", "p20_us", "p80_us", "baseline", "ratio"]))
    series = {}
    for row in rows:
        xs, ys = series.setdefault(f"{row.case} {row.dtype}", ([], []))
        xs.append(int(row.shape.strip("()").split(",")[0]))
        ys.append(row.median_us)
    title = f"all-reduce + residual + RMSNorm, {args.world_size} CPU ranks, hidden {args.hidden}"
    png = plot_lines(os.path.join(RESULTS_DIR, f"{args.name}.png"), title, "tokens", "latency (us)", series)
    print(f"wrote {png}")

if __name__ == "__main__":
    main()
