// pybind11 bindings of the shared-memory communicator (tp_kernels._C.ShmCommunicator); the Python side is
// tp_kernels/comm/shm.py. Collectives release the GIL: they may wait for other processes for up to the
// timeout, and other Python threads should run meanwhile.
#include <torch/extension.h>

#include "cpu/shm_comm.h"

namespace tp_kernels {

void bind_shm(pybind11::module& m) {
  namespace py = pybind11;
  using shm::ShmCommunicator;
  py::class_<ShmCommunicator, std::shared_ptr<ShmCommunicator>>(
      m, "ShmCommunicator", "Shared-memory all-reduce among the ranks of one group on one host (csrc/cpu/shm_comm.h)")
      .def_static("create", &ShmCommunicator::create, py::arg("world_size"), py::arg("slot_bytes"),
                  py::arg("timeout_s"), py::arg("label"),
                  "Rank 0: create a segment under a fresh random name (see .name) for world_size ranks.")
      .def_static("attach", &ShmCommunicator::attach, py::arg("name"), py::arg("rank"), py::arg("world_size"),
                  py::arg("timeout_s"), py::arg("label"), "Ranks > 0: map the segment rank 0 created.")
      .def("finish_setup", &ShmCommunicator::finish_setup, py::call_guard<py::gil_scoped_release>(),
           "Every rank: wait until all ranks mapped the segment; rank 0 then unlinks it.")
      .def("all_reduce", &ShmCommunicator::all_reduce, py::arg("x"), py::arg("out") = py::none(),
           py::call_guard<py::gil_scoped_release>(),
           "Sum of x over the ranks into out (a new tensor when None); fp32 accumulation, same bits on every rank.")
      .def("allreduce_residual_rmsnorm", &ShmCommunicator::allreduce_residual_rmsnorm, py::arg("x"),
           py::arg("residual"), py::arg("weight"), py::arg("eps"), py::call_guard<py::gil_scoped_release>(),
           "(normed, new_residual) = add_rmsnorm(all_reduce(x), residual, weight, eps) in one pass.")
      .def("close", &ShmCommunicator::close, py::call_guard<py::gil_scoped_release>(),
           "Unmap the segment. Idempotent.")
      .def_property_readonly("name", &ShmCommunicator::name)
      .def_property_readonly("rank", &ShmCommunicator::rank)
      .def_property_readonly("world_size", &ShmCommunicator::world_size)
      .def_property_readonly("slot_bytes", &ShmCommunicator::slot_bytes)
      .def_property_readonly("closed", &ShmCommunicator::closed)
      .def_property_readonly("sequence", &ShmCommunicator::sequence)
      .def_property("timeout_s", &ShmCommunicator::timeout_s, &ShmCommunicator::set_timeout_s)
      .def_property("one_shot_max_bytes", &ShmCommunicator::one_shot_max_bytes,
                    &ShmCommunicator::set_one_shot_max_bytes)
      .def_property("stream_min_bytes", &ShmCommunicator::stream_min_bytes, &ShmCommunicator::set_stream_min_bytes)
      .def_property("publish_stores", &ShmCommunicator::store_mode, &ShmCommunicator::set_store_mode)
      .def("store_estimates", &ShmCommunicator::store_estimates, py::arg("bytes"),
           "Rank 0: (ordinary, non-temporal) mean seconds per byte of two-shot calls of this size class.")
      .def_property_readonly_static("reduce_isa", [](py::object) { return std::string(shm::reduce_isa()); });
}

}  // namespace tp_kernels
