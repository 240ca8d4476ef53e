"""Analytic GPU cost model: hardware constants with their sources, and roofline times.

Everything this module returns is *modeled*, never measured; benchmark rows built from it say so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hardware:
    """Peak figures of one GPU and its interconnect (dense math, no sparsity)."""

    name: str
    tflops_bf16: float  # dense fp16/bf16 tensor-core peak, TFLOP/s
    tflops_fp32: float  # fp32 (non-tensor-core) peak, TFLOP/s
    hbm_gbps: float  # memory bandwidth, GB/s
    link_gbps: float  # NVLink bandwidth per GPU per direction, GB/s
    link_latency_us: float  # one small all-reduce step across the NVLink fabric, us
    source: str


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
}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def roofline_time_s(flops: float, bytes_moved: float, hw: Hardware, dtype: torch.dtype = torch.bfloat16) -> float:
    """max(compute time, memory time) at peak: the lower bound a perfect kernel approaches."""
    peak_tflops = hw.tflops_fp32 if dtype == torch.float32 else hw.tflops_bf16
    return max(flops / (peak_tflops * 1e12), bytes_moved / (hw.hbm_gbps * 1e9))
