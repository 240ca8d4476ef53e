"""`make demo`: what tensor parallelism buys a decode step. The `llama-156m` preset (156 M parameters,
fp32, seeded random weights: 623 MB, so a step streams its weights from memory as a GPU step streams HBM)
generates 32 tokens greedily at TP=1 (this process, on every core) and at TP=2 (two CPU ranks of one
thread, gloo + the shared-memory all-reduce). Each run also measures its roofline in place: the GB/s a
matrix-vector product streams (tp_kernels.models.roofline), over the bytes a step reads per rank. Prints
tokens/s, the fraction of the roofline and the TP=2 speed-up; exits non-zero unless both TP=2 ranks
generated exactly the TP=1 tokens."""
from __future__ import annotations

import os
import sys

import torch

PRESET = "llama-156m"
WEIGHT_SEED = 1234
MAX_NEW_TOKENS = 32
PROMPT = "Tensor parallelism splits each weight matrix across devices."


def _generate(tp):
    """(greedy tokens, GenerationStats, this rank's matrix-vector GB/s) on this rank, after a warm-up."""
    from tp_kernels.models import GPT, generate
    from tp_kernels.models.roofline import gemv_gbps, gemv_gbps_on_all_ranks
    from tp_kernels.models.tokenizer import ByteTokenizer

    model = GPT.from_preset(PRESET, tp, seed=WEIGHT_SEED)
    prompt = ByteTokenizer().encode(PROMPT)
    generate(model, [prompt], 2)  # warm-up: the first custom-op call imports torch._dynamo (seconds)
    gbps = gemv_gbps_on_all_ranks(tp) if tp.world_size > 1 else gemv_gbps(torch.get_num_threads())
    tokens, stats = generate(model, [prompt], MAX_NEW_TOKENS)
    return tokens[0], stats, gbps


def _line(label: str, stats, gbps: float) -> str:
    ceiling = gbps * 1e9 / stats.decode_bytes_per_rank
    return (f"{label}: decode {stats.decode_tokens_per_s:6.1f} tokens/s = "
            f"{100 * stats.decode_tokens_per_s / ceiling:3.0f}% of its roofline ({ceiling:.1f} tokens/s: "
            f"{stats.decode_bytes_per_rank / 1e6:.0f} MB read per rank and step at {gbps:.1f} GB/s)")


def main() -> int:
    from tp_kernels.distributed import TPGroup
    from tp_kernels.models import PRESETS
    from tp_kernels.models.launch import run_on_cpu_ranks

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)  # TP=1 gets the whole machine, as the two TP=2 ranks do together
    expected, stats_1, gbps_1 = _generate(TPGroup.single())
    per_rank = run_on_cpu_ranks(2, _generate)
    _, stats_2, _ = per_rank[0]
    gbps_2 = sum(gbps for _, _, gbps in per_rank) / len(per_rank)  # per rank, both streaming at once
    print(f"preset {PRESET!r}: {PRESETS[PRESET].n_params / 1e6:.0f} M parameters, fp32, seeded random weights; "
          f"prompt {PROMPT!r}; {MAX_NEW_TOKENS} new tokens, greedy (CPU wall clock)")
    print(f"TP=1 tokens: {expected[:12]} ...")
    print(_line(f"TP=1 (1 process x {cores} threads)", stats_1, gbps_1))
    print(_line("TP=2 (2 processes x 1 thread) ", stats_2, gbps_2)
          + f"; {stats_2.decode_tokens_per_s / stats_1.decode_tokens_per_s:.2f}x TP=1")
    mismatched = [rank for rank, (tokens, _, _) in enumerate(per_rank) if tokens != expected]
    if mismatched:
        for rank in mismatched:
            print(f"TP=2 rank {rank} tokens: {per_rank[rank][0]}")
        print(f"FAIL: TP=2 ranks {mismatched} generated other tokens than TP=1")
        return 1
    print("OK: TP=2 tokens equal TP=1 tokens on both ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
