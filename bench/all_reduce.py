"""All-reduce latency and algorithm bandwidth on CPU ranks: the shared-memory communicator (called directly
and through tp_kernels.ops.all_reduce) against gloo (torch.distributed.all_reduce) in the same run, with
the memory-bandwidth floor of each size.

    python bench/all_reduce.py                      # 2 ranks, fp32 + bf16, 4 KiB .. 64 MiB
    python bench/all_reduce.py --sizes 4K,1M --dtypes fp32 --world-size 4

Writes bench/results/all_reduce.{csv,json} and all_reduce_{latency,algbw}.png.

Paths, timed in interleaved rounds (--rounds; in each round every path runs one block of calls after a
barrier, so a change of the host's load hits every path alike; rank 0's times are reported):
  shm-direct  ShmCommunicator.all_reduce(x): the communicator call, output allocated per call
  shm-direct-out  ShmCommunicator.all_reduce(x, out): into a preallocated output (no page faults)
  shm-inplace ShmCommunicator.all_reduce(buf, buf): in place, like gloo and DeepSpeed's inference_all_reduce
  shm-op      tp_kernels.ops.all_reduce(x, tp): the torch op (Python wrapper, dispatcher, autograd check, the
              C++ CPU kernel, a new output): compare with shm-direct
  shm-op-inplace  tp_kernels.ops.all_reduce_(buf, tp): the in-place op: compare with shm-inplace
  gloo        torch.distributed.all_reduce(buf, group) in place on a preallocated buffer
  touch       buf.add_(1) on every rank at once: not an all-reduce, the read + write of the message on every
              core that an in-place all-reduce cannot avoid (a floor that counts the cores' shared memory bus)
Rank r runs on core r (mod the core count) unless --no-bind: on a 2-core host an unbound pair of spinning
ranks is sometimes scheduled onto one core, which turns a 40 us call into a millisecond one.
Floor: an all-reduce must at least copy its N-byte input to where the peers can read it and write the
N-byte result, so `floor = 2 x (time of one N-byte single-core copy, measured in the same run)`.
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import (RESULTS_DIR, Row, Timing, markdown_table, measure, plot_lines, timing_from_samples,
                          write_rows)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtypes(parser: argparse.ArgumentParser, text: str) -> list:
    """--dtypes "fp32,bf16" -> ["fp32", "bf16"]; an unknown name is a usage error."""
    names = [d.strip() for d in text.split(",")]
    unknown = set(names) - set(DTYPES)
    if unknown:
        parser.error(f"--dtypes must be of {sorted(DTYPES)}, got {sorted(unknown)}")
    return names
DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B").rstrip("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def size_label(n_bytes: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n_bytes >= scale and n_bytes % scale == 0:
            return f"{n_bytes // scale}{unit}"
    return str(n_bytes)


# ----------------------------------------------------------------------------------------------------------
# ranks
# ----------------------------------------------------------------------------------------------------------
def launch(world_size: int, fn: Callable, args: argparse.Namespace) -> list:
    """Run fn(tp, args) on world_size fresh CPU ranks (gloo, file:// rendezvous); rank 0's return value."""
    with tempfile.TemporaryDirectory(prefix="tpk-bench-") as tmp:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, os.path.join(tmp, "init"), fn, args, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outcome = results.get()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"benchmark ranks exited with codes {[p.exitcode for p in procs]}")
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _rank_main(rank, world_size, init_file, fn, args, results):
    torch.set_num_threads(1)  # one core per rank: more threads only oversubscribe a small host
    if args.bind:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    from tp_kernels.distributed import TPGroup

    tp = TPGroup.from_group()
    try:
        out = fn(tp, args)
        if rank == 0:
            results.put(out)
    except BaseException as exc:  # noqa: BLE001  (shown by the parent)
        if rank == 0:
            results.put(RuntimeError(f"rank 0 failed: {exc!r}"))
        raise
    finally:
        tp.close()
        dist.destroy_process_group()


def agreed_repeats(fn: Callable[[], object], budget_s: float, lo: int, hi: int) -> int:
    """How many timed calls fit in budget_s, estimated on rank 0 and broadcast: every rank must make the
    same number of collective calls (measure()'s time-based loop could differ between ranks)."""
    import time

    fn()
    t0 = time.perf_counter()
    fn()
    fn()
    per_call = (time.perf_counter() - t0) / 2
    count = [max(lo, min(hi, int(budget_s / max(per_call, 1e-7))))]
    dist.broadcast_object_list(count, src=0)
    return count[0]


def shm_steps_of_one_call(fn: Callable[[], object], comms) -> int:
    """The steps one untimed call of fn runs on the shm communicators `comms` (every rank makes the call): a
    row's proof of the backend it names, > 0 for a path through shared memory, 0 for gloo or no collective."""
    before = sum(c.sequence for c in comms)
    fn()
    return sum(c.sequence for c in comms) - before


def check_backend_proof(path: str, shm_steps: int, through_shm: bool) -> None:
    """Raises unless the path did (through_shm) or did not run steps on the shm communicator."""
    if (shm_steps > 0) != through_shm:
        raise RuntimeError(f"path {path!r} ran {shm_steps} shm steps in one call: it "
                           f"{'did not reach' if through_shm else 'reached'} the shared-memory communicator")


def time_collective(fn: Callable[[], object], budget_s: float) -> Timing:
    """One path's calls back to back after a barrier (bench/allreduce_rmsnorm.py)."""
    repeats = agreed_repeats(fn, budget_s, lo=10, hi=20000)
    dist.barrier()
    return measure(fn, warmup=3, repeats=repeats)


def time_interleaved(paths: Dict[str, Callable[[], object]], budget_s: float, rounds: int) -> Dict[str, Timing]:
    """Every path's per-call times over `rounds` rounds; in each round each path runs one block of calls
    (budget_s / rounds of them, agreed by the ranks) right after a barrier."""
    import time

    repeats = {path: agreed_repeats(fn, budget_s / rounds, lo=10, hi=20000) for path, fn in paths.items()}
    samples: Dict[str, List[float]] = {path: [] for path in paths}
    for _ in range(rounds):
        for path, fn in paths.items():
            fn()  # warm-up of this block (caches, the branch predictor) after the other path's block
            dist.barrier()
            for _ in range(repeats[path]):
                t0 = time.perf_counter()
                fn()
                samples[path].append(time.perf_counter() - t0)
    return {path: timing_from_samples(times) for path, times in samples.items()}


def _bench_rank(tp, args) -> List[dict]:
    from tqdm import tqdm

    from tp_kernels import ops

    group_comm = comm = tp.communicator_for(torch.ones(1))
    if comm.name != "shm":
        raise RuntimeError(f"expected the shm communicator in the chain, got {comm.name}")
    if args.slot_kib is not None:  # a private communicator with another slot size (collective)
        from tp_kernels.comm.shm import ShmCommunicator

        comm = ShmCommunicator(tp.process_group, tp.rank, tp.world_size, tp.name + "/bench",
                               slot_bytes=args.slot_kib * 1024)
    for configured in {group_comm, comm}:  # the op rows use the group's communicator
        if args.one_shot_max_kib is not None:
            configured.one_shot_max_bytes = args.one_shot_max_kib * 1024
        configured.publish_stores = args.publish_stores
    cases = [(dtype_name, size) for dtype_name in args.dtypes for size in args.sizes]
    records = []
    bar = tqdm(cases, desc="all_reduce", disable=tp.rank != 0)
    for dtype_name, n_bytes in bar:
        dtype = DTYPES[dtype_name]
        numel = n_bytes // torch.tensor([], dtype=dtype).element_size()
        x = torch.randn(numel).to(dtype)
        buf, buf_op, out, touched = x.clone(), x.clone(), torch.empty_like(x), x.clone()
        src, dst = torch.randn(numel).to(dtype), torch.empty(numel, dtype=dtype)
        paths = {
            "shm-direct": lambda: comm.all_reduce(x),
            "shm-direct-out": lambda: comm.all_reduce(x, out),
            "shm-inplace": lambda: comm.all_reduce(buf, buf),
            "shm-op": lambda: ops.all_reduce(x, tp),
            "shm-op-inplace": lambda: ops.all_reduce_(buf_op, tp),
            "gloo": lambda: dist.all_reduce(buf, group=tp.process_group),
            "touch": lambda: touched.add_(1),
        }
        if args.no_gloo:
            paths.pop("gloo")
        bar.set_postfix_str(f"{dtype_name} {size_label(n_bytes)}")
        shm_steps = {path: shm_steps_of_one_call(fn, {group_comm, comm}) for path, fn in paths.items()}
        for path, steps in shm_steps.items():
            check_backend_proof(path, steps, through_shm=path.startswith("shm"))
        for path, timing in time_interleaved(paths, args.budget_s * len(paths), args.rounds).items():
            records.append(dict(path=path, dtype=dtype_name, n_bytes=n_bytes, timing=timing, shm_steps=shm_steps[path]))
        copy = measure(lambda: dst.copy_(src), warmup=3, repeats=max(10, min(2000, int(2e9 / max(n_bytes, 1)))))
        # rank 0's learned cost of either kind of publishing stores for this size, after its calls
        records.append(dict(path="copy", dtype=dtype_name, n_bytes=n_bytes, timing=copy,
                            store_estimates=comm._native.store_estimates(n_bytes)))
    if args.slot_kib is not None:
        comm.close()
    return [dict(r, isa=type(comm._native).reduce_isa, slot_bytes=comm.slot_bytes,
                 one_shot_max_bytes=comm.one_shot_max_bytes, publish_stores=comm.publish_stores) for r in records]


# ----------------------------------------------------------------------------------------------------------
# rows, table, plots
# ----------------------------------------------------------------------------------------------------------
def to_rows(records: List[dict], world_size: int) -> List[Row]:
    by_key = {(r["path"], r["dtype"], r["n_bytes"]): r["timing"] for r in records}
    rows = []
    for r in records:
        if r["path"] == "copy":
            continue
        t, n_bytes = r["timing"], r["n_bytes"]
        floor_s = 2 * by_key[("copy", r["dtype"], n_bytes)].median_s
        gloo = None if r["path"] == "touch" else by_key.get(("gloo", r["dtype"], n_bytes))
        config = (f"path={r['path']} slot={r['slot_bytes']} one_shot_max={r['one_shot_max_bytes']} "
                  f"publish_stores={r['publish_stores']} isa={r['isa']}")
        rows.append(Row.from_timing(
            "all_reduce", r["path"], t, config=config, dtype=r["dtype"], shape=size_label(n_bytes),
            world_size=world_size, gbps=n_bytes / t.median_s / 1e9, ceiling_fraction=floor_s / t.median_s,
            baseline=None if gloo is None or r["path"] == "gloo" else "gloo",
            ratio=None if gloo is None or r["path"] == "gloo" else gloo.median_s / t.median_s,
            notes=(f"shm steps in one untimed call: {r['shm_steps']}; "
                   f"floor {floor_s * 1e6:.1f} us = 2 x measured {size_label(n_bytes)} single-core copy; "
                   "ceiling_fraction = floor / median; gbps = algbw (bytes / time); ratio = gloo / this")))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"bytes per rank, comma separated (default {DEFAULT_SIZES})")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma separated, of fp32, bf16, fp16")
    parser.add_argument("--budget-s", type=float, default=0.3, help="target seconds of timed calls per path and case")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of blocks per case (default 3)")
    parser.add_argument("--slot-kib", type=int, default=None, help="use a communicator with this slot size")
    parser.add_argument("--one-shot-max-kib", type=int, default=None, help="one-shot up to this size, two-shot above")
    parser.add_argument("--no-gloo", action="store_true", help="skip the gloo rows (and ratios)")
    parser.add_argument("--publish-stores", default="auto", choices=["auto", "ordinary", "non-temporal"],
                        help="how two-shot calls publish into the slots (ShmCommunicator.publish_stores)")
    parser.add_argument("--no-bind", dest="bind", action="store_false", help="do not pin rank r to core r")
    parser.add_argument("--name", default="all_reduce", help="results file name in bench/results/")
    args = parser.parse_args(argv)
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.dtypes = parse_dtypes(parser, args.dtypes)
    records = launch(args.world_size, _bench_rank, args)
    rows = to_rows(records, args.world_size)
    print(f"wrote {write_rows(args.name, rows)}")
    if args.publish_stores == "auto":
        print("rank 0's learned two-shot cost per byte by kind of publishing stores (publish_stores='auto'; "
              "0: not measured, below 64 KiB or one-shot):")
        for r in records:
            if r["path"] == "copy":
                ordinary, non_temporal = (v * 1e9 for v in r["store_estimates"])
                print(f"  {r['dtype']} {size_label(r['n_bytes'])}: ordinary {ordinary:.3f} ns/B, non-temporal "
                      f"{non_temporal:.3f} ns/B")
    print(markdown_table(rows, ["case", "dtype", "shape", "median_us", "p20_us", "p80_us", "gbps", "ratio",
                                "ceiling_fraction"]))
    for metric, label in (("median_us", "latency (us)"), ("gbps", "algbw (GB/s)")):
        series = {}
        for row in rows:
            xs, ys = series.setdefault(f"{row.case} {row.dtype}", ([], []))
            xs.append(parse_size(row.shape))
            ys.append(getattr(row, metric))
        path = plot_lines(os.path.join(RESULTS_DIR, f"{args.name}_{'latency' if metric == 'median_us' else 'algbw'}.png"),
                          f"all-reduce, {args.world_size} CPU ranks", "bytes per rank", label, series)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
