// Block-wide float sum shared by the CUDA kernels (add_rmsnorm, the fused all-reduce epilogue). Pure CUDA:
// no ATen, so the ATen-free custom all-reduce translation unit can include it.
#pragma once

namespace tp_kernels {

// Sum of `value` over the kThreads threads of the block, returned to every thread. Safe to call once per
// row in a loop: the last barrier keeps the next call from overwriting warp_sums before all have read it.
template <int kThreads>
__device__ __forceinline__ float block_sum(float value) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be whole warps, at most 1024");
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();  // matches the reads of warp_sums below
  value = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    if (lane == 0) warp_sums[0] = value;
  }
  __syncthreads();  // matches the write of warp_sums[0] above
  const float total = warp_sums[0];
  __syncthreads();  // every thread has read warp_sums[0] before a next call overwrites it
  return total;
}

}  // namespace tp_kernels
