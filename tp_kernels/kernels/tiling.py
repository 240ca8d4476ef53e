"""The GEMM tiling shared by every kernel in this package: which output tile a program computes, and the
fp32 accumulator of that tile. matmul.py and qkv.py differ only in which rows of B a tile takes and in
their epilogues."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile_ids(pid, n_tiles_m, n_tiles_n, GROUP_M: tl.constexpr):
    """(tile_m, tile_n) of program `pid`, walking GROUP_M row tiles down one column tile before moving
    right, so programs that run at the same time share B's column tiles in L2 (the ordering of the
    Triton matmul tutorial; for decode, n_tiles_m == 1 and this is plain column order)."""
    tiles_per_group = GROUP_M * n_tiles_n
    group = pid // tiles_per_group
    first_tile_m = group * GROUP_M
    group_rows = tl.minimum(n_tiles_m - first_tile_m, GROUP_M)
    tile_m = first_tile_m + (pid % tiles_per_group) % group_rows
    tile_n = (pid % tiles_per_group) // group_rows
    return tile_m, tile_n


@triton.jit
def accumulate_tile(a_ptr, b_ptr, rows_a, rows_b, rows_b_valid, M, K,
                    stride_am, stride_ak, stride_bn, stride_bk,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The fp32 (BLOCK_M, BLOCK_N) tile A[rows_a, :] @ B[rows_b, :].T.

    a_ptr: A (M, K); b_ptr: B (N, K), both any strides (split-K passes pointers to the first column of
    its part and the part's length as K). rows_a (BLOCK_M,) are row indices of A (those >= M read as
    zero); rows_b (BLOCK_N,) are row indices of B in any order, so a caller can lay out the output
    columns as its epilogue needs (qkv.py pairs rotary partners); rows where rows_b_valid is False read
    as zero. UPCAST_OPERANDS converts the operands to fp32 right after loading: Triton's interpreter
    multiplies bf16 bit patterns in tl.dot (triton issue #11584), so it is set there; on a GPU fp16/bf16
    go to the tensor cores as they are.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + rows_b[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk  # (BLOCK_K, BLOCK_N)
    a_rows_valid = rows_a[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_valid = (k_start + offs_k) < K
        a = tl.load(a_ptrs, mask=a_rows_valid & k_valid[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=rows_b_valid[None, :] & k_valid[:, None], other=0.0)
        if UPCAST_OPERANDS:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc
