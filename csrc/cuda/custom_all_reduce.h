// Host interface of the CUDA IPC custom all-reduce (implemented in custom_all_reduce_host.cpp; kernels in
// custom_all_reduce.cu; Python bindings in custom_all_reduce_bind.cpp). Decisions (algorithm, grid,
// per-rank split, which slot an input uses, fall-back to NCCL) are made in Python (tp_kernels/comm/ipc_plan.py,
// ipc_graphs.py, cuda_ipc.py) and passed in; this side checks them, maps memory and launches.
//
// Each rank cudaMallocs one buffer, laid out as
//   [ Flags (barrier flags written by peers + this rank's barrier counters) | staging (max_bytes)
//     | results (2 x max_bytes: the two-shot reduce-scatter output; new_residual then normed when fused) ]
// and the ranks exchange its IPC handle through the CPU process group (Python does the exchange).
//
// Lifetime (CUDA: freeing exported memory before every importer closed its mapping is undefined behaviour):
//   close_peer_handles() on every rank, then a barrier of the group, then free_buffers() on every rank.
// The destructor cannot take part in a barrier: it closes this rank's mappings and frees only memory that was
// never exported (an exported buffer is left to the process's exit).
#pragma once

#include <ATen/ATen.h>

#include "cuda/custom_all_reduce_kernels.h"

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
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

  // -- connection -----------------------------------------------------------------------------------------
  // (kIpcHandleBytes,) uint8 CPU tensor: the IPC handle of this rank's buffer.
  at::Tensor ipc_handle();
  // handles[r] is rank r's ipc_handle(); maps every peer's buffer and fills slot 0 (the staging buffers).
  // Called once. On failure, closes what it opened and raises naming the rank.
  void open_peers(const std::vector<at::Tensor>& handles);
  // The address of rank r's staging region as this process maps it (own one included).
  int64_t staging_address(int64_t rank) const;
  // The transfer check: write_staging copies src (a CUDA tensor of at most max_bytes) into this rank's
  // staging region; read_peer_staging fills dst (CUDA, 16-byte multiple) from rank peer's staging region with
  // a kernel's 16-byte loads, as the all-reduce reads peers. Both return once the copy is done.
  void write_staging(const at::Tensor& src);
  void read_peer_staging(int64_t peer, at::Tensor& dst);

  // -- collectives ----------------------------------------------------------------------------------------
  // output = sum over ranks of input. slot: the row of the peer-pointer table the kernel reads the inputs'
  // addresses from (0: the staging buffers; others only while the current stream is capturing). stage: copy
  // input into this rank's staging buffer first (slot 0 always stages).
  void all_reduce(const at::Tensor& input, at::Tensor& output, bool two_shot, int64_t n_blocks, int64_t chunk,
                  int64_t slot, bool stage, int64_t timeout_ms);
  // new_residual = all_reduce(input) + residual; normed = rmsnorm(new_residual) * weight, in the kernel. split:
  // blocks per row (n_blocks is a multiple of it).
  void allreduce_residual_rmsnorm(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& weight,
                                  at::Tensor& normed, at::Tensor& new_residual, double eps, bool two_shot,
                                  int64_t n_blocks, int64_t chunk, int64_t split, int64_t slot, bool stage,
                                  int64_t timeout_ms);

  // How many blocks of the kernels this GPU runs at once; a launch of more is refused (the barriers need every
  // block resident).
  int64_t max_resident_blocks() const { return resident_blocks_; }

  // -- CUDA-graph inputs ----------------------------------------------------------------------------------
  // (base, offset): the cudaMalloc'd segment of torch's caching allocator that holds input, and input's offset
  // in it. Host bookkeeping only, so it is called while the call is captured, when input is certainly alive: a
  // captured input is usually a temporary (a GEMM's output) that is freed before the capture ends, and torch
  // finds only live blocks (and only by their first byte, so the storage's, not the view's, address is used).
  std::tuple<int64_t, int64_t> locate_input(const at::Tensor& input) const;
  // (kIpcHandleBytes,) uint8: the IPC handle of the segment at base (a locate_input base; the segment outlives
  // the capture: a graph's private pool keeps its segments while the graph exists).
  at::Tensor export_allocation(int64_t base) const;
  // Maps a peer allocation exported by export_allocation; returns its base address here. Each handle is opened
  // once and stays mapped until release_graph_buffers or close_peer_handles.
  int64_t open_buffer(const at::Tensor& handle);
  // Slots [first_slot, first_slot + n) <- table (n, world_size) int64 CPU: addresses, as mapped here, of
  // each rank's input of each captured call. Copied on the current stream, which is then synchronized.
  void write_slots(int64_t first_slot, const at::Tensor& table);
  // Zeroes slots [1, end_slot) (a later replay of a graph that used them traps, naming the slot) and closes
  // every mapping open_buffer made.
  void release_graph_buffers(int64_t end_slot);

  // -- errors and teardown --------------------------------------------------------------------------------
  // 0, or what the last trapped kernel recorded (kind << kErrorKindShift | detail). Host memory: readable
  // after the trap has made the CUDA context unusable.
  int64_t error_word() const;
  void close_peer_handles();
  void free_buffers();

 private:
  void check_open(const char* what) const;
  void close_handles(std::map<std::string, char*>& handles);
  const RankData* slot_for(const at::Tensor& input, int64_t slot, bool stage, cudaStream_t stream);

  int rank_, world_size_, device_;
  int64_t max_bytes_;
  int64_t resident_blocks_ = 0;
  bool peers_open_ = false;
  bool exported_ = false;
  char* buffer_ = nullptr;          // this rank's IPC buffer
  char* peer_buffers_[kMaxWorldSize] = {};  // every rank's buffer, mapped here (own one included)
  RankData* rank_data_ = nullptr;   // device array of kMaxSlots peer-pointer tables
  std::map<std::string, char*> peer_handles_;   // the peers' IPC buffers: handle bytes -> mapped base
  std::map<std::string, char*> graph_handles_;  // peers' captured inputs' allocations: handle bytes -> base
  int* error_word_host_ = nullptr;  // host-mapped: see kErrorKindShift
  int* error_word_device_ = nullptr;
};

}  // namespace ipc
}  // namespace tp_kernels
