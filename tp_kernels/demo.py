"""`make demo`: the `tiny` preset with seeded random weights generates 32 tokens at TP=1 in this process
and at TP=2 on two CPU ranks (gloo); the TP=2 tokens must equal the TP=1 tokens on both ranks. Prints
tokens/s for both and exits non-zero on a mismatch."""
from __future__ import annotations

import sys

import torch

PRESET = "tiny"
WEIGHT_SEED = 1234
MAX_NEW_TOKENS = 32
PROMPT = "Tensor parallelism splits each weight matrix across devices."


def _generate(tp):
    """Greedy tokens and stats of the demo model on this rank (after an untimed warm-up call)."""
    from tp_kernels.models import GPT, generate
    from tp_kernels.models.tokenizer import ByteTokenizer

    model = GPT.from_preset(PRESET, tp, seed=WEIGHT_SEED)
    prompt = ByteTokenizer().encode(PROMPT)
    generate(model, [prompt], 2)  # warm-up: the first custom-op call imports torch._dynamo (seconds)
    tokens, stats = generate(model, [prompt], MAX_NEW_TOKENS)
    return tokens[0], stats


def main() -> int:
    from tp_kernels.distributed import TPGroup
    from tp_kernels.models.launch import run_on_cpu_ranks

    torch.set_num_threads(1)  # the same one thread per rank as the TP=2 ranks get on 2 cores
    expected, stats_1 = _generate(TPGroup.single())
    per_rank = run_on_cpu_ranks(2, _generate)
    print(f"preset {PRESET!r}, seeded random weights, prompt {PROMPT!r}, {MAX_NEW_TOKENS} new tokens (greedy)")
    print(f"TP=1 tokens: {expected}")
    for label, (_, stats) in (("TP=1", (expected, stats_1)), ("TP=2", per_rank[0])):
        print(f"{label}: prefill {stats.prefill_tokens_per_s:8.1f} tokens/s, decode {stats.decode_tokens_per_s:8.1f} "
              "tokens/s (CPU, wall clock)")
    mismatched = [rank for rank, (tokens, _) in enumerate(per_rank) if tokens != expected]
    if mismatched:
        for rank in mismatched:
            print(f"TP=2 rank {rank} tokens: {per_rank[rank][0]}")
        print(f"FAIL: TP=2 ranks {mismatched} generated other tokens than TP=1")
        return 1
    print("OK: TP=2 tokens equal TP=1 tokens on both ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
