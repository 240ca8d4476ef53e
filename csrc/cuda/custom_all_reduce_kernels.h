// The interface between the host code of the CUDA IPC all-reduce (custom_all_reduce_host.cpp) and its kernels
// (custom_all_reduce.cu): plain structs and launchers, so the .cu includes no ATen header (nvcc parses
// a .cu once per target architecture; ATen would triple the compile time of this small file).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tp_kernels {
namespace ipc {

// Mirrors of tp_kernels/comm/ipc_plan.py (checked equal by tests/test_cuda_ipc_host.py).
constexpr int kMaxWorldSize = 8;
constexpr int kMaxBlocks = 64;
constexpr int kThreadsPerBlock = 512;
constexpr int kPackBytes = 16;
constexpr int kIpcHandleBytes = 64;
// Device-side slots of peer-pointer tables (RankData). Slot 0 is the staging buffers; every all-reduce captured
// inside CudaIpcCommunicator.capture() gets a slot of its own, never reused (a graph that still exists reads
// its slots at every replay). 32768 slots x 64 B = 2 MiB of device memory: 80 layers x 2 all-reduces x 200
// captured batch sizes.
constexpr int kMaxSlots = 32768;

// What the host-mapped error word holds after a kernel trapped: kind << kErrorKindShift | detail.
constexpr int kErrorKindShift = 24;
constexpr int kErrorBarrierTimeout = 1;  // detail: the rank that did not arrive
constexpr int kErrorNullInput = 2;       // detail: the slot whose peer pointers were never filled

struct Flags {
  // flag[b][p]: the last barrier value that block b of rank p signalled to this rank. Written by the
  // peers (remote stores over NVLink), read by this rank's block b.
  uint32_t flag[kMaxBlocks][kMaxWorldSize];
  // counter[b]: barrier values this rank's block b has used. Local: read when a kernel starts, written
  // when it ends, so values keep increasing across launches and CUDA-graph replays (a value passed as a
  // kernel argument would be frozen into the graph).
  uint32_t counter[kMaxBlocks];
  // The fused kernel's row-group barrier (a row split over `split` blocks of this rank; local only):
  // group g = blocks [g * split, (g + 1) * split). arrived[g] counts the group's blocks at the barrier,
  // generation[g] counts completed barriers, partial_sum_sq[b] is block b's share of its row's sum of squares.
  uint32_t group_arrived[kMaxBlocks];
  uint32_t group_generation[kMaxBlocks];
  float partial_sum_sq[kMaxBlocks];
};
constexpr int64_t kFlagsBytes = (sizeof(Flags) + 255) / 256 * 256;  // keeps staging 256-byte aligned

// Where every rank's input is, as this rank maps it.
struct RankData {
  const char* ptr[kMaxWorldSize];
};

struct Params {
  // pointers
  const RankData* inputs;          // device memory: slot `slot` of the table (staging buffers or captured inputs)
  Flags* flags[kMaxWorldSize];     // every rank's flags, mapped here (own included)
  char* results[kMaxWorldSize];    // every rank's results region (two-shot)
  void* out;                       // plain: (numel,); fused: new_residual (n_rows, hidden)
  void* normed;                    // fused: (n_rows, hidden)
  const void* residual;            // fused: (n_rows, hidden)
  const void* weight;              // fused: (hidden,)
  int* error_word;                 // host-mapped: see kErrorKindShift
  // sizes
  int64_t n_packs;                 // plain: 16-byte packs, then n_tail single elements
  int64_t chunk;                   // packs (plain) or rows (fused) per rank in two-shot
  int64_t n_rows, packs_per_row;   // fused
  int64_t packs_per_slice;         // fused: packs of a row per block, ceil(packs_per_row / split)
  int64_t normed_offset_bytes;     // fused two-shot: normed's offset in the results region
  uint64_t timeout_ns;             // 0: wait forever
  int n_tail, rank, world_size;
  int split;                       // fused: blocks per row (gridDim.x is a multiple of it)
  int slot;                        // named in the error word when the slot holds a null pointer
  // meta-parameters
  bool two_shot;
  float eps;
};

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Launches the plain (fused = false) or fused residual + RMSNorm kernel on stream; returns the launch's
// error code.
cudaError_t launch_all_reduce(const Params& params, DType dtype, bool fused, int n_blocks, cudaStream_t stream);

// How many blocks of the all-reduce kernels `device` runs at once (blocks per SM for the worst instance x SMs):
// a launch must not exceed it, since every block waits at barriers for others.
cudaError_t max_resident_blocks(int device, int* blocks);

// dst[0, n_packs) <- src[0, n_packs) in 16-byte loads by a kernel, the way the all-reduce reads a peer (not
// by the copy engines, which take another path): the transfer check of a newly mapped peer.
cudaError_t launch_peer_read(const void* src, void* dst, int64_t n_packs, cudaStream_t stream);

}  // namespace ipc
}  // namespace tp_kernels
