"""What the GPU benchmarks that `make gpu-check` runs share: their command line (a results directory; without
a GPU, one line and exit status 2) and starting their rank processes."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Callable, List, Optional, Sequence

import torch
import torch.multiprocessing as mp


def parse_args(name: str, description: str, default_results_dir: str,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The benchmark's arguments; exits with status 2 and one line when no GPU is visible."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results-dir", default=default_results_dir)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA GPU visible; nothing measured", file=sys.stderr)
        raise SystemExit(2)
    return args


def run_ranks(world_size: int, target: Callable, *args) -> List[int]:
    """target(rank, init_file, *args) in world_size spawned processes (rendezvous through init_file, a
    file:// path in a temporary directory); their exit codes once all have ended."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(rank, os.path.join(tmp, "init"), *args))
                 for rank in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    return [p.exitcode for p in procs]
