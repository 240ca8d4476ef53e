// Argument checks of tp_kernels::add_rmsnorm, shared by its CPU and CUDA kernels so both reject bad input
// with the same ValueError (TORCH_CHECK_VALUE) the Python checks raise.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace tp_kernels {

inline void check_add_rmsnorm_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                   double eps) {
  TORCH_CHECK_VALUE(x.sizes() == residual.sizes(), "add_rmsnorm: residual must have x's shape ", x.sizes(),
                    ", got ", residual.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
                    "add_rmsnorm: weight must be (hidden,) = (", x.size(-1), ",), got ", weight.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
                    "add_rmsnorm: x, residual and weight must share a dtype, got ", x.scalar_type(), ", ",
                    residual.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK_VALUE(residual.device() == x.device() && weight.device() == x.device(),
                    "add_rmsnorm: x, residual and weight must be on one device");
  TORCH_CHECK_VALUE(eps > 0, "add_rmsnorm: eps must be > 0, got ", eps);
}

}  // namespace tp_kernels
