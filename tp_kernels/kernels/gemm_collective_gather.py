"""All-gather + GEMM in one Triton kernel, over the group's symmetric buffers (protocol:
gemm_collective_protocol.py).

Sequence-parallel column-parallel linear: rank r holds R = M / p token rows x_r (R, K) and its weight
shard w (N, K); the output is all_gather(x) @ w.T + bias, (p * R, N), the same rows on every rank.

The first n_publish programs publish: each copies BLOCK_M rows of x_r into this rank's buffer and raises
their signal. The other programs are GEMM tiles: a tile of source rank s's rows waits for the signal of
those rows in s's buffer and then reads them from there inside its K loop, so the first tiles start while
the other ranks are still publishing. Each rank takes its own rows first (ready soonest), then rank + 1's,
and so on around the ring, so the ranks do not all read from the same peer at once.

     rank s, publisher p (pid < n_publish)          rank r, GEMM tile (rows block p of source s)
     buf[s].rows[p] = x_s[p * BLOCK_M: ...]
     sig[s][p] = tag                   [D]  ---->  wait sig[s][p] == tag                  [D]
                                                   out[s * R + rows] = buf[s].rows[p] @ w.T + bias

Publishers never wait, and they come first in every rank's grid, so a waiting tile's publisher is always
dispatched (see the protocol module's deadlock argument).
"""
import triton
import triton.language as tl

from tp_kernels.kernels.gemm_collective_protocol import finish_program, raise_signals, record_missing, wait_signals
from tp_kernels.kernels.tiling import accumulate_tile, grouped_tile_ids


@triton.jit(do_not_specialize=["R", "rank", "world_size", "n_publish", "signature"])  # as the reduce kernel
def _allgather_gemm_kernel(
    # pointers
    x_ptr,  # (R, K): this rank's token rows
    w_ptr,  # (N, K): this rank's weight shard
    bias_ptr,  # (N,); read only if HAS_BIAS
    out_ptr,  # (world_size * R, N): every rank's rows, rank 0's first
    table_ptr,  # (world_size,) int64: every rank's symmetric buffer address in this process
    control_ptr,  # (CONTROL_WORDS,) int64, this rank's: epoch, arrivals, failure
    status_ptr,  # (STATUS_WORDS,) int64, host-visible: missing rank + 1, watchdog abort
    # sizes
    R, N, K, rank, world_size, n_publish,
    n_signals, data_offset, data_bytes, signature, timeout_ns,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_GLOBALTIMER: tl.constexpr,
):
    pid = tl.program_id(0)
    element = x_ptr.dtype.element_ty
    # this call's tag and parity regions (gemm_collective_protocol; written out, see the reduce kernel)
    epoch = tl.load(control_ptr)  # control word CONTROL_EPOCH (0)
    tag = epoch * 65536 + signature
    signal_offset = (epoch % 2) * n_signals * 8  # bytes into a buffer
    data_start = data_offset + (epoch % 2) * data_bytes
    if pid < n_publish:
        # publisher: rows [pid * BLOCK_M, (pid + 1) * BLOCK_M) of x into my buffer, (R, K) row-major
        my_buffer = tl.load(table_ptr + rank)
        published = (my_buffer + data_start).to(tl.pointer_type(element))
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_valid = rows < R
        offs_k = tl.arange(0, BLOCK_K)
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + offs_k
            mask = rows_valid[:, None] & (ks < K)[None, :]
            values = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk, mask=mask)
            tl.store(published + rows[:, None].to(tl.int64) * K + ks[None, :], values, mask=mask)
        raise_signals((my_buffer + signal_offset).to(tl.pointer_type(tl.int64)) + pid, tag, 0)  # matches wait [D]
    else:
        tiles_m = (R + BLOCK_M - 1) // BLOCK_M
        tiles_n = (N + BLOCK_N - 1) // BLOCK_N
        tiles_per_source = tiles_m * tiles_n
        gemm_tile = pid - n_publish
        source = (rank + gemm_tile // tiles_per_source) % world_size  # own rows first, then around the ring
        tile_m, tile_n = grouped_tile_ids(gemm_tile % tiles_per_source, tiles_m, tiles_n, GROUP_M)
        source_buffer = tl.load(table_ptr + source)
        lanes = tl.arange(0, 2)  # wait_signals takes vectors: one lane used
        failed = wait_signals((source_buffer + signal_offset).to(tl.pointer_type(tl.int64)) + tile_m + lanes * 0,
                              lanes * 0 + source, lanes == 0, tag, control_ptr, status_ptr, timeout_ns, 1,
                              USE_GLOBALTIMER)  # [D]
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of source's block
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_valid = cols < N
        acc = accumulate_tile((source_buffer + data_start).to(tl.pointer_type(element)), w_ptr, rows, cols,
                              cols_valid, R, K, K, 1, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K,
                              UPCAST_OPERANDS, DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols_valid, other=0.0).to(tl.float32)[None, :]
        if failed != 0:
            record_missing(control_ptr, status_ptr, failed - 1)
        acc = tl.where(failed != 0, float("nan"), acc)  # rows never published never look like results
        out_rows = source * R + rows
        out_ptrs = out_ptr + out_rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < R)[:, None] & cols_valid[None, :])
    finish_program(control_ptr, tl.num_programs(0))
