// Element-wise reductions of the shared-memory communicator: sums of several same-shaped buffers in a
// fixed source order with fp32 accumulation, and the same sum fused with a residual add and RMSNorm.
// Every rank runs the same code over the same index ranges, so every rank gets the same bits.
#pragma once

#include <cstdint>
#include <cstring>

namespace tp_kernels {
namespace shm {

enum class DType : uint32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

int64_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

// out[i] = T(sum_{r < n_srcs} float(srcs[r][i])) for i < n, summed in the order r = 0, 1, ...;
// also written to out2 when it is not null. A source may be out or out2 itself (element i is read before
// element i is written), not overlap them otherwise.
void reduce_sum(DType dtype, const void* const* srcs, int n_srcs, int64_t n, void* out, void* out2);

// For each of n_rows rows of hidden elements (row offsets row * hidden in every buffer):
//   x            = T(sum_r float(srcs[r][row]))            (written to x_out when it is not null)
//   new_residual = T(float(x) + float(residual[row]))
//   normed       = T(float(new_residual) * inv_rms * float(weight)),
//   inv_rms      = 1 / sqrt(mean(float(new_residual)^2) + eps)
// the all-reduce, residual add and RMSNorm in one pass over the reduced data.
void reduce_residual_rmsnorm(DType dtype, const void* const* srcs, int n_srcs, int64_t n_rows, int64_t hidden,
                             const void* residual, const void* weight, float eps, void* normed,
                             void* new_residual, void* x_out);

// memcpy with non-temporal (cache-bypassing) stores where the CPU has them (SSE2 on x86-64): for outputs
// larger than the caches, which an ordinary store would first read from memory. Call streaming_fence()
// after the last one, before the data is handed to anyone else.
void copy_streaming(void* dst, const void* src, int64_t bytes);
void streaming_fence();

// copy_streaming when non_temporal, else memcpy.
inline void copy_bytes(void* dst, const void* src, int64_t bytes, bool non_temporal) {
  if (non_temporal) {
    copy_streaming(dst, src, bytes);
  } else {
    std::memcpy(dst, src, static_cast<size_t>(bytes));
  }
}

// "avx2+f16c" or "baseline": which compiled variant the CPU runs (chosen once, at load).
const char* reduce_isa();

}  // namespace shm
}  // namespace tp_kernels
