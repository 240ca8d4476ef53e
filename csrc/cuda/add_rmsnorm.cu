// CUDA kernel of tp_kernels::add_rmsnorm: one thread block per row. Pass 1 writes the new residual
// (rounded to the input dtype) and accumulates its sum of squares in fp32; a block reduction gives the
// row's 1/rms; pass 2 reads the new residual back (it is in L1/L2: a 8192-wide bf16 row is 16 KB) and
// writes the normed row. Same numerics as the CPU kernel in csrc/cpu/add_rmsnorm.cpp.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "add_rmsnorm_checks.h"
#include "cuda/block_reduce.cuh"

namespace tp_kernels {
namespace {

constexpr int kThreads = 256;  // 8 warps: enough loads in flight for one row of a decode-sized batch

template <typename scalar_t>
__global__ void add_rmsnorm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                   const scalar_t* __restrict__ weight, scalar_t* __restrict__ normed,
                                   scalar_t* __restrict__ new_residual, int64_t hidden, float eps) {
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * hidden;
  const scalar_t* rr = residual + row * hidden;
  scalar_t* nr = new_residual + row * hidden;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
    const scalar_t s = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
    nr[i] = s;
    const float sf = static_cast<float>(s);
    sum_sq += sf * sf;
  }
  const float inv_rms = rsqrtf(block_sum<kThreads>(sum_sq) / static_cast<float>(hidden) + eps);
  scalar_t* out = normed + row * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += kThreads) {
    out[i] = static_cast<scalar_t>(static_cast<float>(nr[i]) * inv_rms * static_cast<float>(weight[i]));
  }
}

std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  check_add_rmsnorm_args(x, residual, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  at::Tensor normed = at::empty_like(xc);
  at::Tensor new_residual = at::empty_like(xc);
  const int64_t hidden = x.size(-1);
  const int64_t n_rows = hidden == 0 ? 0 : x.numel() / hidden;
  if (n_rows == 0) return {normed, new_residual};
  TORCH_CHECK(n_rows <= INT32_MAX, "add_rmsnorm: too many rows for one grid: ", n_rows);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rmsnorm_cuda", [&] {
    add_rmsnorm_kernel<scalar_t><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), normed.data_ptr<scalar_t>(),
        new_residual.data_ptr<scalar_t>(), hidden, static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {normed, new_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(tp_kernels, CUDA, m) { m.impl("add_rmsnorm", &add_rmsnorm_cuda); }

}  // namespace tp_kernels
