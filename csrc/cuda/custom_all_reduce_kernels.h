// The interface between the host code of the CUDA IPC all-reduce (custom_all_reduce_host.cpp) and its kernels
// (custom_all_reduce.cu): plain structs and one launcher, so the .cu includes no ATen header (nvcc parses
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
constexpr int kBufferRecordBytes = kIpcHandleBytes + 8;  // handle, then int64 offset of the address in it
// Device-side slots of peer-pointer tables: slot 0 is the staging buffers; the others hold registered
// inputs (one per distinct address captured in CUDA graphs). 4096 slots x 64 B = 256 KB of device memory.
constexpr int kMaxRankDataSlots = 4096;

struct Flags {
  // flag[b][p]: the last barrier value that block b of rank p signalled to this rank. Written by the
  // peers (remote stores over NVLink), read by this rank's block b.
  uint32_t flag[kMaxBlocks][kMaxWorldSize];
  // counter[b]: barrier values this rank's block b has used. Local: read when a kernel starts, written
  // when it ends, so values keep increasing across launches and CUDA-graph replays (a value passed as a
  // kernel argument would be frozen into the graph).
  uint32_t counter[kMaxBlocks];
};
constexpr int64_t kFlagsBytes = (sizeof(Flags) + 255) / 256 * 256;  // keeps staging 256-byte aligned

// Where every rank's input is, as this rank maps it.
struct RankData {
  const char* ptr[kMaxWorldSize];
};

struct Params {
  // pointers
  const RankData* inputs;          // device memory: each rank's input (staging buffer or registered address)
  Flags* flags[kMaxWorldSize];     // every rank's flags, mapped here (own included)
  char* results[kMaxWorldSize];    // every rank's results region (two-shot)
  void* out;                       // plain: (numel,); fused: new_residual (n_rows, hidden)
  void* normed;                    // fused: (n_rows, hidden)
  const void* residual;            // fused: (n_rows, hidden)
  const void* weight;              // fused: (hidden,)
  int* error_word;                 // host-mapped: peer + 1 when a wait timed out
  // sizes
  int64_t n_packs;                 // plain: 16-byte packs, then n_tail single elements
  int64_t chunk;                   // packs (plain) or rows (fused) per rank in two-shot
  int64_t n_rows, packs_per_row;   // fused
  int64_t normed_offset_bytes;     // fused two-shot: normed's offset in the results region
  uint64_t timeout_ns;
  int n_tail, rank, world_size;
  // meta-parameters
  bool two_shot;
  float eps;
};

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Launches the plain (fused = false) or fused residual + RMSNorm kernel on stream; returns the launch's
// error code.
cudaError_t launch_all_reduce(const Params& params, DType dtype, bool fused, int n_blocks, cudaStream_t stream);

}  // namespace ipc
}  // namespace tp_kernels
