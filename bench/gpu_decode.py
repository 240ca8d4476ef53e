"""Decode tokens/s of the GPT decoder on GPU, measured: the Llama-3-8B shape (random weights, bf16),
batch 1, greedy, through tp_kernels.models.generate as a user calls it; TP=1, and TP=2 with NCCL when
two GPUs are visible. Next to it, the GPU's copy bandwidth measured in the same run, the ceiling a
decode step (which streams every weight once) cannot beat.

    python bench/gpu_decode.py      # rows in bench/results/gpu_decode.{csv,json}

Each row's time is per decode step (one token), median and p20/p80 over rounds of DECODE_STEPS steps after
a warm-up round (Triton JIT, cuBLAS heuristics); gbps = weight bytes per rank / step time;
ceiling_fraction = gbps / the copy bandwidth.
"""
from __future__ import annotations

import datetime
import math
import sys
from typing import List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import RESULTS_DIR, Row, markdown_table, measure_cuda, timing_from_samples, write_rows
from gpu_ranks import parse_args, run_ranks

BENCH = "gpu_decode"
PRESET = "llama-3-8b"  # 8.0 G parameters, 16 GB in bf16: one decode step streams them all
DTYPE = torch.bfloat16
PROMPT_LEN, DECODE_STEPS, ROUNDS = 16, 32, 3
COPY_BYTES = 2 << 30  # a 2 GiB device-to-device copy: far beyond the L2 (50-60 MB on H100/H200)


def copy_gb_per_s() -> float:
    """Device memory bandwidth as a copy sees it: (bytes read + bytes written) / time."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    timing = measure_cuda(lambda: dst.copy_(src))
    del src, dst
    return 2 * COPY_BYTES / timing.median_s / 1e9


def decode_step_seconds(tp, device: str) -> tuple:
    """(per-step seconds of each timed round, weight bytes per rank) of greedy batch-1 decoding."""
    from tp_kernels.models import GPT, ModelArgs, generate

    # layers initialize their weights where they are made (uniform, on the GPU): no host copy of 16 GB
    model = GPT(ModelArgs.from_name(PRESET), tp, dtype=DTYPE, device=device)
    prompt = torch.randint(0, model.args.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    samples: List[float] = []
    weight_bytes = 0
    for round_index in range(ROUNDS + 1):  # round 0 warms up
        _, stats = generate(model, [prompt], DECODE_STEPS + 1, eos_token_ids=())
        if round_index:
            samples.append(stats.decode_s / stats.n_decode_steps)
        weight_bytes = stats.weight_bytes_per_rank
    del model
    torch.cuda.empty_cache()
    return samples, weight_bytes


def _row(world_size: int, samples: List[float], weight_bytes: int, ceiling_gbps: float, note: str) -> Row:
    timing = timing_from_samples(samples)
    gbps = weight_bytes / timing.median_s / 1e9
    return Row.from_timing(BENCH, f"tp={world_size}", timing, config=f"{PRESET} shape, eager, batch 1, greedy",
                           dtype="bfloat16", shape=f"prompt {PROMPT_LEN}, {DECODE_STEPS} steps per round",
                           world_size=world_size, gbps=gbps, ceiling_fraction=gbps / ceiling_gbps,
                           notes=f"{1 / timing.median_s:.1f} tokens/s; ceiling: {ceiling_gbps:.0f} GB/s copy "
                                 f"bandwidth measured in this run{note}")


def _tp2_rank(rank: int, init_file: str, queue) -> None:
    torch.cuda.set_device(rank)
    from tp_kernels.distributed import TPGroup

    tp = TPGroup.init(rank=rank, world_size=2, backend="cpu:gloo,cuda:nccl", init_method=f"file://{init_file}",
                      timeout_s=datetime.timedelta(minutes=2).total_seconds())
    samples, weight_bytes = decode_step_seconds(tp, f"cuda:{rank}")
    if rank == 0:
        queue.put((samples, weight_bytes))
    tp.close()
    dist.destroy_process_group()


def tp2_samples():
    """TP=2 decode on two GPUs (NCCL): rank 0's samples and weight bytes."""
    queue = mp.get_context("spawn").Queue()
    exit_codes = run_ranks(2, _tp2_rank, queue)
    if any(exit_codes):
        raise RuntimeError(f"{BENCH}: TP=2 ranks exited with {exit_codes}")
    return queue.get(timeout=10)


def main(argv=None) -> int:
    args = parse_args(BENCH, __doc__.splitlines()[0], RESULTS_DIR, argv)
    from tp_kernels.distributed import TPGroup

    ceiling = copy_gb_per_s()
    samples, weight_bytes = decode_step_seconds(TPGroup.single(), "cuda")
    rows = [_row(1, samples, weight_bytes, ceiling, "")]
    write_rows(BENCH, rows, args.results_dir)  # TP=1 is kept even if TP=2 fails or runs out of time
    if torch.cuda.device_count() >= 2:
        samples, weight_bytes = tp2_samples()
        rows.append(_row(2, samples, weight_bytes, ceiling, "; NCCL, one GPU per rank"))
    else:
        rows.append(Row(bench=BENCH, case="tp=2", config=f"{PRESET} shape, eager, batch 1, greedy", dtype="bfloat16",
                        shape="", world_size=2, median_us=math.nan, p20_us=math.nan, p80_us=math.nan,
                        notes="needs 2 GPUs (1 visible): NCCL cannot put two ranks on one device"))
    write_rows(BENCH, rows, args.results_dir)
    print(markdown_table(rows, ["case", "config", "median_us", "p20_us", "p80_us", "gbps", "ceiling_fraction",
                                "notes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
