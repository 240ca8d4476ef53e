"""Modeled GPU decode step of a Llama-family decoder under tensor parallelism (everything here is *modeled*).

At batch 1 a decode step is bound by memory: every GPU streams its shard of the weights (and its part of
the KV cache) from HBM once per token. Tensor parallelism divides those bytes by the TP degree but adds
two all-reduces per layer (attention output and MLP down projection), whose cost at decode sizes (one
row of `dim` values, 8-16 KB) is almost all latency. So

    step = (weight bytes + KV-cache bytes per GPU) / HBM bandwidth + 2 * n_layers * all-reduce time

with the all-reduce either NCCL's ring (latency from NCCL's own tuning model) or a one-shot custom
all-reduce over NVLink IPC buffers (tp_kernels.perf.cost_model.HARDWARE's link latency). The model leaves out
kernel launches (CUDA graphs remove most), attention math and the sampling step, so its tokens/s is an
upper bound; the measured gpt-fast figures show how close a real implementation gets.
"""
from __future__ import annotations

from dataclasses import dataclass

from tp_kernels.models.config import ModelArgs
from tp_kernels.perf.cost_model import Hardware

# NCCL's latency model for a small all-reduce with the Ring algorithm and the LL protocol (what it picks
# at 8-16 KB within one NVLink node), from NCCL's src/graph/tuning.cc: base latency 6.6 us per call
# (`baseLat`, Ring/LL) plus 0.6 us per ring step over NVLink (`hwLat[NVLINK]`, Ring/LL); an all-reduce
# ring takes 2 * (p - 1) steps. p = 2, 4, 8 -> 7.8, 10.2, 15.0 us.
NCCL_RING_LL_BASE_US = 6.6
NCCL_RING_LL_NVLINK_STEP_US = 0.6
# The LL protocol sends 8 bytes of flags with every 8 bytes of data: half the link bandwidth carries data.
NCCL_LL_BANDWIDTH_FRACTION = 0.5

ALLREDUCE_KINDS = ("nccl", "custom")
ALL_REDUCES_PER_LAYER = 2  # attention o_proj and MLP down_proj, both row-parallel

# Llama-2 shapes (the published config.json of meta-llama/Llama-2-7b-hf and Llama-2-70b-hf).
LLAMA2_7B = ModelArgs(family="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      intermediate_size=11008, max_seq_len=4096, norm_eps=1e-5)
LLAMA2_70B = ModelArgs(family="llama", vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       intermediate_size=28672, max_seq_len=4096, norm_eps=1e-5)


def _check_tp(args: ModelArgs, tp: int) -> None:
    if args.family != "llama":
        raise ValueError(f"the decode model covers the llama family, got family {args.family!r}")
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    for name in ("n_heads", "intermediate_size", "vocab_size"):
        if getattr(args, name) % tp:
            raise ValueError(f"tp ({tp}) must divide {name} ({getattr(args, name)})")


def n_kv_heads_per_rank(args: ModelArgs, tp: int) -> int:
    """KV heads each rank holds: the heads are split when tp divides them, replicated (one per rank)
    when tp exceeds them."""
    return max(1, args.n_kv_heads // tp)


def params_per_rank(args: ModelArgs, tp: int) -> int:
    """Parameters one rank holds: every matrix sharded tp ways (KV projections by heads, replicated past
    n_kv_heads), the norm weights replicated. At tp = 1 this is args.n_params."""
    _check_tp(args, tp)
    d, hd = args.dim, args.head_dim
    n_heads_per_rank = args.n_heads // tp
    qkv_rows = (n_heads_per_rank + 2 * n_kv_heads_per_rank(args, tp)) * hd
    attn = d * qkv_rows + n_heads_per_rank * hd * d
    attn_bias = qkv_rows * args.qkv_bias + d * args.o_bias  # o_proj's bias is whole on every rank
    mlp = 3 * d * (args.intermediate_size // tp)
    mlp_bias = (2 * args.intermediate_size // tp + d) * args.mlp_bias
    norms = 2 * d
    per_layer = attn + attn_bias + mlp + mlp_bias + norms
    embed_and_head = args.vocab_size // tp * d * (1 if args.tie_word_embeddings else 2)
    return args.n_layers * per_layer + embed_and_head + d  # + the final norm


def weight_bytes_per_rank(args: ModelArgs, tp: int, dtype_bytes: int = 2) -> int:
    """Bytes of weights one GPU streams per decode step."""
    return params_per_rank(args, tp) * dtype_bytes


def kv_cache_bytes_per_rank(args: ModelArgs, tp: int, context_len: int, batch: int = 1,
                            dtype_bytes: int = 2) -> int:
    """Bytes of K and V one GPU reads per decode step at context_len cached tokens."""
    _check_tp(args, tp)
    return 2 * args.n_layers * batch * context_len * n_kv_heads_per_rank(args, tp) * args.head_dim * dtype_bytes


def nccl_all_reduce_s(nbytes: float, tp: int, hw: Hardware) -> float:
    """NCCL ring all-reduce (LL protocol) of nbytes on tp GPUs: NCCL's latency model plus the bytes each
    GPU sends, 2 (p - 1) / p of the payload, at the LL share of the link bandwidth."""
    if tp <= 1:
        return 0.0
    latency_us = NCCL_RING_LL_BASE_US + 2 * (tp - 1) * NCCL_RING_LL_NVLINK_STEP_US
    sent = nbytes * 2 * (tp - 1) / tp
    return latency_us * 1e-6 + sent / (hw.link_gbps * 1e9 * NCCL_LL_BANDWIDTH_FRACTION)


def custom_all_reduce_s(nbytes: float, tp: int, hw: Hardware) -> float:
    """One-shot custom all-reduce on tp GPUs: every GPU reads the p - 1 peers' buffers over NVLink and
    sums them, after one flag barrier (hw.link_latency_us)."""
    if tp <= 1:
        return 0.0
    return hw.link_latency_us * 1e-6 + nbytes * (tp - 1) / (hw.link_gbps * 1e9)


@dataclass(frozen=True)
class DecodeStep:
    """One modeled decode step on one GPU: the memory time (weights, KV cache) and the communication."""

    weight_s: float
    kv_s: float
    comm_s: float
    n_all_reduces: int

    @property
    def total_s(self) -> float:
        return self.weight_s + self.kv_s + self.comm_s

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of one sequence (batch 1)."""
        return 1.0 / self.total_s

    @property
    def comm_fraction(self) -> float:
        return self.comm_s / self.total_s


def decode_step(args: ModelArgs, tp: int, hw: Hardware, allreduce: str = "nccl", context_len: int = 256,
                batch: int = 1, dtype_bytes: int = 2) -> DecodeStep:
    """The modeled decode step of args at TP degree tp on hw, with the given all-reduce ("nccl" or
    "custom"), context_len tokens already cached, in a dtype of dtype_bytes (2: bf16)."""
    if allreduce not in ALLREDUCE_KINDS:
        raise ValueError(f"allreduce must be one of {ALLREDUCE_KINDS}, got {allreduce!r}")
    if context_len < 0 or batch < 1:
        raise ValueError(f"need context_len >= 0 and batch >= 1, got context_len={context_len}, batch={batch}")
    hbm_bytes_per_s = hw.hbm_gbps * 1e9
    weight_s = weight_bytes_per_rank(args, tp, dtype_bytes) / hbm_bytes_per_s
    kv_s = kv_cache_bytes_per_rank(args, tp, context_len, batch, dtype_bytes) / hbm_bytes_per_s
    n_all_reduces = ALL_REDUCES_PER_LAYER * args.n_layers if tp > 1 else 0
    message_bytes = batch * args.dim * dtype_bytes  # (batch, dim) partial sums of a row-parallel layer
    one = nccl_all_reduce_s if allreduce == "nccl" else custom_all_reduce_s
    return DecodeStep(weight_s, kv_s, n_all_reduces * one(message_bytes, tp, hw), n_all_reduces)
