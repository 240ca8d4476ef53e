// Host side of the CUDA IPC custom all-reduce: buffer allocation, IPC handle export/import, staged and
// registered (CUDA-graph) inputs, argument checks, and the launch of the kernels in custom_all_reduce.cu.
#include "cuda/custom_all_reduce.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>

namespace tp_kernels {
namespace ipc {
namespace {

DType dtype_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "CUDA IPC all-reduce: dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

int64_t element_size_of(at::ScalarType dtype) {
  (void)dtype_of(dtype);  // rejects the other dtypes
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

// must_align: read or written by the kernel in 16-byte packs (a staged input is only copied, so any
// alignment does for it).
void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& like, int device, bool must_align) {
  TORCH_CHECK(t.is_cuda() && t.get_device() == device, "CUDA IPC all-reduce: ", name, " must be on cuda:", device,
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "CUDA IPC all-reduce: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "CUDA IPC all-reduce: ", name, " must be ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(!must_align || reinterpret_cast<uintptr_t>(t.data_ptr()) % kPackBytes == 0, "CUDA IPC all-reduce: ",
              name, " must be ", kPackBytes, "-byte aligned");
}

}  // namespace

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
  check_tensor("input", input, input, device_, registered);
  check_tensor("output", output, input, device_, true);
  TORCH_CHECK(output.numel() == input.numel(), "CUDA IPC all-reduce: output has ", output.numel(),
              " elements, input ", input.numel());
  TORCH_CHECK(static_cast<int64_t>(input.nbytes()) <= max_bytes_, "CUDA IPC all-reduce: message of ",
              input.nbytes(), " bytes exceeds the ", max_bytes_, "-byte buffer");
  const int64_t per_pack = kPackBytes / elem;
  const int64_t n_packs = input.numel() / per_pack;
  check_plan(two_shot, n_blocks, chunk, n_packs, world_size_);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  const int slot = slot_for_input(input, registered);
  Params params = base_params(peer_buffers_, max_bytes_, rank_, world_size_, rank_data_, slot,
                              error_word_device_, timeout_ms, two_shot, chunk);
  params.out = output.data_ptr();
  params.n_packs = n_packs;
  params.n_tail = static_cast<int>(input.numel() - n_packs * per_pack);
  C10_CUDA_CHECK(launch_all_reduce(params, dtype_of(input.scalar_type()), /*fused=*/false,
                                   static_cast<int>(n_blocks), at::cuda::getCurrentCUDAStream()));
}

void CustomAllReduce::allreduce_residual_rmsnorm(const at::Tensor& input, const at::Tensor& residual,
                                                 const at::Tensor& weight, at::Tensor& normed,
                                                 at::Tensor& new_residual, double eps, bool two_shot,
                                                 int64_t n_blocks, int64_t chunk, bool registered,
                                                 int64_t timeout_ms) {
  TORCH_CHECK(peers_open_, "CUDA IPC all-reduce: open_peers has not been called (or the communicator is closed)");
  const int64_t elem = element_size_of(input.scalar_type());
  check_tensor("input", input, input, device_, registered);
  for (const auto& named : {std::make_pair("residual", &residual), std::make_pair("weight", &weight),
                            std::make_pair("normed", static_cast<const at::Tensor*>(&normed)),
                            std::make_pair("new_residual", static_cast<const at::Tensor*>(&new_residual))}) {
    check_tensor(named.first, *named.second, input, device_, true);
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
  Params params = base_params(peer_buffers_, max_bytes_, rank_, world_size_, rank_data_, slot,
                              error_word_device_, timeout_ms, two_shot, chunk);
  params.out = new_residual.data_ptr();
  params.normed = normed.data_ptr();
  params.residual = residual.data_ptr();
  params.weight = weight.data_ptr();
  params.n_rows = n_rows;
  params.packs_per_row = hidden / per_pack;
  params.normed_offset_bytes = max_bytes_;  // results region: new_residual rows, then normed rows
  params.eps = static_cast<float>(eps);
  C10_CUDA_CHECK(launch_all_reduce(params, dtype_of(input.scalar_type()), /*fused=*/true,
                                   static_cast<int>(n_blocks), at::cuda::getCurrentCUDAStream()));
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
