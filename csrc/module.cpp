// The Python module tp_kernels._C. Loading it runs the TORCH_LIBRARY registrations of every source in
// the extension; the pybind11 functions below are the host-side helpers that are not torch operators.
#include <torch/extension.h>

namespace tp_kernels {
bool built_with_cuda() {
#ifdef TP_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
void bind_shm(pybind11::module& m);      // csrc/cpu/shm_bindings.cpp
void bind_shm_ops(pybind11::module& m);  // csrc/cpu/shm_ops.cpp
void bind_autograd(pybind11::module& m);  // csrc/autograd.cpp
}  // namespace tp_kernels

#ifdef TP_KERNELS_WITH_CUDA
void bind_cuda_ipc(pybind11::module& m);  // csrc/cuda/custom_all_reduce_bind.cpp
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "tp_kernels C++/CUDA extension";
  m.def("built_with_cuda", &tp_kernels::built_with_cuda, "whether the CUDA sources were compiled in");
  tp_kernels::bind_shm(m);
  tp_kernels::bind_shm_ops(m);
  tp_kernels::bind_autograd(m);
#ifdef TP_KERNELS_WITH_CUDA
  bind_cuda_ipc(m);
#endif
}
