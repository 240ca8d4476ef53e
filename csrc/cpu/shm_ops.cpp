// The CPU kernels of tp_kernels::all_reduce, all_reduce_ (in place) and allreduce_residual_rmsnorm.
//
// Why in C++: a Python kernel behind the dispatcher costs ~17 us per call on the 2-core CI host (boxing
// the arguments into Python, the chain lookup, unboxing), several times the 4 KiB shared-memory
// all-reduce itself, and a decoder makes two of these calls per layer and token. So the common case,
// a group whose CPU chain starts with the shm communicator, is served here without Python: the group's
// communicator is looked up by name in a table that tp_kernels.distributed keeps in step with the group's
// chain (register_shm_group: when the group is made, and on entering and leaving tp.use_backend), so a
// group appears here exactly while the chain would pick shm for every dtype handled below. Every other
// case (another backend, backend="torch", a bad argument) goes to the Python
// implementation (set_cpu_collective_fallbacks), which holds the chain, the argument checks and their
// error messages; so the C++ side only has to recognize the plain case.
#include <torch/extension.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "cpu/shm_comm.h"

namespace tp_kernels {
namespace {

namespace py = pybind11;
using shm::ShmCommunicator;

std::mutex& table_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<std::string, std::shared_ptr<ShmCommunicator>>& shm_groups() {
  static std::unordered_map<std::string, std::shared_ptr<ShmCommunicator>> groups;
  return groups;
}

std::shared_ptr<ShmCommunicator> find_shm_group(c10::string_view group) {
  std::lock_guard<std::mutex> lock(table_mutex());
  auto it = shm_groups().find(std::string(group));
  if (it == shm_groups().end() || it->second->closed()) return nullptr;
  return it->second;
}

// The Python implementations. Held as leaked pointers on purpose: destroying a py::object after the
// interpreter finalized (static destructors run after that) would crash at exit.
struct PythonFallbacks {
  py::object* all_reduce = nullptr;
  py::object* all_reduce_ = nullptr;
  py::object* allreduce_residual_rmsnorm = nullptr;
};

PythonFallbacks& fallbacks() {
  static PythonFallbacks f;
  return f;
}

py::object& fallback(py::object* fn, const char* op) {
  TORCH_CHECK(fn != nullptr, "tp_kernels::", op, " on CPU needs tp_kernels.ops imported (it registers the "
              "Python implementation of the communication chain)");
  return *fn;
}

bool shm_dtype(const at::Tensor& t) {
  const auto type = t.scalar_type();
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

bool shm_backend(c10::string_view backend) { return backend == "auto" || backend == "shm"; }

at::Tensor all_reduce_cpu(const at::Tensor& x, c10::string_view group, c10::string_view backend) {
  if (shm_backend(backend) && shm_dtype(x)) {
    if (auto comm = find_shm_group(group)) return comm->all_reduce(x.contiguous(), std::nullopt);
  }
  py::gil_scoped_acquire gil;
  return fallback(fallbacks().all_reduce, "all_reduce")(x, std::string(group), std::string(backend))
      .cast<at::Tensor>();
}

void all_reduce_inplace_cpu(at::Tensor& x, c10::string_view group, c10::string_view backend) {
  if (shm_backend(backend) && shm_dtype(x) && x.is_contiguous()) {
    if (auto comm = find_shm_group(group)) {
      comm->all_reduce(x, x);
      return;
    }
  }
  py::gil_scoped_acquire gil;
  fallback(fallbacks().all_reduce_, "all_reduce_")(x, std::string(group), std::string(backend));
}

std::tuple<at::Tensor, at::Tensor> allreduce_residual_rmsnorm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                                  const at::Tensor& weight, double eps,
                                                                  c10::string_view group) {
  // The plain case only: anything the Python checks would reject is left to the Python implementation so
  // that both paths raise alike.
  const bool plain = shm_dtype(x) && x.dim() >= 1 && residual.device().is_cpu() && weight.device().is_cpu() &&
                     residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type() &&
                     residual.sizes() == x.sizes() && weight.dim() == 1 && weight.size(0) == x.size(-1) && eps > 0;
  if (plain) {
    if (auto comm = find_shm_group(group))
      return comm->allreduce_residual_rmsnorm(x.contiguous(), residual.contiguous(), weight.contiguous(), eps);
  }
  py::gil_scoped_acquire gil;
  return fallback(fallbacks().allreduce_residual_rmsnorm, "allreduce_residual_rmsnorm")(
             x, residual, weight, eps, std::string(group))
      .cast<std::tuple<at::Tensor, at::Tensor>>();
}

}  // namespace

void bind_shm_ops(py::module& m) {
  m.def(
      "register_shm_group",
      [](const std::string& group, std::shared_ptr<ShmCommunicator> comm) {
        std::lock_guard<std::mutex> lock(table_mutex());
        if (comm) {
          shm_groups()[group] = std::move(comm);
        } else {
          shm_groups().erase(group);
        }
      },
      py::arg("group"), py::arg("comm"),
      "Serve the CPU all_reduce / all_reduce_ / allreduce_residual_rmsnorm ops of group (backend 'auto' or 'shm') "
      "with comm without going through Python; None forgets the group.");
  m.def(
      "set_cpu_collective_fallbacks",
      [](py::object all_reduce, py::object all_reduce_, py::object allreduce_residual_rmsnorm) {
        // replaced ones are leaked too: a reload is rare and the old objects may still be running
        fallbacks().all_reduce = new py::object(std::move(all_reduce));
        fallbacks().all_reduce_ = new py::object(std::move(all_reduce_));
        fallbacks().allreduce_residual_rmsnorm = new py::object(std::move(allreduce_residual_rmsnorm));
      },
      py::arg("all_reduce"), py::arg("all_reduce_"), py::arg("allreduce_residual_rmsnorm"),
      "The Python implementations the CPU kernels call for everything but the registered shm groups.");
}

}  // namespace tp_kernels

TORCH_LIBRARY_IMPL(tp_kernels, CPU, m) {
  m.impl("all_reduce", &tp_kernels::all_reduce_cpu);
  m.impl("all_reduce_", &tp_kernels::all_reduce_inplace_cpu);
  m.impl("allreduce_residual_rmsnorm", &tp_kernels::allreduce_residual_rmsnorm_cpu);
}
