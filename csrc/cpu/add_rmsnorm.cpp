// CPU kernel of tp_kernels::add_rmsnorm: residual add and RMSNorm in one pass over each row.
// Math in fp32 for every dtype; the new residual is rounded to the input dtype first and the norm is
// taken of that rounded value, so the residual stream the next layer sees is the one that was normed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "add_rmsnorm_checks.h"

namespace tp_kernels {
namespace {

template <typename scalar_t>
void add_rmsnorm_rows(const scalar_t* x, const scalar_t* residual, const scalar_t* weight, scalar_t* normed,
                      scalar_t* new_residual, int64_t n_rows, int64_t hidden, float eps) {
  // Rows are independent; a grain of 16 rows keeps small decode batches on one thread (spawning costs more
  // than the work below ~16 x 4096 elements).
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = x + row * hidden;
      const scalar_t* rr = residual + row * hidden;
      scalar_t* nr = new_residual + row * hidden;
      float sum_sq = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        const scalar_t s = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
        nr[i] = s;
        const float sf = static_cast<float>(s);
        sum_sq += sf * sf;
      }
      const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
      scalar_t* out = normed + row * hidden;
      for (int64_t i = 0; i < hidden; ++i) {
        out[i] = static_cast<scalar_t>(static_cast<float>(nr[i]) * inv_rms * static_cast<float>(weight[i]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                   const at::Tensor& weight, double eps) {
  check_add_rmsnorm_args(x, residual, weight, eps);
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  at::Tensor normed = at::empty_like(xc);
  at::Tensor new_residual = at::empty_like(xc);
  const int64_t hidden = x.size(-1);
  const int64_t n_rows = hidden == 0 ? 0 : x.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rmsnorm_cpu", [&] {
    add_rmsnorm_rows<scalar_t>(xc.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                               normed.data_ptr<scalar_t>(), new_residual.data_ptr<scalar_t>(), n_rows, hidden,
                               static_cast<float>(eps));
  });
  return {normed, new_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(tp_kernels, CPU, m) { m.impl("add_rmsnorm", &add_rmsnorm_cpu); }

}  // namespace tp_kernels
