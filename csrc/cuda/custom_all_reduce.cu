// CUDA IPC custom all-reduce: one-shot and two-shot kernels with flag barriers between the ranks' blocks,
// fp32/fp16/bf16 with fp32 accumulation, and the residual + RMSNorm epilogue fused in. Host side: buffer
// allocation, IPC handle export/import, registered inputs for CUDA graphs. See custom_all_reduce.h for
// the buffer layout; the decisions (algorithm, grid, split) come from tp_kernels/comm/ipc_plan.py.
//
// Every rank launches the same grid (the plan depends only on the message and the world size), and block
// b of one rank only ever synchronizes with block b of the others: the element -> block mapping is the
// same in every phase, so a block reads only what the same-index blocks of its peers wrote.
#include "cuda/custom_all_reduce.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstring>

namespace tp_kernels {
namespace ipc {
namespace {

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
        if (global_timer_ns() - start > p.timeout_ns) {
          // A hang would freeze the whole job; record which rank never arrived and abort the kernel.
          *reinterpret_cast<volatile int*>(p.error_word) = peer + 1;
          __threadfence_system();
          __trap();
        }
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
      for (int k = 0; k < kElems; ++k) acc[k] += static_cast<float>(v[r].elem[k]);
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
    if (r < p.world_size) acc += static_cast<float>(reinterpret_cast<const scalar_t*>(in.ptr[r])[e]);
  }
  reinterpret_cast<scalar_t*>(p.out)[e] = static_cast<scalar_t>(acc);
}

__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[kThreadsPerBlock / 32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();  // matches the reads of warp_sums below
  value = threadIdx.x < kThreadsPerBlock / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    if (lane == 0) warp_sums[0] = value;
  }
  __syncthreads();  // matches the write of warp_sums[0] above
  const float total = warp_sums[0];
  __syncthreads();  // every thread has read warp_sums[0] before the next row's sum overwrites it
  return total;
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
      for (int k = 0; k < kElems; ++k) sum.elem[k] = static_cast<scalar_t>(acc[k]);
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
    for (int k = 0; k < kElems; ++k) sum.elem[k] = static_cast<scalar_t>(acc[k]);
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

// Rows [row_lo, row_hi) of new_residual = all_reduce(x) + residual and normed = rmsnorm(new_residual),
// one block per row, written to new_residual_out / normed_out (indexed by global row).
template <typename scalar_t>
__device__ __forceinline__ void fused_rows(const Params& p, const RankData& in, int64_t row_lo, int64_t row_hi,
                                           void* new_residual_out, void* normed_out) {
  constexpr int kElems = Pack<scalar_t>::kElems;
  const float inv_hidden = 1.f / static_cast<float>(p.packs_per_row * kElems);
  float acc[kElems];
  for (int64_t row = row_lo + blockIdx.x; row < row_hi; row += gridDim.x) {  // block-uniform trip count
    float sum_sq = 0.f;
    for (int64_t c = threadIdx.x; c < p.packs_per_row; c += blockDim.x) {
      const int64_t i = row * p.packs_per_row + c;
      reduce_pack<scalar_t>(in, p.world_size, i, acc);
      const Pack<scalar_t> res = load_pack<scalar_t>(p.residual, i);
      Pack<scalar_t> s;
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        // the reduced value is rounded to the dtype first, as an all_reduce followed by add_rmsnorm does
        const scalar_t reduced = static_cast<scalar_t>(acc[k]);
        s.elem[k] = static_cast<scalar_t>(static_cast<float>(reduced) + static_cast<float>(res.elem[k]));
        const float sf = static_cast<float>(s.elem[k]);
        sum_sq += sf * sf;
      }
      store_pack(new_residual_out, i, s);
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) * inv_hidden + p.eps);
    for (int64_t c = threadIdx.x; c < p.packs_per_row; c += blockDim.x) {
      const int64_t i = row * p.packs_per_row + c;
      const Pack<scalar_t> s = load_pack<scalar_t>(new_residual_out, i);  // this thread's own store above
      const Pack<scalar_t> w = load_pack<scalar_t>(p.weight, c);
      Pack<scalar_t> n;
#pragma unroll
      for (int k = 0; k < kElems; ++k) {
        n.elem[k] = static_cast<scalar_t>(static_cast<float>(s.elem[k]) * inv_rms * static_cast<float>(w.elem[k]));
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
  // all-gather, rows block-strided as in fused_rows
  for (int q = 0; q < p.world_size; ++q) {
    const int64_t q_lo = min(q * p.chunk, p.n_rows), q_hi = min(q_lo + p.chunk, p.n_rows);
    const char* theirs = p.results[q];
    for (int64_t row = q_lo + blockIdx.x; row < q_hi; row += gridDim.x) {
      for (int64_t c = threadIdx.x; c < p.packs_per_row; c += blockDim.x) {
        const int64_t i = row * p.packs_per_row + c;
        store_pack(p.out, i, load_pack<scalar_t>(theirs, i));
        store_pack(p.normed, i, load_pack<scalar_t>(theirs + p.normed_offset_bytes, i));
      }
    }
  }
  barrier(p, base + 3);  // [B3] every rank is done reading this rank's input and results region
  return 3;
}

template <typename scalar_t, bool kFused>
__global__ void __launch_bounds__(kThreadsPerBlock) all_reduce_kernel(const Params p) {
  __shared__ uint32_t base_value;
  if (threadIdx.x == 0) base_value = p.flags[p.rank]->counter[blockIdx.x];
  __syncthreads();  // publishes base_value
  const uint32_t base = base_value;
  // [B1] every rank's input is in place: staged copies and registered inputs were written by work
  // ordered before this kernel on each rank's stream.
  barrier(p, base + 1);
  const RankData in = *p.inputs;
  const uint32_t n_barriers = kFused ? fused_body<scalar_t>(p, in, base) : plain_body<scalar_t>(p, in, base);
  if (threadIdx.x == 0) p.flags[p.rank]->counter[blockIdx.x] = base + n_barriers;
}

int64_t element_size_of(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "CUDA IPC all-reduce: dtype must be float32, float16 or bfloat16, got ", dtype);
  return static_cast<int64_t>(c10::elementSize(dtype));
}

void check_plan(bool two_shot, int64_t n_blocks, int64_t chunk, int64_t work_items, int world_size) {
  TORCH_CHECK(n_blocks >= 1 && n_blocks <= kMaxBlocks, "CUDA IPC all-reduce: n_blocks must be in [1, ",
              kMaxBlocks, "], got ", n_blocks);
  if (two_shot) {
    TORCH_CHECK(chunk >= 0 && chunk * world_size >= work_items, "CUDA IPC all-reduce: two-shot chunk ", chunk,
                " x world size ", world_size, " does not cover ", work_items, " items");
  } else {
    TORCH_CHECK(chunk == work_items, "CUDA IPC all-reduce: one-shot chunk must be all ", work_items,
                " items, got ", chunk);
  }
}

void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& like, int device) {
  TORCH_CHECK(t.is_cuda() && t.get_device() == device, "CUDA IPC all-reduce: ", name, " must be on cuda:", device,
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "CUDA IPC all-reduce: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "CUDA IPC all-reduce: ", name, " must be ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % kPackBytes == 0, "CUDA IPC all-reduce: ", name,
              " must be ", kPackBytes, "-byte aligned");
}

}  // namespace

struct CustomAllReduce::Launch {
  Params params;
  int64_t n_blocks;
};

std::map<std::string, int64_t> limits() {
  return {{"max_world_size", kMaxWorldSize}, {"max_blocks", kMaxBlocks},
          {"threads_per_block", kThreadsPerBlock}, {"pack_bytes", kPackBytes},
          {"ipc_handle_bytes", kIpcHandleBytes}, {"buffer_record_bytes", kBufferRecordBytes},
          {"max_registered_buffers", kMaxRankDataSlots - 1}};
}

CustomAllReduce::CustomAllReduce(int64_t rank, int64_t world_size, int64_t max_bytes, int64_t device_index)
    : rank_(static_cast<int>(rank)), world_size_(static_cast<int>(world_size)),
      device_(static_cast<int>(device_index)), max_bytes_(max_bytes) {
  static_assert(sizeof(cudaIpcMemHandle_t) == kIpcHandleBytes, "cudaIpcMemHandle_t size changed");
  TORCH_CHECK(world_size >= 1 && world_size <= kMaxWorldSize, "CUDA IPC all-reduce: world_size must be in [1, ",
              kMaxWorldSize, "], got ", world_size);
  TORCH_CHECK(rank >= 0 && rank < world_size, "CUDA IPC all-reduce: rank must be in [0, ", world_size, "), got ",
              rank);
  TORCH_CHECK(max_bytes > 0 && max_bytes % kPackBytes == 0, "CUDA IPC all-reduce: max_bytes must be a positive "
              "multiple of ", kPackBytes, ", got ", max_bytes);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  C10_CUDA_CHECK(cudaMalloc(&buffer_, kFlagsBytes + 3 * max_bytes_));
  C10_CUDA_CHECK(cudaMemset(buffer_, 0, kFlagsBytes));  // flags and counters start at 0 on every rank
  C10_CUDA_CHECK(cudaMalloc(&rank_data_, kMaxRankDataSlots * sizeof(RankData)));
  C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&error_word_host_), sizeof(int), cudaHostAllocMapped));
  *error_word_host_ = 0;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_word_device_), error_word_host_, 0));
  // The peers may signal this buffer's flags as soon as the handles are exchanged (the exchange is a
  // host-side collective), so the zeroing must be complete before this returns.
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  peer_buffers_[rank_] = buffer_;
}

CustomAllReduce::~CustomAllReduce() { close(); }

at::Tensor CustomAllReduce::ipc_handle() const {
  TORCH_CHECK(buffer_ != nullptr, "CUDA IPC all-reduce: the communicator is closed");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaIpcMemHandle_t handle;
  C10_CUDA_CHECK(cudaIpcGetMemHandle(&handle, buffer_));
  at::Tensor out = at::empty({kIpcHandleBytes}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(out.data_ptr(), &handle, kIpcHandleBytes);
  return out;
}

char* CustomAllReduce::open_handle(const char* handle_bytes) {
  const std::string key(handle_bytes, kIpcHandleBytes);
  const auto found = opened_handles_.find(key);
  if (found != opened_handles_.end()) return found->second;  // a handle may be opened once per process
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, handle_bytes, kIpcHandleBytes);
  void* base = nullptr;
  C10_CUDA_CHECK(cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess));
  opened_handles_[key] = static_cast<char*>(base);
  return static_cast<char*>(base);
}

void CustomAllReduce::open_peers(const std::vector<at::Tensor>& handles) {
  TORCH_CHECK(!peers_open_, "CUDA IPC all-reduce: open_peers was already called");
  TORCH_CHECK(static_cast<int>(handles.size()) == world_size_, "CUDA IPC all-reduce: expected ", world_size_,
              " handles (one per rank), got ", handles.size());
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  RankData staging{};
  for (int r = 0; r < world_size_; ++r) {
    const at::Tensor& h = handles[r];
    TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kByte && h.numel() == kIpcHandleBytes &&
                    h.is_contiguous(),
                "CUDA IPC all-reduce: handle of rank ", r, " must be a contiguous (", kIpcHandleBytes,
                ",) uint8 CPU tensor");
    if (r != rank_) peer_buffers_[r] = open_handle(static_cast<const char*>(h.data_ptr()));
    staging.ptr[r] = peer_buffers_[r] + kFlagsBytes;
  }
  C10_CUDA_CHECK(cudaMemcpy(rank_data_, &staging, sizeof(RankData), cudaMemcpyHostToDevice));
  peers_open_ = true;
}

int CustomAllReduce::slot_for_input(const at::Tensor& input, bool registered) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (!registered) {
    // Staged: copy into this rank's staging buffer, whose address every peer already maps. Also valid
    // inside a CUDA graph (the copy is captured with its fixed addresses).
    C10_CUDA_CHECK(cudaMemcpyAsync(buffer_ + kFlagsBytes, input.data_ptr(), input.nbytes(),
                                   cudaMemcpyDeviceToDevice, stream));
    return 0;
  }
  const uintptr_t address = reinterpret_cast<uintptr_t>(input.data_ptr());
  const auto found = registered_slots_.find(address);
  if (found != registered_slots_.end()) return found->second;
  cudaStreamCaptureStatus status;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusActive, "CUDA IPC all-reduce: input address ",
              reinterpret_cast<void*>(address), " is not registered; registered mode outside CUDA-graph capture "
              "needs an address captured earlier (and register_graph_buffers called)");
  TORCH_CHECK(n_rank_data_used_ < kMaxRankDataSlots, "CUDA IPC all-reduce: more than ", kMaxRankDataSlots - 1,
              " distinct input addresses captured");
  // The slot's peer pointers are filled by register_graph_buffers, after capture and before replay.
  const int slot = n_rank_data_used_++;
  registered_slots_[address] = slot;
  pending_.push_back(address);
  return slot;
}

void CustomAllReduce::launch(const Launch& l, at::ScalarType dtype, bool fused) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(l.n_blocks)), block(kThreadsPerBlock);
  // Three dtypes only (AT_DISPATCH would also instantiate double, for nothing but compile time).
#define TPK_LAUNCH(scalar_t)                                                        \
  if (fused) {                                                                      \
    all_reduce_kernel<scalar_t, true><<<grid, block, 0, stream>>>(l.params);        \
  } else {                                                                          \
    all_reduce_kernel<scalar_t, false><<<grid, block, 0, stream>>>(l.params);       \
  }
  switch (dtype) {
    case at::kFloat: TPK_LAUNCH(float); break;
    case at::kHalf: TPK_LAUNCH(at::Half); break;
    case at::kBFloat16: TPK_LAUNCH(at::BFloat16); break;
    default: TORCH_CHECK(false, "CUDA IPC all-reduce: unsupported dtype ", dtype);
  }
#undef TPK_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {
Params base_params(const char* const* peer_buffers, int64_t max_bytes, int rank, int world_size, void* rank_data,
                   int slot, int* error_word, int64_t timeout_ms, bool two_shot, int64_t chunk) {
  Params p{};
  p.inputs = static_cast<const RankData*>(rank_data) + slot;
  for (int r = 0; r < world_size; ++r) {
    p.flags[r] = reinterpret_cast<Flags*>(const_cast<char*>(peer_buffers[r]));
    p.results[r] = const_cast<char*>(peer_buffers[r]) + kFlagsBytes + max_bytes;
  }
  p.error_word = error_word;
  p.timeout_ns = static_cast<uint64_t>(timeout_ms) * 1000000ull;
  p.rank = rank;
  p.world_size = world_size;
  p.two_shot = two_shot;
  p.chunk = chunk;
  return p;
}
}  // namespace

void CustomAllReduce::all_reduce(const at::Tensor& input, at::Tensor& output, bool two_shot, int64_t n_blocks,
                                 int64_t chunk, bool registered, int64_t timeout_ms) {
  TORCH_CHECK(peers_open_, "CUDA IPC all-reduce: open_peers has not been called (or the communicator is closed)");
  const int64_t elem = element_size_of(input.scalar_type());
  check_tensor("input", input, input, device_);
  check_tensor("output", output, input, device_);
  TORCH_CHECK(output.numel() == input.numel(), "CUDA IPC all-reduce: output has ", output.numel(),
              " elements, input ", input.numel());
  TORCH_CHECK(static_cast<int64_t>(input.nbytes()) <= max_bytes_, "CUDA IPC all-reduce: message of ",
              input.nbytes(), " bytes exceeds the ", max_bytes_, "-byte buffer");
  const int64_t per_pack = kPackBytes / elem;
  const int64_t n_packs = input.numel() / per_pack;
  check_plan(two_shot, n_blocks, chunk, n_packs, world_size_);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  const int slot = slot_for_input(input, registered);
  Launch l{base_params(peer_buffers_, max_bytes_, rank_, world_size_, rank_data_, slot, error_word_device_,
                       timeout_ms, two_shot, chunk),
           n_blocks};
  l.params.out = output.data_ptr();
  l.params.n_packs = n_packs;
  l.params.n_tail = static_cast<int>(input.numel() - n_packs * per_pack);
  launch(l, input.scalar_type(), /*fused=*/false);
}

void CustomAllReduce::allreduce_residual_rmsnorm(const at::Tensor& input, const at::Tensor& residual,
                                                 const at::Tensor& weight, at::Tensor& normed,
                                                 at::Tensor& new_residual, double eps, bool two_shot,
                                                 int64_t n_blocks, int64_t chunk, bool registered,
                                                 int64_t timeout_ms) {
  TORCH_CHECK(peers_open_, "CUDA IPC all-reduce: open_peers has not been called (or the communicator is closed)");
  const int64_t elem = element_size_of(input.scalar_type());
  check_tensor("input", input, input, device_);
  for (const auto& named : {std::make_pair("residual", &residual), std::make_pair("weight", &weight),
                            std::make_pair("normed", static_cast<const at::Tensor*>(&normed)),
                            std::make_pair("new_residual", static_cast<const at::Tensor*>(&new_residual))}) {
    check_tensor(named.first, *named.second, input, device_);
  }
  TORCH_CHECK(input.dim() >= 1, "CUDA IPC all-reduce: input must be (..., hidden)");
  const int64_t hidden = input.size(-1);
  const int64_t per_pack = kPackBytes / elem;
  TORCH_CHECK(hidden > 0 && hidden % per_pack == 0, "CUDA IPC all-reduce: hidden must be a positive multiple of ",
              per_pack, ", got ", hidden);
  TORCH_CHECK(weight.numel() == hidden, "CUDA IPC all-reduce: weight must be (", hidden, ",), got ", weight.sizes());
  TORCH_CHECK(residual.sizes() == input.sizes() && normed.sizes() == input.sizes() &&
                  new_residual.sizes() == input.sizes(),
              "CUDA IPC all-reduce: residual, normed and new_residual must have input's shape ", input.sizes());
  TORCH_CHECK(static_cast<int64_t>(input.nbytes()) <= max_bytes_, "CUDA IPC all-reduce: message of ",
              input.nbytes(), " bytes exceeds the ", max_bytes_, "-byte buffer");
  const int64_t n_rows = input.numel() / hidden;
  check_plan(two_shot, n_blocks, chunk, n_rows, world_size_);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  const int slot = slot_for_input(input, registered);
  Launch l{base_params(peer_buffers_, max_bytes_, rank_, world_size_, rank_data_, slot, error_word_device_,
                       timeout_ms, two_shot, chunk),
           n_blocks};
  l.params.out = new_residual.data_ptr();
  l.params.normed = normed.data_ptr();
  l.params.residual = residual.data_ptr();
  l.params.weight = weight.data_ptr();
  l.params.n_rows = n_rows;
  l.params.packs_per_row = hidden / per_pack;
  l.params.normed_offset_bytes = max_bytes_;  // results region: new_residual rows, then normed rows
  l.params.eps = static_cast<float>(eps);
  launch(l, input.scalar_type(), /*fused=*/true);
}

at::Tensor CustomAllReduce::pending_graph_buffers() const {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  at::Tensor records = at::empty({static_cast<int64_t>(pending_.size()), kBufferRecordBytes},
                                 at::TensorOptions().dtype(at::kByte));
  auto* out = static_cast<char*>(records.data_ptr());
  for (size_t i = 0; i < pending_.size(); ++i) {
    size_t segment_bytes = 0;
    void* base = c10::cuda::CUDACachingAllocator::getBaseAllocation(reinterpret_cast<void*>(pending_[i]),
                                                                    &segment_bytes);
    TORCH_CHECK(base != nullptr, "CUDA IPC all-reduce: captured input ", reinterpret_cast<void*>(pending_[i]),
                " is not memory of torch's CUDA caching allocator");
    cudaIpcMemHandle_t handle;
    const cudaError_t err = cudaIpcGetMemHandle(&handle, base);
    TORCH_CHECK(err == cudaSuccess, "CUDA IPC all-reduce: cannot export the allocation of a captured input (",
                cudaGetErrorString(err), "); PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True is not supported");
    const int64_t offset = static_cast<int64_t>(pending_[i] - reinterpret_cast<uintptr_t>(base));
    std::memcpy(out + i * kBufferRecordBytes, &handle, kIpcHandleBytes);
    std::memcpy(out + i * kBufferRecordBytes + kIpcHandleBytes, &offset, sizeof(offset));
  }
  return records;
}

void CustomAllReduce::register_graph_buffers(const std::vector<at::Tensor>& records) {
  TORCH_CHECK(static_cast<int>(records.size()) == world_size_, "CUDA IPC all-reduce: expected ", world_size_,
              " record tables (one per rank), got ", records.size());
  const int64_t n_pending = static_cast<int64_t>(pending_.size());
  for (int r = 0; r < world_size_; ++r) {
    const at::Tensor& t = records[r];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kByte && t.is_contiguous() && t.dim() == 2 &&
                    t.size(0) == n_pending && t.size(1) == kBufferRecordBytes,
                "CUDA IPC all-reduce: rank ", r, "'s records must be a contiguous (", n_pending, ", ",
                kBufferRecordBytes, ") uint8 CPU tensor (the same number of captured all-reduces on every "
                "rank), got ", t.sizes());
  }
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  for (int64_t i = 0; i < n_pending; ++i) {
    RankData data{};
    for (int r = 0; r < world_size_; ++r) {
      const char* record = static_cast<const char*>(records[r].data_ptr()) + i * kBufferRecordBytes;
      if (r == rank_) {
        data.ptr[r] = reinterpret_cast<const char*>(pending_[i]);
        continue;
      }
      int64_t offset = 0;
      std::memcpy(&offset, record + kIpcHandleBytes, sizeof(offset));
      data.ptr[r] = open_handle(record) + offset;
    }
    const int slot = registered_slots_.at(pending_[i]);
    C10_CUDA_CHECK(cudaMemcpy(static_cast<RankData*>(rank_data_) + slot, &data, sizeof(RankData),
                              cudaMemcpyHostToDevice));
  }
  pending_.clear();
}

int64_t CustomAllReduce::timed_out_peer() const {
  return error_word_host_ == nullptr ? -1 : static_cast<int64_t>(*static_cast<volatile int*>(error_word_host_)) - 1;
}

void CustomAllReduce::close() {
  if (buffer_ == nullptr) return;
  // Errors are ignored here: close also runs from the destructor, possibly after a kernel trapped (the
  // context is then unusable) or at interpreter exit; leaking beats throwing from a destructor.
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  for (const auto& opened : opened_handles_) (void)cudaIpcCloseMemHandle(opened.second);
  opened_handles_.clear();
  (void)cudaFree(buffer_);
  (void)cudaFree(rank_data_);
  (void)cudaFreeHost(error_word_host_);
  (void)cudaGetLastError();
  buffer_ = nullptr;
  rank_data_ = nullptr;
  error_word_host_ = nullptr;
  error_word_device_ = nullptr;
  peers_open_ = false;
  for (auto& b : peer_buffers_) b = nullptr;
}

}  // namespace ipc
}  // namespace tp_kernels
