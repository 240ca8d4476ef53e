// Host interface of the CUDA IPC custom all-reduce (implemented in custom_all_reduce_host.cpp; kernels in
// custom_all_reduce.cu; Python bindings in custom_all_reduce_bind.cpp). Decisions (algorithm, grid,
// per-rank split, fall-back to NCCL) are made by tp_kernels/comm/ipc_plan.py and passed in; this side
// checks them and launches.
//
// Each rank cudaMallocs one buffer, laid out as
//   [ Flags (barrier flags written by peers + this rank's barrier counters) | staging (max_bytes)
//     | results (2 x max_bytes: the two-shot reduce-scatter output; new_residual then normed when fused) ]
// and the ranks exchange its IPC handle through the CPU process group (Python does the exchange).
#pragma once

#include <ATen/ATen.h>

#include "cuda/custom_all_reduce_kernels.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tp_kernels {
namespace ipc {

std::map<std::string, int64_t> limits();

class CustomAllReduce {
 public:
  CustomAllReduce(int64_t rank, int64_t world_size, int64_t max_bytes, int64_t device_index);
  ~CustomAllReduce();
  CustomAllReduce(const CustomAllReduce&) = delete;
  CustomAllReduce& operator=(const CustomAllReduce&) = delete;

  // (kIpcHandleBytes,) uint8 CPU tensor: the IPC handle of this rank's buffer.
  at::Tensor ipc_handle() const;
  // handles[r] is rank r's ipc_handle(); maps every peer's buffer. Called once, by every rank.
  void open_peers(const std::vector<at::Tensor>& handles);

  // output = sum over ranks of input. registered: input's address is in a registered IPC buffer (or is
  // being captured into a CUDA graph, which records it for register_graph_buffers); otherwise input is
  // first copied into this rank's staging buffer.
  void all_reduce(const at::Tensor& input, at::Tensor& output, bool two_shot, int64_t n_blocks, int64_t chunk,
                  bool registered, int64_t timeout_ms);
  // new_residual = all_reduce(input) + residual; normed = rmsnorm(new_residual) * weight, in the kernel.
  void allreduce_residual_rmsnorm(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& weight,
                                  at::Tensor& normed, at::Tensor& new_residual, double eps, bool two_shot,
                                  int64_t n_blocks, int64_t chunk, bool registered, int64_t timeout_ms);

  // (n_pending, kBufferRecordBytes) uint8: a record per input address captured since the last
  // register_graph_buffers, in capture order (the same order on every rank).
  at::Tensor pending_graph_buffers() const;
  // records[r] is rank r's pending_graph_buffers(): opens the peers' buffers and fills the slots the
  // captured kernels read their peer pointers from. Must run before the graph is replayed.
  void register_graph_buffers(const std::vector<at::Tensor>& records);
  int64_t n_registered_buffers() const { return static_cast<int64_t>(registered_slots_.size()); }

  // The peer a barrier timed out on (the kernel then traps), or -1.
  int64_t timed_out_peer() const;
  void close();

 private:
  int slot_for_input(const at::Tensor& input, bool registered);
  char* open_handle(const char* handle_bytes);

  int rank_, world_size_, device_;
  int64_t max_bytes_;
  bool peers_open_ = false;
  char* buffer_ = nullptr;          // this rank's IPC buffer
  char* peer_buffers_[kMaxWorldSize] = {};  // every rank's buffer, mapped here (own one included)
  void* rank_data_ = nullptr;       // device array of kMaxRankDataSlots peer-pointer tables
  int n_rank_data_used_ = 1;        // slot 0: the staging buffers
  std::map<uintptr_t, int> registered_slots_;  // input address -> slot
  std::vector<uintptr_t> pending_;  // addresses captured since the last register_graph_buffers
  std::map<std::string, char*> opened_handles_;  // handle bytes -> mapped base (each opened once)
  int* error_word_host_ = nullptr;  // host-mapped: peer + 1 when a barrier timed out
  int* error_word_device_ = nullptr;
};

}  // namespace ipc
}  // namespace tp_kernels
