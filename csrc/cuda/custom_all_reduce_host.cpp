// Host side of the CUDA IPC custom all-reduce: buffer allocation, IPC handle export/import, the table of
// peer pointers (staging buffers and CUDA-graph inputs), argument checks, the launch of the kernels in
// custom_all_reduce.cu, and teardown in the order CUDA requires.
#include "cuda/custom_all_reduce.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <vector>

namespace tp_kernels {
namespace ipc {

std::map<std::string, int64_t> limits() {
  return {{"max_world_size", kMaxWorldSize}, {"max_blocks", kMaxBlocks},
          {"threads_per_block", kThreadsPerBlock}, {"pack_bytes", kPackBytes},
          {"ipc_handle_bytes", kIpcHandleBytes}, {"max_slots", kMaxSlots},
          {"error_kind_shift", kErrorKindShift}, {"error_barrier_timeout", kErrorBarrierTimeout},
          {"error_null_input", kErrorNullInput}};
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
  try {
    C10_CUDA_CHECK(cudaMalloc(&buffer_, kFlagsBytes + 3 * max_bytes_));
    C10_CUDA_CHECK(cudaMemset(buffer_, 0, kFlagsBytes));  // flags and counters start at 0 on every rank
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&rank_data_), kMaxSlots * sizeof(RankData)));
    // Null pointers in every slot not filled yet: a kernel reading one traps instead of following garbage.
    C10_CUDA_CHECK(cudaMemset(rank_data_, 0, kMaxSlots * sizeof(RankData)));
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&error_word_host_), sizeof(int), cudaHostAllocMapped));
    *error_word_host_ = 0;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_word_device_), error_word_host_, 0));
    int resident = 0;
    C10_CUDA_CHECK(ipc::max_resident_blocks(device_, &resident));  // the free function, not the getter
    resident_blocks_ = resident;
    // The peers may signal this buffer's flags as soon as the handles are exchanged (the exchange is a
    // host-side collective), so the zeroing must be complete before this returns.
    C10_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    free_buffers();  // nothing was exported yet
    throw;
  }
  peer_buffers_[rank_] = buffer_;
}

CustomAllReduce::~CustomAllReduce() {
  // No barrier is possible here: close this rank's mappings of the peers' memory, and free the IPC buffer only
  // if no peer can have mapped it (never exported); otherwise it is reclaimed when the process exits.
  close_peer_handles();
  if (!exported_) {
    free_buffers();
    return;
  }
  buffer_ = nullptr;
  free_buffers();  // the local allocations only
}

void CustomAllReduce::check_open(const char* what) const {
  TORCH_CHECK(peers_open_, "CUDA IPC all-reduce: ", what, " needs the peers mapped (open_peers not called, or "
              "the communicator is closed)");
}

at::Tensor CustomAllReduce::ipc_handle() {
  TORCH_CHECK(buffer_ != nullptr, "CUDA IPC all-reduce: the communicator is closed");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaIpcMemHandle_t handle;
  C10_CUDA_CHECK(cudaIpcGetMemHandle(&handle, buffer_));
  exported_ = true;
  at::Tensor out = at::empty({kIpcHandleBytes}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(out.data_ptr(), &handle, kIpcHandleBytes);
  return out;
}

namespace {
std::string handle_key(const at::Tensor& handle, const char* name) {
  TORCH_CHECK(handle.device().is_cpu() && handle.scalar_type() == at::kByte && handle.numel() == kIpcHandleBytes &&
                  handle.is_contiguous(),
              "CUDA IPC all-reduce: ", name, " must be a contiguous (", kIpcHandleBytes, ",) uint8 CPU tensor, got ",
              handle.scalar_type(), " ", handle.sizes(), " on ", handle.device());
  return std::string(static_cast<const char*>(handle.data_ptr()), kIpcHandleBytes);
}

// Maps an IPC handle once per process (CUDA allows one mapping of a handle per context); nullptr and the
// error on failure.
char* open_once(std::map<std::string, char*>& opened, const std::string& key, cudaError_t* error) {
  const auto found = opened.find(key);
  if (found != opened.end()) return found->second;
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, key.data(), kIpcHandleBytes);
  void* base = nullptr;
  *error = cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess);
  if (*error != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so later calls do not report it
    return nullptr;
  }
  opened[key] = static_cast<char*>(base);
  return static_cast<char*>(base);
}
}  // namespace

void CustomAllReduce::open_peers(const std::vector<at::Tensor>& handles) {
  TORCH_CHECK(buffer_ != nullptr, "CUDA IPC all-reduce: the communicator is closed");
  TORCH_CHECK(!peers_open_, "CUDA IPC all-reduce: open_peers was already called");
  TORCH_CHECK(static_cast<int>(handles.size()) == world_size_, "CUDA IPC all-reduce: expected ", world_size_,
              " handles (one per rank), got ", handles.size());
  std::vector<std::string> keys;
  for (int r = 0; r < world_size_; ++r) keys.push_back(handle_key(handles[r], "a rank's IPC handle"));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  RankData staging{};
  for (int r = 0; r < world_size_; ++r) {
    if (r != rank_) {
      cudaError_t error = cudaSuccess;
      peer_buffers_[r] = open_once(peer_handles_, keys[r], &error);
      if (peer_buffers_[r] == nullptr) {
        close_peer_handles();
        TORCH_CHECK(false, "CUDA IPC all-reduce: cannot map rank ", r, "'s buffer (cudaIpcOpenMemHandle: ",
                    cudaGetErrorString(error), "); containers need --ipc=host, and every rank must see the GPUs");
      }
    }
    staging.ptr[r] = peer_buffers_[r] + kFlagsBytes;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemcpyAsync(rank_data_, &staging, sizeof(RankData), cudaMemcpyHostToDevice, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));  // `staging` lives on this stack frame
  peers_open_ = true;
}

int64_t CustomAllReduce::staging_address(int64_t rank) const {
  TORCH_CHECK(rank >= 0 && rank < world_size_, "CUDA IPC all-reduce: rank must be in [0, ", world_size_, "), got ",
              rank);
  if (rank != rank_) check_open("a peer's staging address");
  TORCH_CHECK(peer_buffers_[rank] != nullptr, "CUDA IPC all-reduce: the communicator is closed");
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(peer_buffers_[rank] + kFlagsBytes));
}

namespace {
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

void check_transfer_tensor(const char* name, const at::Tensor& t, int device, int64_t max_bytes) {
  TORCH_CHECK(t.is_cuda() && t.get_device() == device && t.is_contiguous(), "CUDA IPC all-reduce: ", name,
              " must be a contiguous tensor on cuda:", device, ", got ", t.device());
  TORCH_CHECK(static_cast<int64_t>(t.nbytes()) <= max_bytes && t.nbytes() % kPackBytes == 0,
              "CUDA IPC all-reduce: ", name, " must be a multiple of ", kPackBytes, " bytes, at most ", max_bytes,
              ", got ", t.nbytes());
}
}  // namespace

void CustomAllReduce::write_staging(const at::Tensor& src) {
  TORCH_CHECK(buffer_ != nullptr, "CUDA IPC all-reduce: the communicator is closed");
  check_transfer_tensor("src", src, device_, max_bytes_);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemcpyAsync(buffer_ + kFlagsBytes, src.data_ptr(), src.nbytes(), cudaMemcpyDeviceToDevice,
                                 stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void CustomAllReduce::read_peer_staging(int64_t peer, at::Tensor& dst) {
  check_open("read_peer_staging");
  TORCH_CHECK(peer >= 0 && peer < world_size_, "CUDA IPC all-reduce: peer must be in [0, ", world_size_, "), got ",
              peer);
  check_transfer_tensor("dst", dst, device_, max_bytes_);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_peer_read(peer_buffers_[peer] + kFlagsBytes, dst.data_ptr(),
                                  static_cast<int64_t>(dst.nbytes()) / kPackBytes, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
}

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

void check_plan(bool two_shot, int64_t n_blocks, int64_t chunk, int64_t work_items, int world_size,
                int64_t resident_blocks) {
  TORCH_CHECK(n_blocks >= 1 && n_blocks <= kMaxBlocks, "CUDA IPC all-reduce: n_blocks must be in [1, ",
              kMaxBlocks, "], got ", n_blocks);
  // A block that waits at a barrier for a block that cannot be scheduled until it exits never returns.
  TORCH_CHECK(n_blocks <= resident_blocks, "CUDA IPC all-reduce: n_blocks ", n_blocks, " exceeds the ",
              resident_blocks, " blocks this GPU runs at once; the barriers need every block resident");
  if (two_shot) {
    TORCH_CHECK(chunk >= 0 && chunk * world_size >= work_items, "CUDA IPC all-reduce: two-shot chunk ", chunk,
                " x world size ", world_size, " does not cover ", work_items, " items");
  } else {
    TORCH_CHECK(chunk == work_items, "CUDA IPC all-reduce: one-shot chunk must be all ", work_items,
                " items, got ", chunk);
  }
}

Params base_params(const char* const* peer_buffers, int64_t max_bytes, int rank, int world_size,
                   const RankData* inputs, int64_t slot, int* error_word, int64_t timeout_ms, bool two_shot,
                   int64_t chunk) {
  Params p{};
  p.inputs = inputs;
  for (int r = 0; r < world_size; ++r) {
    p.flags[r] = reinterpret_cast<Flags*>(const_cast<char*>(peer_buffers[r]));
    p.results[r] = const_cast<char*>(peer_buffers[r]) + kFlagsBytes + max_bytes;
  }
  p.error_word = error_word;
  p.timeout_ns = static_cast<uint64_t>(timeout_ms) * 1000000ull;
  p.rank = rank;
  p.world_size = world_size;
  p.split = 1;
  p.slot = static_cast<int>(slot);
  p.two_shot = two_shot;
  p.chunk = chunk;
  return p;
}
}  // namespace

const RankData* CustomAllReduce::slot_for(const at::Tensor& input, int64_t slot, bool stage, cudaStream_t stream) {
  TORCH_CHECK(slot >= 0 && slot < kMaxSlots, "CUDA IPC all-reduce: slot must be in [0, ", kMaxSlots, "), got ",
              slot);
  if (slot == 0) {
    TORCH_CHECK(stage, "CUDA IPC all-reduce: slot 0 holds the staging buffers, so its inputs must be staged");
  } else {
    // A captured call's slot is filled after the capture (register_graph_buffers); launched now, outside a
    // capture, it would read whatever the slot holds.
    cudaStreamCaptureStatus status;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    TORCH_CHECK(status == cudaStreamCaptureStatusActive, "CUDA IPC all-reduce: slot ", slot,
                " belongs to a captured call, but the current stream is not capturing");
  }
  if (stage) {
    // Copy into this rank's staging buffer, whose address every peer already maps. Also valid inside a CUDA
    // graph (the copy is captured with its fixed addresses).
    C10_CUDA_CHECK(cudaMemcpyAsync(buffer_ + kFlagsBytes, input.data_ptr(), input.nbytes(),
                                   cudaMemcpyDeviceToDevice, stream));
  }
  return rank_data_ + slot;
}

void CustomAllReduce::all_reduce(const at::Tensor& input, at::Tensor& output, bool two_shot, int64_t n_blocks,
                                 int64_t chunk, int64_t slot, bool stage, int64_t timeout_ms) {
  check_open("all_reduce");
  const int64_t elem = element_size_of(input.scalar_type());
  check_tensor("input", input, input, device_, !stage);
  check_tensor("output", output, input, device_, true);
  TORCH_CHECK(output.numel() == input.numel(), "CUDA IPC all-reduce: output has ", output.numel(),
              " elements, input ", input.numel());
  TORCH_CHECK(static_cast<int64_t>(input.nbytes()) <= max_bytes_, "CUDA IPC all-reduce: message of ",
              input.nbytes(), " bytes exceeds the ", max_bytes_, "-byte buffer");
  TORCH_CHECK(timeout_ms >= 0, "CUDA IPC all-reduce: timeout_ms must be >= 0 (0: wait forever), got ", timeout_ms);
  const int64_t per_pack = kPackBytes / elem;
  const int64_t n_packs = input.numel() / per_pack;
  check_plan(two_shot, n_blocks, chunk, n_packs, world_size_, resident_blocks_);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const RankData* inputs = slot_for(input, slot, stage, stream);
  Params params = base_params(peer_buffers_, max_bytes_, rank_, world_size_, inputs, slot, error_word_device_,
                              timeout_ms, two_shot, chunk);
  params.out = output.data_ptr();
  params.n_packs = n_packs;
  params.n_tail = static_cast<int>(input.numel() - n_packs * per_pack);
  C10_CUDA_CHECK(launch_all_reduce(params, dtype_of(input.scalar_type()), /*fused=*/false,
                                   static_cast<int>(n_blocks), stream));
}

void CustomAllReduce::allreduce_residual_rmsnorm(const at::Tensor& input, const at::Tensor& residual,
                                                 const at::Tensor& weight, at::Tensor& normed,
                                                 at::Tensor& new_residual, double eps, bool two_shot,
                                                 int64_t n_blocks, int64_t chunk, int64_t split, int64_t slot,
                                                 bool stage, int64_t timeout_ms) {
  check_open("allreduce_residual_rmsnorm");
  const int64_t elem = element_size_of(input.scalar_type());
  check_tensor("input", input, input, device_, !stage);
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
  TORCH_CHECK(timeout_ms >= 0, "CUDA IPC all-reduce: timeout_ms must be >= 0 (0: wait forever), got ", timeout_ms);
  const int64_t n_rows = input.numel() / hidden;
  const int64_t packs_per_row = hidden / per_pack;
  check_plan(two_shot, n_blocks, chunk, n_rows, world_size_, resident_blocks_);
  TORCH_CHECK(split >= 1 && split <= packs_per_row && n_blocks % split == 0, "CUDA IPC all-reduce: split (blocks "
              "per row) must be in [1, ", packs_per_row, "] and divide n_blocks ", n_blocks, ", got ", split);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const RankData* inputs = slot_for(input, slot, stage, stream);
  Params params = base_params(peer_buffers_, max_bytes_, rank_, world_size_, inputs, slot, error_word_device_,
                              timeout_ms, two_shot, chunk);
  params.out = new_residual.data_ptr();
  params.normed = normed.data_ptr();
  params.residual = residual.data_ptr();
  params.weight = weight.data_ptr();
  params.n_rows = n_rows;
  params.packs_per_row = packs_per_row;
  params.split = static_cast<int>(split);
  params.packs_per_slice = (packs_per_row + split - 1) / split;
  params.normed_offset_bytes = max_bytes_;  // results region: new_residual rows, then normed rows
  params.eps = static_cast<float>(eps);
  C10_CUDA_CHECK(launch_all_reduce(params, dtype_of(input.scalar_type()), /*fused=*/true,
                                   static_cast<int>(n_blocks), stream));
}

std::tuple<int64_t, int64_t> CustomAllReduce::locate_input(const at::Tensor& input) const {
  TORCH_CHECK(input.is_cuda() && input.get_device() == device_, "CUDA IPC all-reduce: a captured input must be on "
              "cuda:", device_, ", got ", input.device());
  // torch's allocator knows a block by its first byte: the storage's, not a view's.
  void* const storage = input.storage().data_ptr().get();
  size_t segment_bytes = 0;
  void* base = nullptr;
  try {
    base = c10::cuda::CUDACachingAllocator::getBaseAllocation(storage, &segment_bytes);
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, "CUDA IPC all-reduce: a captured input is not a live block of torch's CUDA caching "
                "allocator (", error.what_without_backtrace(), ")");
  }
  TORCH_CHECK(base != nullptr, "CUDA IPC all-reduce: a captured input is not memory of torch's CUDA caching "
              "allocator");
  const uintptr_t start = reinterpret_cast<uintptr_t>(base), address = reinterpret_cast<uintptr_t>(input.data_ptr());
  TORCH_CHECK(address >= start && address - start + input.nbytes() <= segment_bytes, "CUDA IPC all-reduce: a "
              "captured input lies outside the allocation torch reports for it");
  return {static_cast<int64_t>(start), static_cast<int64_t>(address - start)};
}

at::Tensor CustomAllReduce::export_allocation(int64_t base) const {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaIpcMemHandle_t handle;
  const cudaError_t err = cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(static_cast<uintptr_t>(base)));
  if (err != cudaSuccess) (void)cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "CUDA IPC all-reduce: cannot export the allocation of a captured input "
              "(cudaIpcGetMemHandle: ", cudaGetErrorString(err), ")");
  at::Tensor out = at::empty({kIpcHandleBytes}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(out.data_ptr(), &handle, kIpcHandleBytes);
  return out;
}

int64_t CustomAllReduce::open_buffer(const at::Tensor& handle) {
  check_open("open_buffer");
  const std::string key = handle_key(handle, "handle");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  cudaError_t error = cudaSuccess;
  char* base = open_once(graph_handles_, key, &error);
  TORCH_CHECK(base != nullptr, "CUDA IPC all-reduce: cannot map a peer's captured input (cudaIpcOpenMemHandle: ",
              cudaGetErrorString(error), ")");
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(base));
}

void CustomAllReduce::write_slots(int64_t first_slot, const at::Tensor& table) {
  check_open("write_slots");
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.is_contiguous() &&
                  table.dim() == 2 && table.size(1) == world_size_,
              "CUDA IPC all-reduce: table must be a contiguous (n, ", world_size_, ") int64 CPU tensor, got ",
              table.scalar_type(), " ", table.sizes());
  const int64_t n = table.size(0);
  TORCH_CHECK(first_slot >= 1 && first_slot + n <= kMaxSlots, "CUDA IPC all-reduce: slots [", first_slot, ", ",
              first_slot + n, ") are outside [1, ", kMaxSlots, "): at most ", kMaxSlots - 1,
              " all-reduces can be captured per communicator");
  if (n == 0) return;
  std::vector<RankData> data(static_cast<size_t>(n));
  const int64_t* addresses = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    for (int r = 0; r < world_size_; ++r) {
      const int64_t address = addresses[i * world_size_ + r];
      TORCH_CHECK(address != 0 && address % kPackBytes == 0, "CUDA IPC all-reduce: slot ", first_slot + i,
                  ", rank ", r, ": address ", address, " is null or not ", kPackBytes, "-byte aligned");
      data[static_cast<size_t>(i)].ptr[r] = reinterpret_cast<const char*>(static_cast<uintptr_t>(address));
    }
  }
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  // Ordered on the current stream (a replay queued there before this cannot see half a table), and waited
  // for: `data` is pageable memory on this frame.
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemcpyAsync(rank_data_ + first_slot, data.data(), n * sizeof(RankData), cudaMemcpyHostToDevice,
                                 stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void CustomAllReduce::release_graph_buffers(int64_t end_slot) {
  check_open("release_graph_buffers");
  TORCH_CHECK(end_slot >= 1 && end_slot <= kMaxSlots, "CUDA IPC all-reduce: end_slot must be in [1, ", kMaxSlots,
              "], got ", end_slot);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
  if (end_slot > 1) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(cudaMemsetAsync(rank_data_ + 1, 0, (end_slot - 1) * sizeof(RankData), stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  close_handles(graph_handles_);
}

namespace {
// Teardown must not throw (it runs from the destructor, possibly after a trap made the context unusable), so
// it cannot use c10's device guard, which raises on a CUDA error.
class QuietDeviceGuard {
 public:
  explicit QuietDeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    (void)cudaSetDevice(device);
    (void)cudaGetLastError();
  }
  ~QuietDeviceGuard() {
    if (previous_ >= 0) (void)cudaSetDevice(previous_);
    (void)cudaGetLastError();
  }
  QuietDeviceGuard(const QuietDeviceGuard&) = delete;
  QuietDeviceGuard& operator=(const QuietDeviceGuard&) = delete;

 private:
  int previous_ = -1;
};
}  // namespace

int64_t CustomAllReduce::error_word() const {
  return error_word_host_ == nullptr ? 0 : static_cast<int64_t>(*static_cast<volatile int*>(error_word_host_));
}

void CustomAllReduce::close_handles(std::map<std::string, char*>& handles) {
  for (const auto& opened : handles) (void)cudaIpcCloseMemHandle(opened.second);
  handles.clear();
  (void)cudaGetLastError();
}

void CustomAllReduce::close_peer_handles() {
  // Errors are ignored here and in free_buffers: they also run from the destructor, possibly after a kernel
  // trapped (the context is then unusable) or at interpreter exit; leaking beats throwing from a destructor.
  const QuietDeviceGuard guard(device_);
  close_handles(graph_handles_);
  close_handles(peer_handles_);
  for (int r = 0; r < kMaxWorldSize; ++r) {
    if (r != rank_) peer_buffers_[r] = nullptr;
  }
  peers_open_ = false;
}

void CustomAllReduce::free_buffers() {
  TORCH_CHECK(peer_handles_.empty() && graph_handles_.empty(), "CUDA IPC all-reduce: free_buffers before "
              "close_peer_handles (every rank must close its mappings, then barrier, then free)");
  const QuietDeviceGuard guard(device_);
  if (buffer_ != nullptr) (void)cudaFree(buffer_);
  if (rank_data_ != nullptr) (void)cudaFree(rank_data_);
  if (error_word_host_ != nullptr) (void)cudaFreeHost(error_word_host_);
  (void)cudaGetLastError();
  buffer_ = nullptr;
  rank_data_ = nullptr;
  error_word_host_ = nullptr;
  error_word_device_ = nullptr;
  peer_buffers_[rank_] = nullptr;
}

}  // namespace ipc
}  // namespace tp_kernels
