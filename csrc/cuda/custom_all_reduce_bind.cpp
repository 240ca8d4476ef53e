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
  // Method by method documentation: csrc/cuda/custom_all_reduce.h. The GIL is held throughout: every method
  // returns within microseconds, except the transfer check and write_slots, which synchronize one stream.
  py::class_<CustomAllReduce>(m, "CustomAllReduce")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>(), py::arg("rank"), py::arg("world_size"),
           py::arg("max_bytes"), py::arg("device_index"))
      .def("ipc_handle", &CustomAllReduce::ipc_handle)
      .def("open_peers", &CustomAllReduce::open_peers, py::arg("handles"))
      .def("staging_address", &CustomAllReduce::staging_address, py::arg("rank"))
      .def("write_staging", &CustomAllReduce::write_staging, py::arg("src"))
      .def("read_peer_staging", &CustomAllReduce::read_peer_staging, py::arg("peer"), py::arg("dst"))
      .def("all_reduce", &CustomAllReduce::all_reduce, py::arg("input"), py::arg("output"), py::arg("two_shot"),
           py::arg("n_blocks"), py::arg("chunk"), py::arg("slot"), py::arg("stage"), py::arg("timeout_ms"))
      .def("allreduce_residual_rmsnorm", &CustomAllReduce::allreduce_residual_rmsnorm, py::arg("input"),
           py::arg("residual"), py::arg("weight"), py::arg("normed"), py::arg("new_residual"), py::arg("eps"),
           py::arg("two_shot"), py::arg("n_blocks"), py::arg("chunk"), py::arg("split"), py::arg("slot"),
           py::arg("stage"), py::arg("timeout_ms"))
      .def("max_resident_blocks", &CustomAllReduce::max_resident_blocks)
      .def("locate_input", &CustomAllReduce::locate_input, py::arg("input"))
      .def("export_allocation", &CustomAllReduce::export_allocation, py::arg("base"))
      .def("open_buffer", &CustomAllReduce::open_buffer, py::arg("handle"))
      .def("write_slots", &CustomAllReduce::write_slots, py::arg("first_slot"), py::arg("table"))
      .def("release_graph_buffers", &CustomAllReduce::release_graph_buffers, py::arg("end_slot"))
      .def("error_word", &CustomAllReduce::error_word)
      .def("close_peer_handles", &CustomAllReduce::close_peer_handles)
      .def("free_buffers", &CustomAllReduce::free_buffers);
}
