// pybind11 bindings of the shared-memory communicator (tp_kernels._C.ShmCommunicator); the Python side is
// tp_kernels/comm/shm.py. Collectives release the GIL: they may wait for other processes for up to the
// timeout, and other Python threads should run meanwhile. Waits of the main thread run Python's signal
// handlers every few milliseconds (see python_interrupt_check), so Ctrl-C raises KeyboardInterrupt there.
#include <torch/extension.h>

#include <pthread.h>

#include "cpu/shm_comm.h"

namespace tp_kernels {
namespace {

namespace py = pybind11;

// pthread_self() of Python's main thread, the only one that runs signal handlers.
uint64_t& main_thread() {
  static uint64_t thread = 0;
  return thread;
}

// The communicator's interrupt check: in the main thread, run the pending signal handlers; one that raised
// (KeyboardInterrupt for Ctrl-C) is thrown as py::error_already_set, which pybind11 and torch's op
// dispatch turn back into that Python exception.
void python_interrupt_check() {
  if (static_cast<uint64_t>(pthread_self()) != main_thread() || !Py_IsInitialized()) return;
  py::gil_scoped_acquire gil;  // re-entrant: a torch op's kernel waits with the GIL held
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

}  // namespace

void bind_shm(pybind11::module& m) {
  using shm::ShmCommunicator;
  main_thread() = py::module_::import("threading").attr("main_thread")().attr("ident").cast<uint64_t>();
  ShmCommunicator::set_interrupt_check(&python_interrupt_check);
  py::class_<ShmCommunicator, std::shared_ptr<ShmCommunicator>>(
      m, "ShmCommunicator", "Shared-memory all-reduce among the ranks of one group on one host (csrc/cpu/shm_comm.h)")
      .def_static("segment_bytes", &ShmCommunicator::segment_bytes, py::arg("world_size"), py::arg("slot_bytes"),
                  "Bytes of shared memory the communicator of world_size ranks with slots of slot_bytes maps.")
      .def_static("map_fd", &ShmCommunicator::map_fd, py::arg("fd"), py::arg("offset"), py::arg("rank"),
                  py::arg("world_size"), py::arg("slot_bytes"), py::arg("timeout_s"), py::arg("label"),
                  "Every rank: check and map segment_bytes(world_size, slot_bytes) bytes of the shared descriptor "
                  "fd (a sealed 0600 memfd of this user, tp_kernels.comm.segment) from offset; rank 0 writes the "
                  "header. Then finish_setup on every rank.")
      .def("finish_setup", &ShmCommunicator::finish_setup, py::call_guard<py::gil_scoped_release>(),
           "Every rank: wait until all ranks mapped the segment; ranks > 0 check rank 0's header.")
      .def("all_reduce", &ShmCommunicator::all_reduce, py::arg("x"), py::arg("out") = py::none(),
           py::call_guard<py::gil_scoped_release>(),
           "Sum of x over the ranks into out (a new tensor when None); fp32 accumulation, same bits on every rank.")
      .def("allreduce_residual_rmsnorm", &ShmCommunicator::allreduce_residual_rmsnorm, py::arg("x"),
           py::arg("residual"), py::arg("weight"), py::arg("eps"), py::call_guard<py::gil_scoped_release>(),
           "(normed, new_residual) = add_rmsnorm(all_reduce(x), residual, weight, eps) in one pass.")
      .def("close", &ShmCommunicator::close, py::call_guard<py::gil_scoped_release>(),
           "Unmap the segment. Idempotent.")
      .def("bind_thread", &ShmCommunicator::bind_thread, py::arg("thread"),
           "Serve collectives from this thread (threading.get_ident()) instead of the one that made it.")
      .def("allow_helper_thread", &ShmCommunicator::allow_helper_thread, py::arg("thread"),
           "Also serve collectives from this thread, never at the same time as the owner's.")
      .def_property_readonly("owner_thread", &ShmCommunicator::owner_thread)
      .def_property_readonly("segment_id", &ShmCommunicator::segment_id)
      .def_property_readonly("poisoned_by", &ShmCommunicator::poisoned_by,
                             "The rank whose failure made the communicator unusable, -1 while it is healthy.")
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
