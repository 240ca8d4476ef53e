# Tutorial 1: column- and row-parallel linear layers, from first principles.
#
#     python python/tutorials/01_column_and_row_parallel.py
#
# A linear layer computes y = A x with A of shape (out, in). Tensor parallelism splits A across p devices
# so that each holds 1/p of the weights. There are two ways to cut a matrix, and a transformer block uses
# both, in an order that needs a single communication per block.
#
# Part 1 works in one process with plain tensors, to see the algebra. Part 2 runs the same thing on two
# CPU ranks with the tp_kernels layers.
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tp_kernels
from tp_kernels.layers import ColumnParallelLinear, RowParallelLinear

p = 2
d_model, d_ff = 8, 16


# Part 1 runs in the launching process only (spawned ranks re-import this file, so the script-level work
# lives in functions called from the __main__ block at the bottom).
def show(claim: str, holds: bool) -> None:
    """Print a claim and whether it holds; a tutorial whose claim fails stops with an error."""
    print(f"{claim}: {holds}")
    if not holds:
        raise SystemExit(f"expected to hold: {claim}")


def first_principles():
    """Part 1: the algebra in one process, in float64."""
    torch.manual_seed(0)
    x = torch.randn(d_model, dtype=torch.float64)

    # ---- Part 1a: column parallel -------------------------------------------------------------------------
    # Cut A by rows (its output features): A = [A_1; A_2; ...; A_p]. Then y = A x = [A_1 x; A_2 x; ...]:
    # rank r computes y_r = A_r x, a slice of the output, from the *whole* input and without talking to anyone.
    A = torch.randn(d_ff, d_model, dtype=torch.float64)
    A_rows = A.chunk(p, dim=0)  # p blocks of (d_ff / p, d_model)
    y_slices = [A_r @ x for A_r in A_rows]
    show("column parallel: concatenating the slices gives A x", torch.allclose(torch.cat(y_slices), A @ x))

    # ---- Part 1b: row parallel ----------------------------------------------------------------------------
    # Cut B by columns (its input features): B = [B_1, B_2, ..., B_p], and the input to match, h = [h_1; ...; h_p].
    # Then B h = B_1 h_1 + B_2 h_2 + ... + B_p h_p: rank r computes a full-size *partial* result B_r h_r from
    # its slice of the input, and the sum over ranks -- an all-reduce -- gives the output.
    B = torch.randn(d_model, d_ff, dtype=torch.float64)
    h = torch.relu(A @ x)
    B_cols, h_slices = B.chunk(p, dim=1), h.chunk(p)
    partials = [B_r @ h_r for B_r, h_r in zip(B_cols, h_slices)]
    show("row parallel: summing the partial products gives B h", torch.allclose(sum(partials), B @ h))

    # ---- Part 1c: the MLP block: column, then row ---------------------------------------------------------
    # The slice y_r = A_r x that a column-parallel layer leaves on rank r is exactly the input slice h_r that a
    # row-parallel layer wants (an elementwise activation keeps the slicing: relu(y)_r = relu(y_r)). So an MLP
    # B relu(A x) needs no communication between its two layers and ONE all-reduce at the end:
    #     rank r:  h_r = relu(A_r x);  z_r = B_r h_r;   then  z = all_reduce(z_r) = z_1 + ... + z_p
    # Attention is cut the same way, with heads as the unit: q, k, v column-parallel by heads (each rank runs
    # attention for its heads), the output projection row-parallel, one all-reduce.
    z_per_rank = [B_r @ torch.relu(A_r @ x) for A_r, B_r in zip(A_rows, B_cols)]
    show("MLP block with one all-reduce equals B relu(A x)", torch.allclose(sum(z_per_rank), B @ torch.relu(A @ x)))
    return A, B, x


# ---- Part 2: the same on two CPU ranks with tp_kernels layers -----------------------------------------
# ColumnParallelLinear and RowParallelLinear hold rank r's A_r and B_r; `from_linear` cuts them out of full
# nn.Linear layers. RowParallelLinear's forward is tp_kernels.ops.gemm_allreduce: B_r h_r, summed over the
# group, plus the bias once.
def mlp_on_rank(rank, init_file, A, B, x):
    torch.set_num_threads(1)
    tp = tp_kernels.TPGroup.init(rank=rank, world_size=p, backend="gloo", init_method=f"file://{init_file}")
    up, down = torch.nn.Linear(d_model, d_ff), torch.nn.Linear(d_ff, d_model)
    with torch.no_grad():
        up.weight.copy_(A), down.weight.copy_(B), up.bias.zero_(), down.bias.zero_()
    up_parallel = ColumnParallelLinear.from_linear(up, tp)     # holds A_r: (d_ff / p, d_model)
    down_parallel = RowParallelLinear.from_linear(down, tp)    # holds B_r: (d_model, d_ff / p)
    z = down_parallel(torch.relu(up_parallel(x)))              # one all-reduce, inside down_parallel
    show(f"rank {rank}: holds A_r {tuple(up_parallel.weight.shape)} and B_r {tuple(down_parallel.weight.shape)}; "
         "its output equals the full MLP's", torch.allclose(z, down(torch.relu(up(x))), atol=1e-6))
    dist.destroy_process_group()


if __name__ == "__main__":
    A, B, x = first_principles()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(mlp_on_rank, args=(os.path.join(tmp, "rendezvous"), A.float(), B.float(), x.float()[None]),
                 nprocs=p)
