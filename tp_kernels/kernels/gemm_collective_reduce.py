"""GEMM + reduce-scatter and GEMM + all-reduce in one Triton kernel, tile by tile, over the group's
symmetric buffers (protocol: gemm_collective_protocol.py).

Row-parallel linear: rank r holds x_r (M, K_r) and w_r (N, K_r); the output is sum_r x_r @ w_r.T + bias.
Every program computes one (BLOCK_M, BLOCK_N) tile of this rank's partial x_r @ w_r.T with fp32
accumulation, rounds it to the output dtype (the bytes a 16-bit all-reduce moves) and then, by MODE:

- REDUCE_SCATTER: the output rows are split in world_size blocks of M / p; the tile goes into the
  buffer of the rank that owns its rows, in the slot of this source rank, and raises that slot's signal.
  The owner's program of the same tile waits for the p slots, sums them in rank order in fp32, adds the
  bias once, and stores its rows of the output (M / p, N).
- TWO_SHOT (all-reduce): the same, with blocks of ceil(M / p) rows; the owner then pushes the reduced
  tile into every peer's relay region and raises its relay signal there; the others wait for it and
  copy it out. Every rank holds the same bits.
- ONE_SHOT (all-reduce, small M): the tile goes into this rank's own buffer; every rank then pulls the
  tile of every rank and sums them in rank order: one wait phase instead of two.

     source rank r (every program)                     owner rank o (its program of the same tile)
     acc = x_r[rows] @ w_r[cols].T       (fp32)
     buf[o].slot[r][tile] = acc.to(dtype)  ------->  wait sig[o][s][tile] == tag for all s      [A]
     sig[o][r][tile] = tag                 [A]       y = sum over s in rank order of buf[o].slot[s][tile]
                                                      y += bias; out[tile] = y        (fp32, rounded once)
     (TWO_SHOT, r != o)                                (TWO_SHOT) for q != o:
     wait sig[r].relay[tile] == tag        [B] <-------   buf[q].relay[tile] = y;  sig[q].relay[tile] = tag  [B]
     out[tile] = buf[r].relay[tile]

     (ONE_SHOT, every rank r)
     buf[r].own[tile] = acc.to(dtype); sig[r][tile] = tag                                       [C]
     wait sig[s][tile] == tag for all s                                                         [C]
     out[tile] = sum over s in rank order of buf[s].own[tile] + bias

Tiles are numbered so that consecutive programs go to different owners (pid % p is the owner), which
spreads the pushes; the same pid is the same tile on every rank, which the deadlock argument needs.
"""
import triton
import triton.language as tl

from tp_kernels.kernels.gemm_collective_protocol import finish_program, raise_signals, record_missing, wait_signals
from tp_kernels.kernels.tiling import accumulate_tile, grouped_tile_ids

REDUCE_SCATTER, TWO_SHOT, ONE_SHOT = 0, 1, 2
MODE_NAMES = {REDUCE_SCATTER: "reduce_scatter", TWO_SHOT: "two_shot", ONE_SHOT: "one_shot"}


# Ints that take many values across calls and ranks (the rank itself, the call's signature, row counts)
# are not specialized on (divisible by 16, equal to 1): each new pattern would be another compile, and rank
# 1 would run a different binary from rank 0. N, K and the strides are: their divisibility vectorizes.
@triton.jit(do_not_specialize=["M", "rank", "world_size", "rows_per_owner", "signature"])
def _gemm_reduce_kernel(
    # pointers
    x_ptr,  # (M, K): this rank's activations (its K slice)
    w_ptr,  # (N, K): this rank's weight shard
    bias_ptr,  # (N,); read only if HAS_BIAS, by the program that reduces a tile
    out_ptr,  # REDUCE_SCATTER: (rows_per_owner, N), this rank's rows; all-reduce: (M, N)
    table_ptr,  # (world_size,) int64: every rank's symmetric buffer address in this process
    control_ptr,  # (CONTROL_WORDS,) int64, this rank's: epoch, arrivals, failure
    status_ptr,  # (STATUS_WORDS,) int64, host-visible: missing rank + 1, watchdog abort
    # sizes
    M, N, K, rank, world_size, rows_per_owner,
    n_signals, data_offset, data_bytes, signature, timeout_ns,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, WORLD_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_GLOBALTIMER: tl.constexpr,
):
    pid = tl.program_id(0)
    element = out_ptr.dtype.element_ty
    # this call: tag and parity (gemm_collective_protocol); addresses of the parity's regions.
    # Helpers are written out rather than called: each call of a jit function costs the interpreter
    # milliseconds (it patches triton.language again), about as much as a whole small tile.
    epoch = tl.load(control_ptr)  # control word CONTROL_EPOCH (0)
    tag = epoch * 65536 + signature
    signal_offset = (epoch % 2) * n_signals * 8  # bytes into a buffer
    data_start = data_offset + (epoch % 2) * data_bytes
    my_buffer = tl.load(table_ptr + rank)
    my_signals = (my_buffer + signal_offset).to(tl.pointer_type(tl.int64))
    my_data = (my_buffer + data_start).to(tl.pointer_type(element))

    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    if MODE == 2:  # ONE_SHOT: tiles over the whole output, in grouped order
        tile_m, tile_n = grouped_tile_ids(pid, (M + BLOCK_M - 1) // BLOCK_M, tiles_n, GROUP_M)
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output rows
    else:  # tiles grouped per owner block; pid % world_size is the owner
        owner = pid % world_size
        local_tile = pid // world_size
        tiles_per_owner = (rows_per_owner + BLOCK_M - 1) // BLOCK_M * tiles_n
        tile_m, tile_n = grouped_tile_ids(local_tile, (rows_per_owner + BLOCK_M - 1) // BLOCK_M, tiles_n, GROUP_M)
        owner_rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows within the owner's block
        rows = owner * rows_per_owner + owner_rows  # output rows
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = accumulate_tile(x_ptr, w_ptr, rows, cols, cols < N, M, K, stride_xm, stride_xk, stride_wn, stride_wk,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST_OPERANDS, DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
    # masks and lanes after the K loop, so that no predicate stays live across it (ptxas spilled one)
    cols_valid = cols < N
    if MODE == 2:
        rows_valid = rows < M
    else:
        rows_valid = (owner_rows < rows_per_owner) & (rows < M)
    mask = rows_valid[:, None] & cols_valid[None, :]
    lanes = tl.arange(0, WORLD_BLOCK)  # one lane per rank
    lane_valid = lanes < world_size
    tile_offsets = rows[:, None].to(tl.int64) * N + cols[None, :]  # into an (M, N) row-major region
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on

    if MODE == 2:
        # ONE_SHOT: my partial into my own buffer, (M, N); every rank pulls it
        tl.store(my_data + tile_offsets, acc.to(element), mask=mask)
        raise_signals(my_signals + pid, tag, 0)  # matches wait [C]
        buffers = tl.load(table_ptr + lanes, mask=lane_valid, other=0)  # (WORLD_BLOCK,) int64 addresses
        failed = wait_signals((buffers + signal_offset + pid * 8).to(tl.pointer_type(tl.int64)), lanes, lane_valid,
                              tag, control_ptr, status_ptr, timeout_ns, 1, USE_GLOBALTIMER)  # [C]
        total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for source in range(0, world_size):  # rank order: every rank sums the same values the same way
            partials = (tl.load(table_ptr + source) + data_start).to(tl.pointer_type(element))
            total += tl.load(partials + tile_offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            total += tl.load(bias_ptr + cols, mask=cols_valid, other=0.0).to(tl.float32)[None, :]
    else:
        # push my partial into the owner's slot for this source: (world_size, rows_per_owner, N) per owner
        owner_buffer = tl.load(table_ptr + owner)
        slot_offsets = owner_rows[:, None].to(tl.int64) * N + cols[None, :]  # into one (rows_per_owner, N) slot
        owner_slots = (owner_buffer + data_start).to(tl.pointer_type(element))
        tl.store(owner_slots + rank * rows_per_owner * N + slot_offsets, acc.to(element), mask=mask)
        owner_signals = (owner_buffer + signal_offset).to(tl.pointer_type(tl.int64))
        raise_signals(owner_signals + rank * tiles_per_owner + local_tile, tag, 0)  # matches wait [A]
        relay_signal = world_size * tiles_per_owner + pid  # after the slots' signals: one per output tile
        relay = my_data + world_size * rows_per_owner * N  # after the slots: (M, N) relayed tiles
        failed = 0
        total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        if rank == owner:
            failed = wait_signals(my_signals + lanes * tiles_per_owner + local_tile, lanes, lane_valid, tag,
                                  control_ptr, status_ptr, timeout_ns, 1, USE_GLOBALTIMER)  # [A]
            for source in range(0, world_size):  # rank order
                total += tl.load(my_data + source * rows_per_owner * N + slot_offsets, mask=mask,
                                 other=0.0).to(tl.float32)
            if HAS_BIAS:  # once, by the owner
                total += tl.load(bias_ptr + cols, mask=cols_valid, other=0.0).to(tl.float32)[None, :]
            if MODE == 1:  # TWO_SHOT: the reduced tile to every peer; a failure relayed as the flag
                for step in range(1, world_size):
                    peer_relay = (tl.load(table_ptr + (rank + step) % world_size) + data_start).to(
                        tl.pointer_type(element)) + world_size * rows_per_owner * N
                    tl.store(peer_relay + tile_offsets, total.to(element), mask=mask & (failed == 0))
                buffers = tl.load(table_ptr + lanes, mask=lane_valid, other=0)  # (WORLD_BLOCK,) int64 addresses
                raise_signals((buffers + signal_offset + relay_signal * 8).to(tl.pointer_type(tl.int64)), tag,
                              failed, lane_valid & (lanes != rank))  # matches wait [B]
        elif MODE == 1:
            failed = wait_signals(my_signals + relay_signal + lanes * 0, lanes * 0 + owner, lanes == 0, tag,
                                  control_ptr, status_ptr, timeout_ns, 2, USE_GLOBALTIMER)  # [B]
            total = tl.load(relay + tile_offsets, mask=mask, other=0.0).to(tl.float32)  # bias included
    if failed != 0:
        record_missing(control_ptr, status_ptr, failed - 1)
    total = tl.where(failed != 0, float("nan"), total)  # a tile that is not the sum never looks like one
    if MODE == 0:  # REDUCE_SCATTER: only the owner stores, its own block
        tl.store(out_ptr + owner_rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on,
                 total.to(element), mask=mask & (rank == owner))
    else:
        tl.store(out_ptrs, total.to(element), mask=mask)
    finish_program(control_ptr, tl.num_programs(0))
