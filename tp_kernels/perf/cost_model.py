"""Analytic cost model: hardware constants with their sources, roofline times, and the chunk count of the
overlapped GEMM + collective ops.

Everything this module returns is *modeled*, never measured; benchmark rows built from it say so. A
`Hardware` is either one of the GPUs of `HARDWARE` (datasheet constants) or calibrated on the running
machine by tp_kernels.perf.calibration (a short measurement, cached).

Pipeline model of an op that splits M into k chunks (tp_kernels.ops.overlap_plan): each chunk is a GEMM of
about M/k rows, g(k), and a collective of its rows, c(k) = alpha + algorithm bytes / link bandwidth.
The first GEMM cannot overlap anything (pipeline fill), nor can the last collective (drain); in between,
k - 1 stages each last max(g, c) plus the part of min(g, c) that the hardware cannot run concurrently:

    T(k) = g(k) + (k - 1) * (max(g, c) + (1 - overlap_efficiency) * min(g, c)) + c(k)

T(1) = g + c is the sequential time. Chunking pays per chunk a GEMM launch, a collective latency and a
re-read of the weight, which is why small M wants k = 1, and hides up to min(g, c) of the time at large M:
the bound is max(T_gemm, T_comm).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")
MAX_CHUNKS = 8


@dataclass(frozen=True)
class Hardware:
    """Peak figures of one GPU and its interconnect (dense math, no sparsity), or the calibrated
    figures of a CPU host."""

    name: str
    tflops_bf16: float  # dense fp16/bf16 tensor-core peak, TFLOP/s
    tflops_fp32: float  # fp32 (non-tensor-core) peak, TFLOP/s
    hbm_gbps: float  # memory bandwidth, GB/s
    link_gbps: float  # NVLink bandwidth per GPU per direction, GB/s
    link_latency_us: float  # one small all-reduce step across the NVLink fabric, us
    source: str
    # Fixed host + device cost of one GEMM call (launch, ramp-up, tail), us. GPU default 5 us: the
    # order of a CUDA kernel launch as NVIDIA's CUDA Graphs post states it ("a few microseconds");
    # an assumption, not a measurement. Calibrated on CPU.
    launch_overhead_us: float = 5.0
    # Fraction of the shorter of (chunk GEMM, chunk collective) that runs concurrently with the longer.
    # GPU default 1.0 (copy/NVLink engines and SMs separate: the ideal); CPU calibrated, since there the
    # collective's copies and sums run on the same cores as the GEMM.
    overlap_efficiency: float = 1.0
    # Fraction of the roofline a real GEMM reaches; 1.0 models the roofline itself.
    gemm_efficiency: float = 1.0


HARDWARE = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s dense BF16, 67 TFLOP/s FP32, 3.35 TB/s
    # HBM3, NVLink 900 GB/s bidirectional per GPU (450 GB/s each way).
    "H100": Hardware("H100-SXM5-80GB", 989.0, 67.0, 3350.0, 450.0, 5.0,
                     "NVIDIA H100 datasheet (SXM5); latency: ~5 us one-shot custom all-reduce on 8 GPUs, "
                     "as reported by vLLM/TensorRT-LLM custom all-reduce write-ups"),
    # NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s dense BF16, 19.5 TFLOP/s FP32, 2,039 GB/s HBM2e,
    # NVLink 600 GB/s bidirectional per GPU (300 GB/s each way).
    "A100": Hardware("A100-SXM4-80GB", 312.0, 19.5, 2039.0, 300.0, 7.0,
                     "NVIDIA A100 datasheet (SXM4 80GB); latency as for H100, scaled for NVLink 3"),
    # H800 SXM5: the H100 SXM5 compute and HBM3 with NVLink cut to 400 GB/s bidirectional per GPU
    # (200 GB/s each way), as NVIDIA's H800 product listing states. The GPU of the Flux paper's anchor
    # (Chang et al. 2024, arXiv:2406.06858), which bench/gemm_overlap_model.py compares against.
    "H800": Hardware("H800-SXM5-80GB", 989.0, 67.0, 3350.0, 200.0, 5.0,
                     "NVIDIA H800 SXM5 listing: H100 SXM5 compute/HBM, NVLink 400 GB/s bidirectional; "
                     "latency as for H100"),
}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def roofline_time_s(flops: float, bytes_moved: float, hw: Hardware, dtype: torch.dtype = torch.bfloat16) -> float:
    """max(compute time, memory time) at peak: the lower bound a perfect kernel approaches."""
    peak_tflops = hw.tflops_fp32 if dtype == torch.float32 else hw.tflops_bf16
    return max(flops / (peak_tflops * 1e12), bytes_moved / (hw.hbm_gbps * 1e9))


# ----------------------------------------------------------------------------------------------------------
# GEMM + collective pipeline
# ----------------------------------------------------------------------------------------------------------
def gemm_time_s(m: int, n: int, k: int, dtype: torch.dtype, hw: Hardware) -> float:
    """One (m, k) x (k, n) GEMM: the roofline (reading both operands, writing the output) at the
    hardware's GEMM efficiency, plus the fixed cost of a call."""
    b = dtype_bytes(dtype)
    bytes_moved = (m * k + n * k + m * n) * b
    return roofline_time_s(2.0 * m * n * k, bytes_moved, hw, dtype) / hw.gemm_efficiency + hw.launch_overhead_us * 1e-6


def collective_time_s(nbytes: float, world_size: int, hw: Hardware, collective: str = "all_reduce") -> float:
    """A bandwidth-optimal collective over world_size ranks on a payload of nbytes per rank (the
    all-reduce's input, the reduce-scatter's input, the all-gather's output): latency plus the bytes
    each rank sends, 2 (p-1)/p of the payload for an all-reduce, (p-1)/p for the other two."""
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
    if world_size <= 1:
        return 0.0
    share = (world_size - 1) / world_size
    sent = nbytes * (2.0 * share if collective == "all_reduce" else share)
    return hw.link_latency_us * 1e-6 + sent / (hw.link_gbps * 1e9)


def _collective_payload(m: int, n: int, k: int, collective: str) -> int:
    """Elements of the collective's payload: the GEMM output (m, n) for the reductions, the gathered
    input (m, k) for the all-gather."""
    return m * (k if collective == "all_gather" else n)


def pipeline_time_s(m: int, n: int, k: int, world_size: int, dtype: torch.dtype, hw: Hardware, chunks: int,
                    collective: str = "all_reduce") -> float:
    """T(chunks) of the module docstring for this rank's GEMM (m, k) x (k, n) and its collective.
    chunks = 1 is the sequential time, GEMM then collective."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    rows = math.ceil(m / chunks)  # the largest chunk sets the pace of the stages
    g = gemm_time_s(rows, n, k, dtype, hw)
    c = collective_time_s(_collective_payload(rows, n, k, collective) * dtype_bytes(dtype), world_size, hw,
                          collective)
    stage = max(g, c) + (1.0 - hw.overlap_efficiency) * min(g, c)
    return g + (chunks - 1) * stage + c


def overlap_bound_s(m: int, n: int, k: int, world_size: int, dtype: torch.dtype, hw: Hardware,
                    collective: str = "all_reduce") -> float:
    """max(T_gemm, T_comm) of the unchunked op: what perfect overlap would reach."""
    g = gemm_time_s(m, n, k, dtype, hw)
    c = collective_time_s(_collective_payload(m, n, k, collective) * dtype_bytes(dtype), world_size, hw, collective)
    return max(g, c)


@functools.lru_cache(maxsize=4096)
def _argmin_chunks(m: int, n: int, k: int, world_size: int, dtype: torch.dtype, hw: Hardware, collective: str,
                   max_chunks: int) -> int:
    candidates = range(1, min(max_chunks, m) + 1)
    # min() keeps the first of equal times: ties go to fewer chunks
    return min(candidates, key=lambda c: pipeline_time_s(m, n, k, world_size, dtype, hw, c, collective))


@functools.lru_cache(maxsize=4096)
def best_chunks(m: int, n: int, k: int, world_size: int, dtype: torch.dtype, hw: Hardware,
                collective: str = "all_reduce", max_chunks: int = MAX_CHUNKS) -> int:
    """The chunk count in [1, max_chunks] that minimizes T(k) for this rank's GEMM (m, k) x (k, n)
    followed by `collective` over world_size ranks. 1 for m = 1 and for one rank.

    The choice is made at power-of-two buckets of m and is the largest argmin over the buckets up to m.
    That makes it non-decreasing in m by construction: the argmin alone is not, since a pipeline whose
    bottleneck switches from the collective to the GEMM between two sizes can prefer fewer chunks at
    the larger one. Serving code buckets token counts to powers of two anyway (CUDA graph batch sizes).
    """
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"m, n, k must be >= 1, got {m}, {n}, {k}")
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    if world_size <= 1 or m == 1:
        return 1  # nothing to overlap with / nothing to split
    best, bucket = 1, 2
    while bucket <= m:
        best = max(best, _argmin_chunks(bucket, n, k, world_size, dtype, hw, collective, max_chunks))
        bucket *= 2
    return best


# ----------------------------------------------------------------------------------------------------------
# Latency-bound streaming (decode GEMMs): Little's law
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryLatency:
    """What bounds a kernel that streams its operands with few loads in flight: by Little's law it moves
    (bytes in flight) / (memory latency) per second, whatever the HBM peak."""

    sm_count: int
    dram_latency_ns: float  # loaded latency of a global load that misses L2
    source: str


# SM counts: datasheets (H100 SXM5 132, A100 SXM4 108; H800 SXM5 as H100). The latency is an assumption,
# not a measurement: 700 ns, the figure behind issue 18's estimate for the old decode tiles (40 programs
# x ~12 KB in flight -> ~0.7 TB/s); idle pointer-chase latencies are lower, a loaded memory system's higher.
MEMORY_LATENCY = {
    "H100-SXM5-80GB": MemoryLatency(132, 700.0, "H100 datasheet (132 SMs); latency 700 ns assumed"),
    "H800-SXM5-80GB": MemoryLatency(132, 700.0, "as H100 SXM5; latency 700 ns assumed"),
    "A100-SXM4-80GB": MemoryLatency(108, 700.0, "A100 datasheet (108 SMs); latency 700 ns assumed"),
}


def streaming_bandwidth_gbps(n_programs: int, bytes_in_flight_per_program: float, hw: Hardware,
                             programs_per_sm: int = 1) -> float:
    """The bandwidth a kernel of n_programs reaches when each keeps bytes_in_flight_per_program of
    loads outstanding: resident programs x bytes in flight / latency, at most the HBM peak. At most
    programs_per_sm programs run on an SM at once (shared memory and registers decide)."""
    latency = MEMORY_LATENCY[hw.name]
    resident = min(n_programs, latency.sm_count * programs_per_sm)
    little = resident * bytes_in_flight_per_program / (latency.dram_latency_ns * 1e-9) / 1e9
    return min(hw.hbm_gbps, little)


def latency_bound_time_s(flops: float, bytes_moved: float, n_programs: int, bytes_in_flight_per_program: float,
                         hw: Hardware, dtype: torch.dtype = torch.bfloat16, programs_per_sm: int = 1) -> float:
    """roofline_time_s with the memory term at streaming_bandwidth_gbps instead of the HBM peak: the
    floor when enough bytes are in flight, longer when too few programs keep too few loads outstanding."""
    peak_tflops = hw.tflops_fp32 if dtype == torch.float32 else hw.tflops_bf16
    bandwidth = streaming_bandwidth_gbps(n_programs, bytes_in_flight_per_program, hw, programs_per_sm)
    return max(flops / (peak_tflops * 1e12), bytes_moved / (bandwidth * 1e9))


# ----------------------------------------------------------------------------------------------------------
# fused GEMM + collective (tp_kernels/kernels/gemm_collective*.py): one kernel, tile-level overlap
# ----------------------------------------------------------------------------------------------------------
FORMS = ("pipeline", "fused")
FUSED_ALGOS = ("one_shot", "two_shot")


def _fused_tile(m_rows: int, dtype: torch.dtype):
    # torch only, no triton; the table's own dtype class and row bucket rules
    from tp_kernels.kernels.gemm_collective_configs import FUSED_TILES, dtype_class, m_bucket

    return FUSED_TILES[dtype_class(dtype)][m_bucket(m_rows)]


def fused_time_s(m: int, n: int, k: int, world_size: int, dtype: torch.dtype, hw: Hardware,
                 collective: str = "all_reduce", algo: str = "two_shot") -> float:
    """Modeled time of the fused kernel for this rank's GEMM (m, k) x (k, n) and `collective`.

    One launch; the output tiles run in W waves of one tile per SM. A wave's tiles go to their owners
    (or, for the all-gather, its rows arrive) while the next wave computes, so the collective is cut
    into W pieces with no launch, no weight re-read and no collective latency per piece:

        T = g + (W - 1) * (max(g, c) + (1 - overlap_efficiency) * min(g, c)) / W + c / W + phases * L

    g is the GEMM's roofline time with its one launch, c the collective's bytes over the link, L the
    latency of one signal round, paid once per phase the protocol waits: the all-reduce (algo) is
    "one_shot" (every rank pulls (p - 1) partials: one phase) or "two_shot" (2 (p - 1) / p of the bytes,
    two phases); the kernel's launcher picks by the CUDA IPC all-reduce's rule (ipc_plan.choose_algorithm,
    which callers pass on: this module cannot import ipc_plan, which imports it).
    The chunk pipeline is the same formula with W = k chunks plus, per chunk, a launch, a weight re-read
    and a collective latency. Both forms' collectives are modeled link-bound (their HBM traffic, alike
    in both, is left out)."""
    if collective not in COLLECTIVES:
        raise ValueError(f"collective must be one of {COLLECTIVES}, got {collective!r}")
    if algo not in FUSED_ALGOS:
        raise ValueError(f"algo must be one of {FUSED_ALGOS}, got {algo!r}")
    g = gemm_time_s(m, n, k, dtype, hw)
    if world_size <= 1:
        return g
    payload = _collective_payload(m, n, k, collective) * dtype_bytes(dtype)
    c = collective_time_s(payload, world_size, hw, collective) - hw.link_latency_us * 1e-6  # bandwidth part
    phases = 1
    if collective == "all_reduce":
        if algo == "one_shot":
            c = (world_size - 1) * payload / (hw.link_gbps * 1e9)
        else:
            phases = 2
    rows = m if collective == "all_gather" else -(-m // world_size)  # rows of a tile's block
    block_m, block_n = _fused_tile(rows, dtype)
    tiles = -(-m // block_m) * -(-n // block_n)
    # one tile per SM and wave (SM counts: MEMORY_LATENCY); a hardware without an entry (a calibrated CPU
    # host) runs every tile in its own wave
    sms = MEMORY_LATENCY[hw.name].sm_count if hw.name in MEMORY_LATENCY else 1
    waves = max(1, -(-tiles // sms))
    stage = max(g, c) + (1.0 - hw.overlap_efficiency) * min(g, c)
    return g / waves + (waves - 1) * stage / waves + c / waves + phases * hw.link_latency_us * 1e-6


def best_form(m: int, n: int, k: int, world_size: int, dtype: torch.dtype, hw: Hardware,
              collective: str = "all_reduce", algo: str = "two_shot"):
    """(form, chunks, modeled seconds): the fused kernel (its all-reduce algo as in fused_time_s) or the
    chunk pipeline with its best chunk count, whichever the model says is faster (ties go to the fused
    kernel: one launch)."""
    chunks = best_chunks(m, n, k, world_size, dtype, hw, collective)
    pipeline = pipeline_time_s(m, n, k, world_size, dtype, hw, chunks, collective)
    fused = fused_time_s(m, n, k, world_size, dtype, hw, collective, algo)
    return ("fused", 1, fused) if fused <= pipeline else ("pipeline", chunks, pipeline)
