"""Registers, spills and shared memory of every Triton kernel config, compiled ahead of time for sm_80
and sm_90 (no GPU needed). Prints a Markdown table and writes bench/results/kernel_resources.csv with
columns kernel, config, arch, registers, spills, shared_bytes and the global stores of the PTX by width
(vector_stores, scalar_stores).

    python bench/kernel_resources.py [--jobs 2]
"""
import argparse
import csv
import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, not the interpreter's Python functions

from common import RESULTS_DIR  # noqa: E402
from tp_kernels.kernels import resources  # noqa: E402

COLUMNS = ["kernel", "config", "arch", "registers", "spills", "shared_bytes", "vector_stores", "scalar_stores"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    rows = [dataclasses.asdict(r) for r in resources.collect(args.jobs)]
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, "kernel_resources.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
