// Every tp_kernels operator schema, declared once. Device implementations live beside their kernels
// (csrc/cpu, csrc/cuda, and Python registrations in tp_kernels/ops); fake (meta) implementations are
// registered in Python by tp_kernels.ops.fake, which set_python_module names so the dispatcher can say
// where to find them; the autograd of every op is csrc/autograd.cpp.
//
// Collectives take their group as a registered name (str) so torch.compile can trace calls to them;
// tp_kernels.distributed resolves the name to a TPGroup.
#include <torch/library.h>

TORCH_LIBRARY(tp_kernels, m) {
  m.set_python_module("tp_kernels.ops.fake");

  // This rank's slice of the fused QKV projection + bias + rotary embedding + split into heads.
  // w_qkv rows are [q heads | k heads | v heads] of this rank; cos_sin_cache is (max_position, rotary_dim)
  // holding [cos | sin] halves; rope_style is "neox", "gptj" or "none".
  m.def(
      "qkv_rope(Tensor x, Tensor w_qkv, Tensor? b_qkv, Tensor? cos_sin_cache, Tensor positions, "
      "int n_heads_per_rank, int n_kv_heads_per_rank, int head_dim, str rope_style) "
      "-> (Tensor q, Tensor k, Tensor v)");
  // The same, writing k and v into the caches (batch, max_seq, n_kv_heads_per_rank, head_dim) at
  // [cache_batch_index[t], positions[t]] instead of returning them.
  m.def(
      "qkv_rope_kv_cache(Tensor x, Tensor w_qkv, Tensor? b_qkv, Tensor? cos_sin_cache, Tensor positions, "
      "Tensor cache_batch_index, Tensor(a!) k_cache, Tensor(b!) v_cache, int n_heads_per_rank, "
      "int n_kv_heads_per_rank, int head_dim, str rope_style) -> Tensor q");

  // Row-parallel linear: all_reduce(x @ w.T) + bias, M pipelined in chunks (None: the cost model picks).
  m.def("gemm_allreduce(Tensor x, Tensor w, Tensor? bias, str group, int? chunks=None) -> Tensor");
  // The sequence-parallel pair, M pipelined in chunks the same way. gemm_reduce_scatter: row-parallel,
  // reduce_scatter(x @ w.T) along M + bias, x (M, K_per_rank) -> (M / world_size, N).
  // allgather_gemm: column-parallel, all_gather(x) along M @ w.T + bias, x (M_per_rank, K) ->
  // (world_size * M_per_rank, N_per_rank).
  m.def("gemm_reduce_scatter(Tensor x, Tensor w, Tensor? bias, str group, int? chunks=None) -> Tensor");
  m.def("allgather_gemm(Tensor x, Tensor w, Tensor? bias, str group, int? chunks=None) -> Tensor");

  // Sum of x over the ranks of group, out of place; backend names a backend of the group's chain or is
  // "auto" (the first that applies, or the one tp.use_backend forces).
  m.def("all_reduce(Tensor x, str group, str backend=\"auto\") -> Tensor");
  // The same, in place: x becomes the sum (for partial sums that are dead afterwards: no new output).
  m.def("all_reduce_(Tensor(a!) x, str group, str backend=\"auto\") -> ()");
  // Concatenation of x from every rank of group along dim.
  m.def("all_gather(Tensor x, str group, int dim) -> Tensor");

  // new_residual = x + residual; normed = rmsnorm(new_residual) * weight, in one pass (fp32 math).
  m.def("add_rmsnorm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor normed, Tensor new_residual)");
  // add_rmsnorm(all_reduce(x), residual, weight, eps) with the reduction fused in.
  m.def(
      "allreduce_residual_rmsnorm(Tensor x, Tensor residual, Tensor weight, float eps, str group) "
      "-> (Tensor normed, Tensor new_residual)");
}
