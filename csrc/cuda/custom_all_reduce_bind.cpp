// Python bindings of the CUDA IPC custom all-reduce (tp_kernels._C.CustomAllReduce), used by
// tp_kernels/comm/cuda_ipc.py. Compiled only in the CUDA build (setup.py globs csrc/cuda/*.cpp then);
// csrc/module.cpp calls bind_cuda_ipc under TP_KERNELS_WITH_CUDA.
#include <torch/extension.h>

#include "cuda/custom_all_reduce.h"

void bind_cuda_ipc(pybind11::module& m) {
  namespace py = pybind11;
  using tp_kernels::ipc::CustomAllReduce;
  m.def("cuda_ipc_limits", &tp_kernels::ipc::limits,
        "the limits compiled into the CUDA IPC all-reduce kernels (mirrored by tp_kernels.comm.ipc_plan)");
  py::class_<CustomAllReduce>(m, "CustomAllReduce")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>(), py::arg("rank"), py::arg("world_size"),
           py::arg("max_bytes"), py::arg("device_index"))
      .def("ipc_handle", &CustomAllReduce::ipc_handle)
      .def("open_peers", &CustomAllReduce::open_peers, py::arg("handles"))
      .def("all_reduce", &CustomAllReduce::all_reduce, py::arg("input"), py::arg("output"), py::arg("two_shot"),
           py::arg("n_blocks"), py::arg("chunk"), py::arg("registered"), py::arg("timeout_ms"))
      .def("allreduce_residual_rmsnorm", &CustomAllReduce::allreduce_residual_rmsnorm, py::arg("input"),
           py::arg("residual"), py::arg("weight"), py::arg("normed"), py::arg("new_residual"), py::arg("eps"),
           py::arg("two_shot"), py::arg("n_blocks"), py::arg("chunk"), py::arg("registered"),
           py::arg("timeout_ms"))
      .def("pending_graph_buffers", &CustomAllReduce::pending_graph_buffers)
      .def("register_graph_buffers", &CustomAllReduce::register_graph_buffers, py::arg("records"))
      .def("n_registered_buffers", &CustomAllReduce::n_registered_buffers)
      .def("timed_out_peer", &CustomAllReduce::timed_out_peer)
      .def("close", &CustomAllReduce::close);
}
