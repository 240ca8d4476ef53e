// CUDA IPC custom all-reduce kernels: one-shot and two-shot, with flag barriers between the ranks'
// blocks, fp32/fp16/bf16 with fp32 accumulation, and the residual + RMSNorm epilogue fused in. The host
// side (buffers, IPC handles, CUDA-graph registration) is custom_all_reduce_host.cpp; the decisions (algorithm,
// grid, split) come from tp_kernels/comm/ipc_plan.py.
//
// Every rank launches the same grid (the plan depends only on the message and the world size), and block
// b of one rank only ever synchronizes with block b of the others: the element -> block mapping is the
// same in every phase, so a block reads only what the same-index blocks of its peers wrote.
#include "cuda/block_reduce.cuh"
#include "cuda/custom_all_reduce_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tp_kernels {
namespace ipc {
namespace {

// -- memory-model primitives ------------------------------------------------------------------------------
__device__ __forceinline__ void store_release_sys(uint32_t* addr, uint32_t value) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* addr) {
  uint32_t value;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(addr) : "memory");
  return value;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// GPU-scope (this rank's blocks only) primitives of the fused kernel's row-group barrier.
__device__ __forceinline__ uint32_t load_acquire_gpu(const uint32_t* addr) {
  uint32_t value;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(value) : "l"(addr) : "memory");
  return value;
}

__device__ __forceinline__ void store_release_gpu(uint32_t* addr, uint32_t value) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ void store_relaxed_gpu(uint32_t* addr, uint32_t value) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ uint32_t fetch_add_acq_rel_gpu(uint32_t* addr, uint32_t value) {
  uint32_t old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(addr), "r"(value) : "memory");
  return old;
}

__device__ __forceinline__ float load_relaxed_gpu(const float* addr) {
  float value;
  asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];" : "=f"(value) : "l"(addr) : "memory");
  return value;
}

// Records what went wrong where the host can read it after the trap (the context is then unusable, so the
// host-mapped word is the only way out), then aborts the kernel.
__device__ __forceinline__ void fail(const Params& p, int kind, int detail) {
  *reinterpret_cast<volatile int*>(p.error_word) = (kind << kErrorKindShift) | detail;
  __threadfence_system();
  __trap();
}

// A cross-rank barrier of block blockIdx.x with the blocks of the same index on every rank.
__device__ __forceinline__ void barrier(const Params& p, uint32_t value) {
  __syncthreads();  // this block's reads and writes before the barrier are done: they are what it publishes
  if (threadIdx.x < p.world_size) {
    const int peer = threadIdx.x;
    // [S] signal: tell `peer` that this block reached barrier `value`. The release (after the
    // __syncthreads above) orders the whole block's earlier writes before the flag. Matches [W] on `peer`.
    store_release_sys(&p.flags[peer]->flag[blockIdx.x][p.rank], value);
    // [W] wait for `peer`'s [S] of this barrier; the acquire makes its earlier writes visible here. A peer
    // can be at most one barrier ahead (it cannot pass the next one without this block), so compare with
    // >= modulo 2^32 rather than ==.
    const uint32_t* slot = &p.flags[p.rank]->flag[blockIdx.x][peer];
    if (static_cast<int32_t>(load_acquire_sys(slot) - value) < 0) {
      const uint64_t start = global_timer_ns();
      while (static_cast<int32_t>(load_acquire_sys(slot) - value) < 0) {
        // A hang would freeze the whole job: after timeout_ns (0: never) record which rank never arrived
        // and abort. The trap makes this process's CUDA context unusable, hence a long default (600 s).
        if (p.timeout_ns != 0 && global_timer_ns() - start > p.timeout_ns) fail(p, kErrorBarrierTimeout, peer);
      }
    }
  }
  __syncthreads();  // extends the acquire above to every thread of the block
}

// -- packs: 16 bytes, 4 fp32 or 8 fp16/bf16 -------------------------------------------------------------
template <typename scalar_t>
union Pack {
  static constexpr int kElems = kPackBytes / sizeof(scalar_t);
  uint4 raw;
  scalar_t elem[kElems];
};

// Explicit conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__); float -> half/bfloat16 rounds to
// nearest even, as c10::Half and c10::BFloat16 (the CPU path) do.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> load_pack(const void* base, int64_t pack) {
  Pack<scalar_t> v;
  v.raw = reinterpret_cast<const uint4*>(base)[pack];
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ void store_pack(void* base, int64_t pack, const Pack<scalar_t>& v) {
  reinterpret_cast<uint4*>(base)[pack] = v.raw;
}

// Sum of pack `pack` over the ranks, in rank order and fp32, so every rank computes the same bits.
template <typename scalar_t>
__device__ __forceinline__ void reduce_pack(const RankData& in, int world_size, int64_t pack,
                                            float (&acc)[Pack<scalar_t>::kElems]) {
  constexpr int kElems = Pack<scalar_t>::kElems;
  Pack<scalar_t> v[kMaxWorldSize];
#pragma unroll
  for (int r = 0; r < kMaxWorldSize; ++r) {  // all loads first: world_size of them in flight
    if (r < world_size) v[r] = load_pack<scalar_t>(in.ptr[r], pack);
  }
#pragma unroll
  for (int k = 0; k < kElems; ++k) acc[k] = 0.f;
#pragma unroll
  for (int r = 0; r < kMaxWorldSize; ++r) {
    if (r < world_size) {
#pragma unroll
      for (int k = 0; k < kElems; ++k) acc[k] += to_float(v[r].elem[k]);
    }
  }
}

// The n_tail (< one pack) elements after the packs, reduced by every rank from every peer's input.
template <typename scalar_t>
__device__ __forceinline__ void reduce_tail(const Params& p, const RankData& in) {
  if (blockIdx.x != 0 || threadIdx.x >= p.n_tail) return;
  const int64_t e = p.n_packs * Pack<scalar_t>::kElems + threadIdx.x;
  float acc = 0.f;
  // unrolled to the compile-time maximum: a runtime-indexed in.ptr[r] would put `in` on the stack
#pragma unroll
  for (int r = 0; r < kMaxWorldSize; ++r) {
    if (r < p.world_size) acc += to_float(reinterpret_cast<const scalar_t*>(in.ptr[r])[e]);
  }
  reinterpret_cast<scalar_t*>(p.out)[e] = from_float<scalar_t>(acc);
}

// Plain all-reduce after barrier 1. Returns the number of barriers used in total.
template <typename scalar_t>
__device__ __forceinline__ uint32_t plain_body(const Params& p, const RankData& in, uint32_t base) {
  constexpr int kElems = Pack<scalar_t>::kElems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float acc[kElems];
  Pack<scalar_t> sum;
  if (!p.two_shot) {
    for (int64_t i = tid; i < p.n_packs; i += stride) {
      reduce_pack<scalar_t>(in, p.world_size, i, acc);
#pragma unroll
      for (int k = 0; k < kElems; ++k) sum.elem[k] = from_float<scalar_t>(acc[k]);
      store_pack(p.out, i, sum);
    }
    reduce_tail<scalar_t>(p, in);
    barrier(p, base + 2);  // [B2] every rank is done reading this rank's input: the next call may overwrite it
    return 2;
  }
  // reduce-scatter: this rank reduces its chunk into its own results region
  const int64_t lo = min(p.rank * p.chunk, p.n_packs), hi = min(lo + p.chunk, p.n_packs);
  for (int64_t i = lo + tid; i < hi; i += stride) {
    reduce_pack<scalar_t>(in, p.world_size, i, acc);
#pragma unroll
    for (int k = 0; k < kElems; ++k) sum.elem[k] = from_float<scalar_t>(acc[k]);
    store_pack(p.results[p.rank], i, sum);
  }
  reduce_tail<scalar_t>(p, in);
  barrier(p, base + 2);  // [B2] every rank's chunk is in its results region
  // all-gather: copy every owner's chunk; the same (i - owner's lo) -> block mapping as above
  for (int q = 0; q < p.world_size; ++q) {
    const int64_t q_lo = min(q * p.chunk, p.n_packs), q_hi = min(q_lo + p.chunk, p.n_packs);
    for (int64_t i = q_lo + tid; i < q_hi; i += stride) {
      store_pack(p.out, i, load_pack<scalar_t>(p.results[q], i));
    }
  }
  barrier(p, base + 3);  // [B3] every rank is done reading this rank's input and results region
  return 3;
}

// The sum of block_total over the p.split blocks that share this block's row (blocks [g * split, (g + 1) *
// split) of this rank), added in block order so that every block of the group, and every rank, gets the same
// bits. A sense-reversing barrier: a block reads the group's generation before arriving; the last block to
// arrive resets the count and publishes generation + 1; the others wait for it. The blocks of a group are
// co-resident: the host refuses a grid larger than what the GPU holds at once (max_resident_blocks; the plan
// caps it at that, divided by the ranks that share the GPU), so waiting for each other cannot deadlock as long
// as no other kernel that never finishes (another spin-waiting communicator) holds the SMs; they wait only for
// local work (their loads after [B1]).
__device__ __forceinline__ float row_group_sum(const Params& p, float block_total) {
  if (p.split == 1) return block_total;
  __shared__ float group_total;
  if (threadIdx.x == 0) {
    Flags* mine = p.flags[p.rank];
    const int group = blockIdx.x / p.split, first = group * p.split;
    // Read before arriving: the previous barrier of this group is complete (this block passed it, or the
    // previous kernel on this stream did), so this is the value the last arriver of this one increments.
    const uint32_t generation = load_acquire_gpu(&mine->group_generation[group]);
    mine->partial_sum_sq[blockIdx.x] = block_total;  // published by the release of the add below
    // [G] matches the acquire of the last arriver's add (it reads every partial) and, through its release
    // of the generation, the waiters' acquire below.
    if (fetch_add_acq_rel_gpu(&mine->group_arrived[group], 1) == static_cast<uint32_t>(p.split - 1)) {
      store_relaxed_gpu(&mine->group_arrived[group], 0);  // ordered before the release below: the next
      store_release_gpu(&mine->group_generation[group], generation + 1);  // barrier starts from 0
    } else {
      while (load_acquire_gpu(&mine->group_generation[group]) == generation) {
      }
    }
    float total = 0.f;
    for (int b = first; b < first + p.split; ++b) total += load_relaxed_gpu(&mine->partial_sum_sq[b]);
    group_total = total;
  }
  __syncthreads();  // publishes group_total
  const float total = group_total;
  __syncthreads();  // every thread has read group_total before a later row overwrites it
  return total;
}

// Which part of the fused kernel's rows this block owns: rows row_lo + group, + n_groups, ... and, of each,
// the packs [pack_lo, pack_hi). The same mapping in every phase, so the all-gather of two-shot copies from
// a peer exactly what the peer's block of the same index wrote.
struct RowSlice {
  int group, n_groups;
  int64_t pack_lo, pack_hi;
};

__device__ __forceinline__ RowSlice row_slice(const Params& p) {
  RowSlice s;
  s.group = blockIdx.x / p.split;
  s.n_groups = gridDim.x / p.split;
  s.pack_lo = min(static_cast<int64_t>(blockIdx.x % p.split) * p.packs_per_slice, p.packs_per_row);
  s.pack_hi = min(s.pack_lo + p.packs_per_slice, p.packs_per_row);
  return s;
}

// Rows [row_lo, row_hi) of new_residual = all_reduce(x) + residual and normed = rmsnorm(new_residual),
// written to new_residual_out / normed_out (indexed by global row). A row is split over p.split blocks (a
// decode step of one token then uses p.split SMs, not one); their sums of squares meet in row_group_sum.
template <typename scalar_t>
__device__ __forceinline__ void fused_rows(const Params& p, const RankData& in, int64_t row_lo, int64_t row_hi,
                                           void* new_residual_out, void* normed_out) {
  constexpr int kElems = Pack<scalar_t>::kElems;
  const float inv_hidden = 1.f / to_float(p.packs_per_row * kElems);
  const RowSlice slice = row_slice(p);
  float acc[kElems];
  // the trip count is the same for every thread of the block and every block of the group
  for (int64_t row = row_lo + slice.group; row < row_hi; row += slice.n_groups) {
    float sum_sq = 0.f;
    for (int64_t c = slice.pack_lo + threadIdx.x; c < slice.pack_hi; c += blockDim.x) {
      const int64_t i = row * p.packs_per_row + c;
      reduce_pack<scalar_t>(in, p.world_size, i, acc);
      const Pack<scalar_t> res = load_pack<scalar_t>(p.residual, i);
      Pack<scalar_t> s;
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        // the reduced value is rounded to the dtype first, as an all_reduce followed by add_rmsnorm does
        const scalar_t reduced = from_float<scalar_t>(acc[k]);
        s.elem[k] = from_float<scalar_t>(to_float(reduced) + to_float(res.elem[k]));
        const float sf = to_float(s.elem[k]);
        sum_sq += sf * sf;
      }
      store_pack(new_residual_out, i, s);
    }
    const float row_sum_sq = row_group_sum(p, block_sum<kThreadsPerBlock>(sum_sq));
    const float inv_rms = rsqrtf(row_sum_sq * inv_hidden + p.eps);
    for (int64_t c = slice.pack_lo + threadIdx.x; c < slice.pack_hi; c += blockDim.x) {
      const int64_t i = row * p.packs_per_row + c;
      const Pack<scalar_t> s = load_pack<scalar_t>(new_residual_out, i);  // this thread's own store above
      const Pack<scalar_t> w = load_pack<scalar_t>(p.weight, c);
      Pack<scalar_t> n;
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        n.elem[k] = from_float<scalar_t>(to_float(s.elem[k]) * inv_rms * to_float(w.elem[k]));
      }
      store_pack(normed_out, i, n);
    }
  }
}

template <typename scalar_t>
__device__ __forceinline__ uint32_t fused_body(const Params& p, const RankData& in, uint32_t base) {
  if (!p.two_shot) {
    fused_rows<scalar_t>(p, in, 0, p.n_rows, p.out, p.normed);
    barrier(p, base + 2);  // [B2] every rank is done reading this rank's input
    return 2;
  }
  // reduce-scatter: this rank's rows, normed, into its results region (new_residual, then normed)
  const int64_t lo = min(p.rank * p.chunk, p.n_rows), hi = min(lo + p.chunk, p.n_rows);
  char* mine = p.results[p.rank];
  fused_rows<scalar_t>(p, in, lo, hi, mine, mine + p.normed_offset_bytes);
  barrier(p, base + 2);  // [B2] every rank's rows are in its results region
  // all-gather: the rows and packs this block's counterpart wrote on each owner (row_slice)
  const RowSlice slice = row_slice(p);
  for (int q = 0; q < p.world_size; ++q) {
    const int64_t q_lo = min(q * p.chunk, p.n_rows), q_hi = min(q_lo + p.chunk, p.n_rows);
    const char* theirs = p.results[q];
    for (int64_t row = q_lo + slice.group; row < q_hi; row += slice.n_groups) {
      for (int64_t c = slice.pack_lo + threadIdx.x; c < slice.pack_hi; c += blockDim.x) {
        const int64_t i = row * p.packs_per_row + c;
        store_pack(p.out, i, load_pack<scalar_t>(theirs, i));
        store_pack(p.normed, i, load_pack<scalar_t>(theirs + p.normed_offset_bytes, i));
      }
    }
  }
  barrier(p, base + 3);  // [B3] every rank is done reading this rank's input and results region
  return 3;
}

// A slot whose peer pointers were never filled (a graph replayed before register_graph_buffers, or after
// release_graph_buffers: the table is zeroed) would read address 0 + offset of some peer: trap instead.
__device__ __forceinline__ void check_inputs(const Params& p, const RankData& in) {
  bool missing = false;
#pragma unroll
  for (int r = 0; r < kMaxWorldSize; ++r) missing |= r < p.world_size && in.ptr[r] == nullptr;
  if (missing) fail(p, kErrorNullInput, p.slot);
}

template <typename scalar_t, bool kFused>
__global__ void __launch_bounds__(kThreadsPerBlock) all_reduce_kernel(const Params p) {
  __shared__ uint32_t base_value;
  if (threadIdx.x == 0) base_value = p.flags[p.rank]->counter[blockIdx.x];
  __syncthreads();  // publishes base_value
  const uint32_t base = base_value;
  // [B1] every rank's input is in place: staged copies and captured inputs were written by work
  // ordered before this kernel on each rank's stream.
  barrier(p, base + 1);
  const RankData in = *p.inputs;
  check_inputs(p, in);
  const uint32_t n_barriers = kFused ? fused_body<scalar_t>(p, in, base) : plain_body<scalar_t>(p, in, base);
  if (threadIdx.x == 0) p.flags[p.rank]->counter[blockIdx.x] = base + n_barriers;
}

__global__ void __launch_bounds__(kThreadsPerBlock) peer_read_kernel(const uint4* src, uint4* dst, int64_t n_packs) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs; i += stride) {
    dst[i] = src[i];
  }
}

}  // namespace

cudaError_t launch_all_reduce(const Params& params, DType dtype, bool fused, int n_blocks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n_blocks)), block(kThreadsPerBlock);
  switch (dtype) {
    case DType::kFloat32:
      if (fused) all_reduce_kernel<float, true><<<grid, block, 0, stream>>>(params);
      else all_reduce_kernel<float, false><<<grid, block, 0, stream>>>(params);
      break;
    case DType::kFloat16:
      if (fused) all_reduce_kernel<__half, true><<<grid, block, 0, stream>>>(params);
      else all_reduce_kernel<__half, false><<<grid, block, 0, stream>>>(params);
      break;
    case DType::kBFloat16:
      if (fused) all_reduce_kernel<__nv_bfloat16, true><<<grid, block, 0, stream>>>(params);
      else all_reduce_kernel<__nv_bfloat16, false><<<grid, block, 0, stream>>>(params);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t max_resident_blocks(int device, int* blocks) {
  // The barriers need every block of a launch resident at once (block b of a rank waits for block b of the
  // peers, and the split rows of the fused kernel for the other blocks of their row): at 512 threads and
  // ~100-128 registers one block fills an SM's 64 K registers, so this is the SM count on sm_80/sm_90.
  int sms = 0;
  cudaError_t error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) return error;
  const void* kernels[] = {
      reinterpret_cast<const void*>(&all_reduce_kernel<float, false>),
      reinterpret_cast<const void*>(&all_reduce_kernel<float, true>),
      reinterpret_cast<const void*>(&all_reduce_kernel<__half, false>),
      reinterpret_cast<const void*>(&all_reduce_kernel<__half, true>),
      reinterpret_cast<const void*>(&all_reduce_kernel<__nv_bfloat16, false>),
      reinterpret_cast<const void*>(&all_reduce_kernel<__nv_bfloat16, true>)};
  int per_sm = -1;
  for (const void* kernel : kernels) {
    int n = 0;
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreadsPerBlock, 0);
    if (error != cudaSuccess) return error;
    per_sm = per_sm < 0 || n < per_sm ? n : per_sm;
  }
  *blocks = per_sm * sms;
  return cudaSuccess;
}

cudaError_t launch_peer_read(const void* src, void* dst, int64_t n_packs, cudaStream_t stream) {
  if (n_packs <= 0) return cudaSuccess;
  const int64_t blocks = (n_packs + kThreadsPerBlock - 1) / kThreadsPerBlock;
  peer_read_kernel<<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreadsPerBlock, 0,
                     stream>>>(static_cast<const uint4*>(src), static_cast<uint4*>(dst), n_packs);
  return cudaGetLastError();
}

}  // namespace ipc
}  // namespace tp_kernels
