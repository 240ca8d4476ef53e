"""Launchers of the fused GEMM + collective kernels: `gemm_reduce_scatter`, `gemm_all_reduce` and
`allgather_gemm` over a group's symmetric buffers (tp_kernels.comm.symmetric). Each checks its
arguments, plans the call (tiles, buffer regions, algorithm: `plan_*`, pure Python, also what the ops ask
to decide whether a call fits the buffer), launches one kernel and, on CPU, raises if a rank did not
arrive. The kernels: gemm_collective_reduce.py, gemm_collective_gather.py; their protocol:
gemm_collective_protocol.py.

Every rank of the group must make the same calls in the same order (the ops do); a rank that does not,
or calls with other shapes, makes the others raise SymmetricBufferError naming it after the buffer's
timeout, and the buffer is unusable afterwards.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from tp_kernels.comm import ipc_plan
from tp_kernels.comm.symmetric import MAX_WORLD_SIZE, SymmetricBuffer
from tp_kernels.kernels.configs import TileConfig
from tp_kernels.kernels.gemm_collective_configs import fused_config
from tp_kernels.kernels.gemm_collective_gather import _allgather_gemm_kernel
from tp_kernels.kernels.gemm_collective_reduce import (MODE_NAMES, ONE_SHOT, REDUCE_SCATTER, TWO_SHOT,  # noqa: F401
                                                       _gemm_reduce_kernel)
from tp_kernels.ops import checks

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALGOS = {"one_shot": ONE_SHOT, "two_shot": TWO_SHOT}


@dataclass(frozen=True)
class FusedPlan:
    """What one fused call needs: its kernel's tiles and grid, and its share of the symmetric buffer
    (per parity)."""

    op: str
    mode: Optional[int]  # REDUCE_SCATTER / TWO_SHOT / ONE_SHOT; None for allgather_gemm
    config: TileConfig
    grid: int
    rows: int  # rows per owner (reductions) or per source rank (gather)
    n_publish: int  # publisher programs (gather only)
    data_bytes: int
    n_signals: int
    signature: int


def _signature(*fields) -> int:
    """16-bit hash of what every rank must agree on for a call (protocol: signals carry it)."""
    return zlib.crc32("|".join(str(f) for f in fields).encode()) & 0xFFFF


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_gemm_reduce(op: str, m: int, n: int, world_size: int, dtype: torch.dtype, device: torch.device,
                     has_bias: bool, algo: Optional[str] = None) -> FusedPlan:
    """The plan of gemm_reduce_scatter (op="reduce_scatter") or gemm_all_reduce (op="all_reduce") for an
    (m, n) output over world_size ranks. algo (all-reduce only): None picks one-shot or two-shot by bytes
    and world size with the CUDA IPC all-reduce's rule (ipc_plan.choose_algorithm)."""
    element = _element_size(dtype)
    if op == "reduce_scatter":
        if algo is not None:
            raise ValueError(f"algo applies to the all-reduce only, got algo={algo!r} for reduce_scatter")
        mode = REDUCE_SCATTER
    elif op == "all_reduce":
        if algo is None:
            algo = ipc_plan.choose_algorithm(m * n * element, world_size)
        if algo not in ALGOS:
            raise ValueError(f"algo must be None or one of {sorted(ALGOS)}, got {algo!r}")
        mode = ALGOS[algo]
    else:
        raise ValueError(f"op must be 'reduce_scatter' or 'all_reduce', got {op!r}")
    rows = m if mode == ONE_SHOT else -(-m // world_size)  # rows per owner block (ceil for the all-reduce)
    config = fused_config(device, dtype, rows)
    tiles_n = triton.cdiv(n, config.block_n)
    if mode == ONE_SHOT:
        grid = triton.cdiv(m, config.block_m) * tiles_n
        data_elements, n_signals = m * n, grid  # my partial; one signal per tile
    else:
        tiles_per_owner = triton.cdiv(rows, config.block_m) * tiles_n
        grid = world_size * tiles_per_owner
        data_elements = world_size * rows * n  # a slot per source for my block
        n_signals = world_size * tiles_per_owner
        if mode == TWO_SHOT:
            data_elements += m * n  # relayed tiles
            n_signals += grid
    return FusedPlan(op, mode, config, grid, rows, 0, data_elements * element, n_signals,
                     _signature(op, MODE_NAMES[mode], m, n, dtype, has_bias, world_size))


def plan_allgather_gemm(rows_per_rank: int, n: int, k: int, world_size: int, dtype: torch.dtype,
                        device: torch.device) -> FusedPlan:
    """The plan of allgather_gemm: rows_per_rank (R) rows of K per rank, N output columns on this rank."""
    config = fused_config(device, dtype, rows_per_rank)
    tiles_m = triton.cdiv(rows_per_rank, config.block_m)
    n_publish = tiles_m
    grid = n_publish + world_size * tiles_m * triton.cdiv(n, config.block_n)
    # N and the bias are this rank's own business; the rows each rank publishes are everyone's
    return FusedPlan("all_gather", None, config, grid, rows_per_rank, n_publish,
                     rows_per_rank * k * _element_size(dtype), n_publish,
                     _signature("all_gather", rows_per_rank, k, dtype, world_size))


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], buffer: SymmetricBuffer) -> None:
    if not isinstance(buffer, SymmetricBuffer):
        raise TypeError(f"buffer must be a SymmetricBuffer, got {type(buffer).__name__}")
    checks.check_gemm(x, w, bias, None)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32 for the fused kernels, got {x.dtype}")
    if x.device != buffer.device:
        raise ValueError(f"x must be on the symmetric buffer's device {buffer.device}, got {x.device}")
    if x.device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 set before triton is imported (the fused kernels "
                         "run on CPU only in Triton's interpreter)")


def _meta(plan: FusedPlan, x: torch.Tensor, has_bias: bool) -> dict:
    interpreting = x.device.type == "cpu"
    return dict(HAS_BIAS=has_bias, BLOCK_M=plan.config.block_m, BLOCK_N=plan.config.block_n,
                BLOCK_K=plan.config.block_k, GROUP_M=plan.config.group_m, UPCAST_OPERANDS=interpreting,
                # exact fp32 products for fp32 (torch's default, no TF32), as matmul.py
                DOT_PRECISION="ieee" if x.dtype == torch.float32 or interpreting else "tf32",
                USE_GLOBALTIMER=not interpreting, num_warps=plan.config.num_warps,
                num_stages=plan.config.num_stages)


def _buffer_args(buffer: SymmetricBuffer, plan: FusedPlan) -> tuple:
    reason = buffer.capacity_reason(plan.data_bytes, plan.n_signals)
    if reason is not None:
        raise ValueError(f"{plan.op}: the call does not fit the group's symmetric buffer: {reason}")
    return (buffer.n_signals, buffer.data_offset, buffer.data_bytes, plan.signature,
            int(buffer.timeout_s * 1e9))


def _launch(buffer: SymmetricBuffer, op: str, kernel, grid: int, args: tuple, meta: dict) -> None:
    buffer.begin_call(op)
    try:
        kernel[(grid,)](*args, **meta)
    finally:
        buffer.end_call(op)


def gemm_reduce_scatter(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                        buffer: SymmetricBuffer) -> torch.Tensor:
    """This rank's block of reduce_scatter(x @ w.T) along M, plus bias: (M / p, N), one kernel.

    Plain PyTorch: `y = x @ w.T; dist.all_reduce(y); y[rank * M // p:(rank + 1) * M // p] + bias`,
    with fp32 accumulation and the partials rounded to x's dtype before they are summed in rank order.
    x (M, K_r), w (N, K_r), bias (N,); M divisible by the world size. Collective over buffer's group.
    """
    _check(x, w, bias, buffer)
    checks.check_gemm_reduce_scatter(x, w, bias, None, buffer.world_size)
    m, n = x.shape[0], w.shape[0]
    plan = plan_gemm_reduce("reduce_scatter", m, n, buffer.world_size, x.dtype, x.device, bias is not None)
    return _launch_reduce(x, w, bias, buffer, plan, (plan.rows, n))


def gemm_all_reduce(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], buffer: SymmetricBuffer,
                    algo: Optional[str] = None) -> torch.Tensor:
    """all_reduce(x @ w.T) + bias, (M, N), one kernel; the same bits on every rank.

    Plain PyTorch: `y = x @ w.T; dist.all_reduce(y); y + bias`, with fp32 accumulation and the partials
    rounded to x's dtype before they are summed in rank order. algo: None (one-shot or two-shot by bytes
    and world size), "one_shot" or "two_shot". Collective over buffer's group.
    """
    _check(x, w, bias, buffer)
    m, n = x.shape[0], w.shape[0]
    plan = plan_gemm_reduce("all_reduce", m, n, buffer.world_size, x.dtype, x.device, bias is not None, algo)
    return _launch_reduce(x, w, bias, buffer, plan, (m, n))


def _launch_reduce(x, w, bias, buffer, plan: FusedPlan, out_shape) -> torch.Tensor:
    out = x.new_empty(out_shape)
    if out.numel() == 0:
        return out
    m, k = x.shape
    args = (x, w, x if bias is None else bias.contiguous(), out, buffer.pointers, buffer.control, buffer.status,
            m, w.shape[0], k, buffer.rank, buffer.world_size, plan.rows, *_buffer_args(buffer, plan),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1))
    _launch(buffer, f"gemm_{plan.op}", _gemm_reduce_kernel, plan.grid, args,
            dict(MODE=plan.mode, WORLD_BLOCK=MAX_WORLD_SIZE, **_meta(plan, x, bias is not None)))
    return out


def allgather_gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                   buffer: SymmetricBuffer) -> torch.Tensor:
    """all_gather(x) along M, then @ w.T + bias: (p * R, N), one kernel.

    Plain PyTorch: `torch.cat(all_gathered_x) @ w.T + bias` with fp32 accumulation. x (R, K) this rank's
    token rows, w (N, K), bias (N,). Collective over buffer's group.
    """
    _check(x, w, bias, buffer)
    rows_per_rank, k = x.shape
    n = w.shape[0]
    out = x.new_empty((buffer.world_size * rows_per_rank, n))
    if rows_per_rank == 0:  # every rank (the signature covers R); with N = 0 the publishers still run
        return out
    plan = plan_allgather_gemm(rows_per_rank, n, k, buffer.world_size, x.dtype, x.device)
    args = (x, w, x if bias is None else bias.contiguous(), out, buffer.pointers, buffer.control, buffer.status,
            rows_per_rank, n, k, buffer.rank, buffer.world_size, plan.n_publish, *_buffer_args(buffer, plan),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1))
    _launch(buffer, "allgather_gemm", _allgather_gemm_kernel, plan.grid, args, _meta(plan, x, bias is not None))
    return out
