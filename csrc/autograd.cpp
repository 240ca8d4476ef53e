// Autograd of every tp_kernels op, one boxed kernel at the Autograd key (csrc/ops.cpp declares the ops).
//
// Why C++: a kernel at the Autograd key runs on every call, grad mode or not (torch.no_grad does not skip
// the key), so a Python one would put Python back in front of the C++ CPU collectives of shm_ops.cpp
// (~17 us a call on the CI host). Here a call that needs no graph costs a loop over its arguments.
//
// The kernels below autograd always run with grad mode off. Then the Python kernels record no graph of
// their own, and torch.distributed's gather no longer trips over the views it makes: with grad mode on,
// ParallelLMHead's all-gather over gloo failed in 2 calls of 3 ("A view was created in no_grad mode and is
// being modified inplace with grad mode enabled", issue 12).
//
// What backward does, per op (README, "Backward"), when an input requires grad:
// - the ops the drop-in layers use (DIFFERENTIABLE below): the outputs get a PythonBackward node, which
//   calls tp_kernels.ops.autograd.backward, where the formulas are (collectives themselves, so they go
//   through the group's chain like any other call);
// - the inference ops: the outputs get an Error node that raises naming the op when backward reaches it.
// An argument that an op writes into must not require grad (raises at the call): autograd cannot
// differentiate through a collective or a cache write done in place. Its version counter is bumped, so a
// graph that saved it sees the write.
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

namespace tp_kernels {
namespace {

namespace py = pybind11;
using torch::autograd::edge_list;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

const std::unordered_set<std::string>& differentiable_ops() {
  static const std::unordered_set<std::string> ops = {"tp_kernels::all_reduce", "tp_kernels::all_gather",
                                                       "tp_kernels::gemm_allreduce", "tp_kernels::gemm_reduce_scatter",
                                                       "tp_kernels::allgather_gemm"};
  return ops;
}

// tp_kernels.ops.autograd.backward, set by set_autograd_backward. Leaked on purpose (as the fallbacks of
// shm_ops.cpp): destroying a py::object after the interpreter finalized would crash at exit.
py::object*& python_backward() {
  static py::object* fn = nullptr;
  return fn;
}

// How torch holds an autograd node: c10::intrusive_ptr from torch 2.13 on, std::shared_ptr before (2.11, the GPU
// machine's torch, fails to compile the other). Taken from the type of an edge's function, so that no version
// number has to be kept up to date.
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T, class... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

bool is_tensor_argument(const c10::Argument& argument) {
  const auto& type = argument.real_type();
  if (type->kind() == c10::TypeKind::TensorType) return true;
  if (type->kind() != c10::TypeKind::OptionalType) return false;
  return type->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::TensorType;
}

bool is_written(const c10::Argument& argument) {
  const auto* alias = argument.alias_info();
  return alias != nullptr && alias->isWrite();
}

py::object to_python(const c10::IValue& v) {
  if (v.isNone()) return py::none();
  if (v.isString()) return py::str(v.toStringRef());
  if (v.isInt()) return py::int_(v.toInt());
  if (v.isDouble()) return py::float_(v.toDouble());
  if (v.isBool()) return py::bool_(v.toBool());
  TORCH_CHECK(false, "tp_kernels autograd: no Python conversion for an argument of type ", v.tagKind());
  return py::none();
}

// The backward of a differentiable op: the op's inputs as they were (tensors saved with their version, so
// an in-place change after the call raises instead of giving a wrong gradient), handed with the output
// gradients to the Python formulas. Returns one gradient per tensor argument, in schema order.
struct PythonBackward : public torch::autograd::Node {
  PythonBackward(std::string op, std::vector<c10::IValue> inputs, edge_list&& next_edges)
      : Node(std::move(next_edges)), op_(std::move(op)) {
    for (auto& v : inputs) {
      if (v.isTensor()) {
        saved_.emplace_back(v.toTensor(), /*is_output=*/false);
        others_.emplace_back();
      } else {
        saved_.emplace_back();
        others_.push_back(std::move(v));
      }
    }
  }

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(python_backward() != nullptr, op_, ": backward needs tp_kernels.ops imported (it registers the "
                "formulas)");
    std::vector<at::Tensor> inputs;
    for (const auto& s : saved_) inputs.push_back(s.unpack());
    py::gil_scoped_acquire gil;
    py::list py_grads, py_args;
    for (const auto& g : grads) py_grads.append(g.defined() ? py::cast(g) : py::none());
    for (size_t i = 0; i < saved_.size(); ++i) {
      py_args.append(inputs[i].defined() ? py::cast(inputs[i]) : to_python(others_[i]));
    }
    py::list result = (*python_backward())(op_, py_grads, py_args);
    variable_list out;
    for (const auto& item : result) out.push_back(item.is_none() ? at::Tensor() : item.cast<at::Tensor>());
    TORCH_CHECK(out.size() == num_outputs(), op_, " backward returned ", out.size(), " gradients for ",
                num_outputs(), " tensor arguments");
    return out;
  }

  std::string name() const override { return op_ + "Backward"; }

  void release_variables() override {
    // a second backward then raises torch's "Trying to backward through the graph a second time"
    for (auto& s : saved_) s.reset_data();
  }

  std::string op_;
  std::vector<SavedVariable> saved_;   // one per argument; empty for a non-tensor (and for None)
  std::vector<c10::IValue> others_;    // one per argument; None for a tensor
};

void run_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoGradMode grad_off(false);
  at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

void autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto& arguments = schema.arguments();
  const size_t n_args = arguments.size();
  const std::string& name = schema.name();
  const bool grad_mode = at::GradMode::is_enabled();
  bool needs_graph = false;
  std::vector<at::Tensor> written;
  {
    auto args = torch::jit::last(*stack, n_args);
    for (size_t i = 0; i < n_args; ++i) {
      if (!args[i].isTensor()) continue;
      const auto& t = args[i].toTensor();
      if (is_written(arguments[i])) {
        TORCH_CHECK(!(grad_mode && t.requires_grad()), name, " writes into its argument '", arguments[i].name(),
                    "', which requires grad: autograd cannot differentiate through that write. Call it under "
                    "torch.no_grad() or on a tensor that does not require grad",
                    name == "tp_kernels::all_reduce_" ? " (tp_kernels.ops.all_reduce is the differentiable, "
                                                        "out-of-place all-reduce)" : "");
        written.push_back(t);
      } else if (grad_mode && t.requires_grad()) {
        needs_graph = true;
      }
    }
  }
  std::vector<c10::IValue> inputs;  // kept for the graph only: the call consumes the stack
  if (needs_graph) inputs.assign(stack->end() - n_args, stack->end());
  run_below_autograd(op, keys, stack);
  for (const auto& t : written) torch::autograd::impl::bump_version(t);
  if (!needs_graph) return;

  edge_list edges;  // one per tensor argument, in schema order (an empty edge for None)
  for (size_t i = 0; i < n_args; ++i) {
    if (!is_tensor_argument(arguments[i])) continue;
    edges.push_back(inputs[i].isTensor() ? torch::autograd::impl::gradient_edge(inputs[i].toTensor())
                                         : torch::autograd::Edge());
  }
  NodePtr node;
  if (differentiable_ops().count(name)) {
    node = make_node<PythonBackward>(name, std::move(inputs), std::move(edges));
  } else {
    node = make_node<torch::autograd::Error>(
        name + " has no backward: it is an inference op (README, 'Backward'). Call it under torch.no_grad(), or "
               "use the differentiable ops: all_reduce, all_gather, gemm_allreduce, gemm_reduce_scatter, "
               "allgather_gemm",
        std::move(edges));
  }
  for (auto& out : torch::jit::last(*stack, schema.returns().size())) {
    if (out.isTensor() && torch::autograd::isDifferentiableType(out.toTensor().scalar_type())) {
      torch::autograd::set_history(out.toTensor(), node);
    }
  }
}

}  // namespace

void bind_autograd(py::module& m) {
  m.def(
      "set_autograd_backward",
      [](py::object fn) { python_backward() = new py::object(std::move(fn)); },
      py::arg("fn"),
      "The Python formulas of the differentiable ops: fn(op, grads, args) -> one gradient (or None) per tensor "
      "argument of op, in schema order.");
}

}  // namespace tp_kernels

TORCH_LIBRARY_IMPL(tp_kernels, Autograd, m) {
  for (const char* op : {"qkv_rope", "qkv_rope_kv_cache", "gemm_allreduce", "gemm_reduce_scatter", "allgather_gemm",
                         "all_reduce", "all_reduce_", "all_gather", "add_rmsnorm", "allreduce_residual_rmsnorm"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&tp_kernels::autograd_kernel>());
  }
}
