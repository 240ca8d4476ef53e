// The shared-memory communicator: segment setup and teardown, the arrival/reduction protocol described in
// shm_comm.h, timeouts and mismatch checks. The arithmetic is in shm_reduce.cpp.
#include "cpu/shm_comm.h"

#include <ATen/MemoryOverlap.h>

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TPK_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define TPK_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define TPK_CPU_RELAX() std::atomic_signal_fence(std::memory_order_seq_cst)
#endif

namespace tp_kernels {
namespace shm {

namespace {
constexpr uint64_t kMagic = 0x314d48535f4b5054ull;  // "TPK_SHM1"
constexpr uint32_t kVersion = 2;
// Default one-shot limit; tp_kernels/comm/shm.py sets the same value (DEFAULT_ONE_SHOT_MAX_BYTES) with the
// measurement behind it.
constexpr int64_t kDefaultOneShotMaxBytes = 16 * 1024;
// Waiting: spin with the CPU's pause hint for up to kSpinUs, then yield the core at every poll, then
// after kYieldUs sleep between polls. With a rank per core a small all-reduce completes within the spin
// (one-shot 4 KiB: a few us); measured with 2 ranks on this loaded 2-core host, yielding after ~2k
// pauses (a few us) added ~150 us per two-shot call, because each yield handed the core to another
// process for a time slice. Yielding still lets 4 ranks on 2 cores progress, and sleeping keeps a rank
// that waits for a dead or stalled peer (up to the timeout) from burning a core.
constexpr double kSpinUs = 100.0;
constexpr double kYieldUs = 10000.0;
constexpr long kSleepNs = 50000;
}  // namespace

struct CallRecord {
  uint64_t seq;
  uint64_t total_bytes;
  uint64_t hidden;
  uint32_t op;
  uint32_t algo;
  uint32_t dtype;
  uint32_t unused;
};

struct alignas(64) SegmentHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t world_size;
  uint64_t slot_bytes;
  uint64_t segment_bytes;
  std::atomic<uint32_t> setup_state;  // 0: waiting for ranks to map; 1: unlinked, ready; 2: setup failed
};

// Written only by its rank; `arrived` and `reduced` sit on their own cache lines because the other ranks
// poll them.
struct alignas(64) RankControl {
  std::atomic<uint64_t> arrived;  // last seq whose input (and call record) this rank published
  CallRecord calls[2];            // per slot parity: the call this rank made at that seq
  alignas(64) std::atomic<uint64_t> reduced;  // last seq whose two-shot part this rank has reduced
  alignas(64) std::atomic<uint32_t> attached;  // 1 once this rank mapped the segment
  int32_t pid;
  // rank 0's only: bit c set when two-shot calls of size class c should publish with non-temporal stores
  // (StorePolicy)
  alignas(64) std::atomic<uint32_t> non_temporal_classes;
};

static_assert(std::atomic<uint64_t>::is_always_lock_free, "cross-process atomics must be lock-free");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "cross-process atomics must be lock-free");

namespace {

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

size_t control_offset() { return round_up(sizeof(SegmentHeader), 64); }

size_t data_offset(int world_size) {
  return round_up(control_offset() + world_size * sizeof(RankControl), 4096);
}

size_t segment_bytes(int world_size, int64_t slot_bytes) {
  return data_offset(world_size) + static_cast<size_t>(world_size) * 2 * slot_bytes;
}

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

std::string seconds(double s) {
  std::ostringstream out;
  out << s << " s";
  return out.str();
}

std::string rank_list(const std::vector<int>& ranks) {
  std::ostringstream s;
  for (size_t i = 0; i < ranks.size(); ++i) s << (i ? ", " : "") << ranks[i];
  return s.str();
}

// Measured with 2 ranks on the CI host (8 MiB L3; out of place, fp32, us): 1 MiB 118 cached vs 145
// streamed, 2 MiB 540 vs 298, 16 MiB 5380 vs 3950.
int64_t default_stream_min_bytes(int world_size) {
  long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 <= 0) l3 = 32l << 20;  // unknown: assume a large cache, stream only large messages
  return std::max<int64_t>(1 << 20, l3 / (2 * std::max(world_size, 1)));
}

std::string random_name() {
  std::random_device device;  // getrandom(2) on Linux
  std::ostringstream s;
  s << "/tpk-shm-" << std::hex;
  for (int i = 0; i < 4; ++i) s << ((device() & 0xffffu) | 0x10000u);  // 4 x 4 hex digits after a '1'
  return s.str();
}

DType to_dtype(at::ScalarType type, const char* arg) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      throw std::invalid_argument(std::string(arg) + " must be float32, float16 or bfloat16 for the shm "
                                  "communicator, got " + c10::toString(type));
  }
}

void check_cpu_contiguous(const at::Tensor& t, const char* arg) {
  if (!t.device().is_cpu())
    throw std::invalid_argument(std::string(arg) + " must be a CPU tensor for the shm communicator, got " +
                                t.device().str());
  if (!t.is_contiguous()) throw std::invalid_argument(std::string(arg) + " must be contiguous");
}

}  // namespace

ShmCommunicator::ShmCommunicator(std::string name, int rank, int world_size, int64_t slot_bytes, double timeout_s,
                                 std::string label)
    : name_(std::move(name)),
      label_(std::move(label)),
      rank_(rank),
      world_size_(world_size),
      slot_bytes_(slot_bytes),
      timeout_s_(timeout_s),
      one_shot_max_bytes_(kDefaultOneShotMaxBytes),
      stream_min_bytes_(default_stream_min_bytes(world_size)) {
  if (world_size < 2 || world_size > kMaxRanks)
    throw std::invalid_argument("world_size must be in [2, " + std::to_string(kMaxRanks) + "], got " +
                                std::to_string(world_size));
  if (rank < 0 || rank >= world_size)
    throw std::invalid_argument("rank must be in [0, " + std::to_string(world_size) + "), got " + std::to_string(rank));
  set_timeout_s(timeout_s);
}

std::shared_ptr<ShmCommunicator> ShmCommunicator::create(int world_size, int64_t slot_bytes, double timeout_s,
                                                         std::string label) {
  if (slot_bytes < 4096 || slot_bytes % 4096)
    throw std::invalid_argument("slot_bytes must be a positive multiple of 4096, got " + std::to_string(slot_bytes));
  std::shared_ptr<ShmCommunicator> comm(
      new ShmCommunicator("", 0, world_size, slot_bytes, timeout_s, std::move(label)));
  int fd = -1;
  for (int attempt = 0; attempt < 8 && fd < 0; ++attempt) {
    comm->name_ = random_name();
    fd = shm_open(comm->name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0 && errno != EEXIST)
      throw std::runtime_error("shm communicator of group '" + comm->label_ + "': shm_open(" + comm->name_ +
                               ") failed: " + errno_text(errno));
  }
  if (fd < 0) throw std::runtime_error("shm communicator: no free random segment name after 8 tries");
  const size_t bytes = segment_bytes(world_size, slot_bytes);
  try {
    if (fchmod(fd, 0600) != 0 || ftruncate(fd, static_cast<off_t>(bytes)) != 0)
      throw std::runtime_error("shm communicator of group '" + comm->label_ + "': sizing " + comm->name_ + " to " +
                               std::to_string(bytes) + " bytes failed: " + errno_text(errno));
    // Reserve the pages now: on a full /dev/shm (docker's default is 64 MiB) this fails here with ENOSPC
    // instead of a SIGBUS at the first write into a slot.
    const int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
    if (err != 0)
      throw std::runtime_error("shm communicator of group '" + comm->label_ + "': reserving " +
                               std::to_string(bytes) + " bytes of /dev/shm failed: " + errno_text(err));
    comm->map_segment(fd, bytes);
  } catch (...) {
    ::close(fd);
    shm_unlink(comm->name_.c_str());
    throw;
  }
  ::close(fd);
  SegmentHeader* h = comm->header_;
  h->magic = kMagic;
  h->version = kVersion;
  h->world_size = static_cast<uint32_t>(world_size);
  h->slot_bytes = static_cast<uint64_t>(slot_bytes);
  h->segment_bytes = bytes;
  comm->control_[0].pid = static_cast<int32_t>(getpid());
  comm->control_[0].attached.store(1, std::memory_order_release);
  return comm;
}

std::shared_ptr<ShmCommunicator> ShmCommunicator::attach(const std::string& name, int rank, int world_size,
                                                         double timeout_s, std::string label) {
  if (rank == 0) throw std::invalid_argument("rank 0 creates the segment (ShmCommunicator.create), it does not attach");
  std::shared_ptr<ShmCommunicator> comm(new ShmCommunicator(name, rank, world_size, 0, timeout_s, std::move(label)));
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0)
    throw std::runtime_error("shm communicator of group '" + comm->label_ + "': rank " + std::to_string(rank) +
                             " could not open segment " + name + ": " + errno_text(errno) +
                             " (rank 0 unlinks it if a rank does not map it within the timeout)");
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < data_offset(world_size)) {
    ::close(fd);
    throw std::runtime_error("shm communicator: segment " + name + " is too small to be a tp_kernels segment");
  }
  try {
    comm->map_segment(fd, static_cast<size_t>(st.st_size));
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  const SegmentHeader* h = comm->header_;
  if (h->magic != kMagic || h->version != kVersion || h->world_size != static_cast<uint32_t>(world_size) ||
      h->segment_bytes != static_cast<uint64_t>(st.st_size))
    throw std::runtime_error("shm communicator: segment " + name + " was made for world size " +
                             std::to_string(h->world_size) + " (version " + std::to_string(h->version) +
                             "), not for this group of world size " + std::to_string(world_size));
  comm->slot_bytes_ = static_cast<int64_t>(h->slot_bytes);
  comm->control_[rank].pid = static_cast<int32_t>(getpid());
  comm->control_[rank].attached.store(1, std::memory_order_release);
  return comm;
}

void ShmCommunicator::map_segment(int fd, size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED)
    throw std::runtime_error("shm communicator: mmap of " + std::to_string(bytes) + " bytes of " + name_ +
                             " failed: " + errno_text(errno));
  base_ = static_cast<char*>(p);
  mapped_bytes_ = bytes;
  header_ = reinterpret_cast<SegmentHeader*>(base_);
  control_ = reinterpret_cast<RankControl*>(base_ + control_offset());
  data_ = base_ + data_offset(world_size_);
}

ShmCommunicator::~ShmCommunicator() { close(); }

void ShmCommunicator::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (base_ == nullptr) return;
  if (rank_ == 0 && !setup_done_) shm_unlink(name_.c_str());  // setup never finished: the name is still there
  munmap(base_, mapped_bytes_);
  base_ = nullptr;
  header_ = nullptr;
  control_ = nullptr;
  data_ = nullptr;
}

void ShmCommunicator::set_timeout_s(double timeout_s) {
  if (!(timeout_s > 0)) throw std::invalid_argument("timeout_s must be > 0, got " + std::to_string(timeout_s));
  timeout_s_ = timeout_s;
}

void ShmCommunicator::set_stream_min_bytes(int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("stream_min_bytes must be >= 0, got " + std::to_string(bytes));
  stream_min_bytes_ = bytes;
}

void ShmCommunicator::set_one_shot_max_bytes(int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("one_shot_max_bytes must be >= 0, got " + std::to_string(bytes));
  one_shot_max_bytes_ = bytes;
}

// ------------------------------------------------------------------------------------------------------
// setup
// ------------------------------------------------------------------------------------------------------
void ShmCommunicator::finish_setup() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (base_ == nullptr) throw std::runtime_error("shm communicator of group '" + label_ + "' is closed");
  if (setup_done_) return;
  const auto start = std::chrono::steady_clock::now();
  const auto timeout = std::chrono::duration<double>(timeout_s_);
  for (;;) {
    if (rank_ == 0) {
      std::vector<int> missing;
      for (int r = 1; r < world_size_; ++r)
        if (control_[r].attached.load(std::memory_order_acquire) != 1) missing.push_back(r);
      if (missing.empty()) {
        shm_unlink(name_.c_str());  // every rank holds a mapping: the name is no longer needed
        setup_done_ = true;
        header_->setup_state.store(1, std::memory_order_release);
        return;
      }
      if (std::chrono::steady_clock::now() - start > timeout) {
        shm_unlink(name_.c_str());
        setup_done_ = true;
        header_->setup_state.store(2, std::memory_order_release);
        fail("rank(s) " + rank_list(missing) + " did not map the shared memory segment within " +
             seconds(timeout_s_) + " (TP_KERNELS_COMM_TIMEOUT); the segment was removed");
      }
    } else {
      const uint32_t state = header_->setup_state.load(std::memory_order_acquire);
      if (state == 1) {
        setup_done_ = true;
        return;
      }
      if (state == 2) {
        setup_done_ = true;
        fail("rank 0 gave up waiting for the other ranks to map the shared memory segment");
      }
      if (std::chrono::steady_clock::now() - start > timeout) {
        setup_done_ = true;
        fail("rank(s) 0 did not finish setting up the shared memory segment within " + seconds(timeout_s_) +
             " (TP_KERNELS_COMM_TIMEOUT)");
      }
    }
    struct timespec pause = {0, 100000};  // setup is once per group: 0.1 ms polls keep the core free
    nanosleep(&pause, nullptr);
  }
}

// ------------------------------------------------------------------------------------------------------
// protocol
// ------------------------------------------------------------------------------------------------------
char* ShmCommunicator::slot(int rank, uint64_t seq) const {
  return data_ + (static_cast<size_t>(rank) * 2 + (seq & 1)) * static_cast<size_t>(slot_bytes_);
}

void ShmCommunicator::fail(const std::string& message) {
  broken_ = message;
  throw std::runtime_error("tp_kernels shm communicator of group '" + label_ + "' (rank " + std::to_string(rank_) +
                           " of " + std::to_string(world_size_) + "): " + message);
}

void ShmCommunicator::check_usable(const char* what) const {
  if (base_ == nullptr)
    throw std::runtime_error(std::string(what) + ": the shm communicator of group '" + label_ + "' is closed");
  if (!setup_done_)
    throw std::runtime_error(std::string(what) + ": the shm communicator of group '" + label_ +
                             "' has not finished setup (call finish_setup on every rank)");
  if (!broken_.empty())
    throw std::runtime_error(std::string(what) + ": the shm communicator of group '" + label_ +
                             "' is unusable after an earlier failure: " + broken_);
}

ShmCommunicator::Algo ShmCommunicator::choose_algo(uint64_t total_bytes) const {
  return total_bytes <= static_cast<uint64_t>(one_shot_max_bytes_) ? Algo::kOneShot : Algo::kTwoShot;
}

void ShmCommunicator::arrive(const Call& call, const void* src, uint64_t bytes, uint64_t own_lo, uint64_t own_hi,
                             bool non_temporal) {
  const uint64_t seq = seq_;
  char* mine_slot = slot(rank_, seq);
  const char* in = static_cast<const char*>(src);
  copy_bytes(mine_slot, in, own_lo, non_temporal);
  copy_bytes(mine_slot + own_hi, in + own_hi, bytes - own_hi, non_temporal);
  if (non_temporal) streaming_fence();  // non-temporal stores are not ordered by the release store below
  RankControl& mine = control_[rank_];
  mine.calls[seq & 1] = CallRecord{seq, call.total_bytes, call.hidden, static_cast<uint32_t>(call.op),
                                   static_cast<uint32_t>(call.algo), static_cast<uint32_t>(call.dtype), 0};
  mine.arrived.store(seq, std::memory_order_release);  // matches the acquire in wait_for (peers' arrive phase)
  wait_for(false, "arrive");
  check_calls_match(call);
}

void ShmCommunicator::wait_for(bool reduced_flag, const char* phase) {
  const uint64_t seq = seq_;
  auto flag = [&](int r) -> const std::atomic<uint64_t>& {
    return reduced_flag ? control_[r].reduced : control_[r].arrived;
  };
  int next = rank_ == 0 ? 1 : 0;  // ranks before `next` (other than this one) have been seen
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t polls = 1;; ++polls) {
    while (next < world_size_ && (next == rank_ || flag(next).load(std::memory_order_acquire) >= seq)) ++next;
    if (next >= world_size_) return;
    if (polls % 64 != 0) {  // the clock is read every 64 polls (~20 ns each, vs ~1 ns for a poll)
      TPK_CPU_RELAX();
      continue;
    }
    const double waited_us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    if (waited_us < kSpinUs) {
      TPK_CPU_RELAX();
      continue;
    }
    if (waited_us < kYieldUs) {
      sched_yield();
      continue;
    }
    if (waited_us < timeout_s_ * 1e6) {
      struct timespec pause = {0, kSleepNs};
      nanosleep(&pause, nullptr);
      continue;
    }
    std::vector<int> missing;
    std::string exited;
    for (int r = 0; r < world_size_; ++r) {
      if (r == rank_ || flag(r).load(std::memory_order_acquire) >= seq) continue;
      missing.push_back(r);
      const int32_t pid = control_[r].pid;
      if (pid > 0 && kill(pid, 0) != 0 && errno == ESRCH)
        exited += "; process " + std::to_string(pid) + " of rank " + std::to_string(r) + " has exited";
    }
    fail("rank(s) " + rank_list(missing) + " did not arrive within " + seconds(timeout_s_) +
         " (TP_KERNELS_COMM_TIMEOUT) at collective #" + std::to_string(seq) + " (phase '" + phase + "')" + exited);
  }
}

std::string ShmCommunicator::describe(int rank, uint64_t seq) const {
  const CallRecord& c = control_[rank].calls[seq & 1];
  std::ostringstream s;
  s << "rank " << rank << ": "
    << (c.op == static_cast<uint32_t>(Op::kAllReduce) ? "all_reduce" : "allreduce_residual_rmsnorm") << " of "
    << c.total_bytes << " bytes of " << dtype_name(static_cast<DType>(c.dtype));
  if (c.hidden) s << ", hidden " << c.hidden;
  s << ", " << (c.algo == static_cast<uint32_t>(Algo::kOneShot) ? "one-shot" : "two-shot");
  return s.str();
}

void ShmCommunicator::check_calls_match(const Call& call) {
  const uint64_t seq = seq_;
  bool mismatch = false;
  for (int r = 0; r < world_size_; ++r) {
    const CallRecord& c = control_[r].calls[seq & 1];
    if (c.seq != seq)  // cannot happen while every rank follows the protocol: the ranks' states diverged
      fail("rank " + std::to_string(r) + " published collective #" + std::to_string(c.seq) + " where this rank is at #" +
           std::to_string(seq) + "; the ranks are out of step");
    mismatch |= c.total_bytes != call.total_bytes || c.hidden != call.hidden ||
                c.op != static_cast<uint32_t>(call.op) || c.algo != static_cast<uint32_t>(call.algo) ||
                c.dtype != static_cast<uint32_t>(call.dtype);
  }
  if (!mismatch) return;
  // Every rank sees the same records, so every rank raises here at the same seq and the ranks stay in
  // step: the communicator remains usable for the next (matching) call.
  std::string table;
  for (int r = 0; r < world_size_; ++r) table += "\n  " + describe(r, seq);
  throw std::runtime_error("tp_kernels shm communicator of group '" + label_ + "' (rank " + std::to_string(rank_) +
                           "): mismatched collective #" + std::to_string(seq) +
                           ": every rank must make the same call with the same size and dtype;" + table);
}

// ------------------------------------------------------------------------------------------------------
// collectives
// ------------------------------------------------------------------------------------------------------
at::Tensor ShmCommunicator::all_reduce(const at::Tensor& x, std::optional<at::Tensor> out_arg) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable("all_reduce");
  check_cpu_contiguous(x, "x");
  const DType dtype = to_dtype(x.scalar_type(), "x");
  at::Tensor out = out_arg.has_value() ? *out_arg : at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out_arg.has_value()) {
    check_cpu_contiguous(out, "out");
    if (out.sizes() != x.sizes() || out.scalar_type() != x.scalar_type())
      throw std::invalid_argument("out must have x's shape and dtype");
    if (at::get_overlap_status(out, x) == at::MemOverlapStatus::Partial)
      throw std::invalid_argument("out must be x itself (in place) or not overlap x");
  }
  const bool in_place = out.numel() > 0 && out.data_ptr() == x.data_ptr();
  const int64_t elem = dtype_size(dtype);
  const int64_t n = x.numel();
  const Call call{Op::kAllReduce, choose_algo(static_cast<uint64_t>(n * elem)), dtype, static_cast<uint64_t>(n * elem), 0};
  const int64_t step_elems = slot_bytes_ / elem;
  // Two-shot parts are whole cache lines, so no two ranks write the same line of a slot.
  const int64_t part_align = 64 / elem;
  const char* in = static_cast<const char*>(x.data_ptr());
  char* result = static_cast<char*>(out.data_ptr());
  const void* srcs[kMaxRanks];
  // Large messages: the result is written with non-temporal stores, each part copied from the slot that
  // holds it (this rank's own part too), instead of with ordinary stores that read each line first. Not in
  // place: there the step's lines of x were just read, are in cache, and evicting them cost 11% at 16 MiB
  // (out of place it measured neutral to 1.35x faster, depending on how the host placed the two cores).
  const bool stream = call.algo == Algo::kTwoShot && n * elem >= stream_min_bytes_ && !in_place;
  // How this rank publishes into its slot (see shm_store_policy.h); timed on rank 0 when learned.
  const bool timed = call.algo == Algo::kTwoShot && store_mode_ == StorePolicy::Mode::kAuto &&
                     call.total_bytes >= StorePolicy::kMinTimedBytes;
  const uint32_t nt_classes = rank_ == 0 ? store_policy_.choices()
                                         : control_[0].non_temporal_classes.load(std::memory_order_relaxed);
  const bool publish_nt = store_mode_ == StorePolicy::Mode::kNonTemporal ||
                          (timed && (nt_classes >> StorePolicy::size_class(call.total_bytes) & 1u));
  const auto start = std::chrono::steady_clock::now();
  int64_t offset = 0;
  do {  // at least one step, so that an empty call still meets (and is checked against) the others
    const int64_t count = std::min(step_elems, n - offset);
    ++seq_;
    const uint64_t step_bytes = static_cast<uint64_t>(count * elem);
    if (call.algo == Algo::kOneShot) {
      arrive(call, in + offset * elem, step_bytes, step_bytes, step_bytes, false);
      for (int r = 0; r < world_size_; ++r) srcs[r] = slot(r, seq_);
      reduce_sum(dtype, srcs, world_size_, count, result + offset * elem, nullptr);
    } else {
      const int64_t part = (count + world_size_ * part_align - 1) / (world_size_ * part_align) * part_align;
      const int64_t lo = std::min(count, rank_ * part), hi = std::min(count, lo + part);
      // Only the parts the other ranks reduce are published; this rank reads its own part from x.
      arrive(call, in + offset * elem, step_bytes, static_cast<uint64_t>(lo * elem), static_cast<uint64_t>(hi * elem),
             publish_nt);
      for (int r = 0; r < world_size_; ++r) srcs[r] = slot(r, seq_) + lo * elem;
      srcs[rank_] = in + (offset + lo) * elem;
      // this rank's part, into its own slot (for the others) and into the result
      char* own_part = slot(rank_, seq_) + lo * elem;
      char* own_result = result + (offset + lo) * elem;
      if (!publish_nt) {
        reduce_sum(dtype, srcs, world_size_, hi - lo, own_part, stream ? nullptr : own_result);
      } else if (!stream) {
        reduce_sum(dtype, srcs, world_size_, hi - lo, own_result, nullptr);
        copy_streaming(own_part, own_result, (hi - lo) * elem);
        streaming_fence();  // before the release store below
      } else {
        reduce_streaming_both(dtype, srcs, hi - lo, own_part, own_result);
      }
      control_[rank_].reduced.store(seq_, std::memory_order_release);  // matches the acquire in wait_for below
      if (stream && !publish_nt) copy_streaming(own_result, own_part, (hi - lo) * elem);
      wait_for(true, "reduce-scatter");
      for (int r = 0; r < world_size_; ++r) {
        const int64_t r_lo = std::min(count, r * part), r_hi = std::min(count, r_lo + part);
        if (r != rank_ && r_hi > r_lo)
          copy_bytes(result + (offset + r_lo) * elem, slot(r, seq_) + r_lo * elem, (r_hi - r_lo) * elem, stream);
      }
    }
    offset += count;
  } while (offset < n);
  if (stream) streaming_fence();
  if (timed && rank_ == 0) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    control_[0].non_temporal_classes.store(store_policy_.record(publish_nt, seconds, call.total_bytes),
                                           std::memory_order_relaxed);
  }
  return out;
}

void ShmCommunicator::reduce_streaming_both(DType dtype, const void* const* srcs, int64_t n, char* slot_part,
                                            char* result_part) {
  // Through an L1-sized buffer, so that both destinations get non-temporal stores.
  alignas(64) char buffer[16384];
  const int64_t elem = dtype_size(dtype);
  const int64_t block = static_cast<int64_t>(sizeof(buffer)) / elem;
  const void* block_srcs[kMaxRanks];
  for (int64_t start = 0; start < n; start += block) {
    const int64_t len = std::min(block, n - start);
    for (int r = 0; r < world_size_; ++r) block_srcs[r] = static_cast<const char*>(srcs[r]) + start * elem;
    reduce_sum(dtype, block_srcs, world_size_, len, buffer, nullptr);
    copy_streaming(slot_part + start * elem, buffer, len * elem);
    copy_streaming(result_part + start * elem, buffer, len * elem);
  }
  streaming_fence();
}

void ShmCommunicator::set_store_mode(const std::string& mode) {
  if (mode == "auto") {
    store_mode_ = StorePolicy::Mode::kAuto;
  } else if (mode == "ordinary") {
    store_mode_ = StorePolicy::Mode::kOrdinary;
  } else if (mode == "non-temporal") {
    store_mode_ = StorePolicy::Mode::kNonTemporal;
  } else {
    throw std::invalid_argument("publish_stores must be 'auto', 'ordinary' or 'non-temporal', got '" + mode + "'");
  }
}

std::string ShmCommunicator::store_mode() const {
  switch (store_mode_) {
    case StorePolicy::Mode::kOrdinary: return "ordinary";
    case StorePolicy::Mode::kNonTemporal: return "non-temporal";
    default: return "auto";
  }
}

std::tuple<at::Tensor, at::Tensor> ShmCommunicator::allreduce_residual_rmsnorm(const at::Tensor& x,
                                                                               const at::Tensor& residual,
                                                                               const at::Tensor& weight, double eps) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable("allreduce_residual_rmsnorm");
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(residual, "residual");
  check_cpu_contiguous(weight, "weight");
  const DType dtype = to_dtype(x.scalar_type(), "x");
  if (x.dim() < 1) throw std::invalid_argument("x must have at least one dimension (..., hidden)");
  if (residual.sizes() != x.sizes() || residual.scalar_type() != x.scalar_type())
    throw std::invalid_argument("residual must have x's shape and dtype");
  const int64_t hidden = x.size(-1);
  if (weight.dim() != 1 || weight.size(0) != hidden || weight.scalar_type() != x.scalar_type())
    throw std::invalid_argument("weight must be (hidden,) = (" + std::to_string(hidden) + ",) of x's dtype");
  if (!(eps > 0)) throw std::invalid_argument("eps must be > 0, got " + std::to_string(eps));
  const int64_t elem = dtype_size(dtype);
  const int64_t row_bytes = hidden * elem;
  if (row_bytes > slot_bytes_)
    throw std::invalid_argument("a row of x (" + std::to_string(row_bytes) + " bytes) must fit in a slot (" +
                                std::to_string(slot_bytes_) + " bytes)");
  at::Tensor normed = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor new_residual = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n_rows = hidden == 0 ? 0 : x.numel() / hidden;
  const uint64_t total = static_cast<uint64_t>(x.numel() * elem);
  const Call call{Op::kResidualRmsNorm, choose_algo(total), dtype, total, static_cast<uint64_t>(hidden)};
  const int64_t rows_per_step = hidden == 0 ? 1 : slot_bytes_ / row_bytes;
  const char* in = static_cast<const char*>(x.data_ptr());
  const char* res = static_cast<const char*>(residual.data_ptr());
  char* normed_out = static_cast<char*>(normed.data_ptr());
  char* residual_out = static_cast<char*>(new_residual.data_ptr());
  const float epsf = static_cast<float>(eps);
  const void* srcs[kMaxRanks];
  auto epilogue = [&](const void* const* sources, int n_sources, int64_t row0, int64_t rows, void* x_out) {
    const int64_t at = row0 * row_bytes;
    reduce_residual_rmsnorm(dtype, sources, n_sources, rows, hidden, res + at, weight.data_ptr(), epsf,
                            normed_out + at, residual_out + at, x_out);
  };
  int64_t row0 = 0;
  do {
    const int64_t rows = std::min(rows_per_step, n_rows - row0);
    ++seq_;
    const uint64_t step_bytes = static_cast<uint64_t>(rows * row_bytes);
    if (call.algo == Algo::kOneShot) {
      arrive(call, in + row0 * row_bytes, step_bytes, step_bytes, step_bytes, false);
      for (int r = 0; r < world_size_; ++r) srcs[r] = slot(r, seq_);
      epilogue(srcs, world_size_, row0, rows, nullptr);
    } else {
      // rank r reduces rows [r * rows / W, (r + 1) * rows / W) of the step, whole rows so that it can
      // finish their norm too; the others then normalize those rows from its slot
      const int64_t lo = rank_ * rows / world_size_, hi = (rank_ + 1) * rows / world_size_;
      arrive(call, in + row0 * row_bytes, step_bytes, static_cast<uint64_t>(lo * row_bytes),
             static_cast<uint64_t>(hi * row_bytes), false);
      for (int r = 0; r < world_size_; ++r) srcs[r] = slot(r, seq_) + lo * row_bytes;
      srcs[rank_] = in + (row0 + lo) * row_bytes;
      epilogue(srcs, world_size_, row0 + lo, hi - lo, slot(rank_, seq_) + lo * row_bytes);
      control_[rank_].reduced.store(seq_, std::memory_order_release);  // matches the acquire in wait_for below
      wait_for(true, "reduce-scatter");
      for (int r = 0; r < world_size_; ++r) {
        const int64_t r_lo = r * rows / world_size_, r_hi = (r + 1) * rows / world_size_;
        if (r == rank_ || r_hi == r_lo) continue;
        const void* owner = slot(r, seq_) + r_lo * row_bytes;
        epilogue(&owner, 1, row0 + r_lo, r_hi - r_lo, nullptr);
      }
    }
    row0 += rows;
  } while (row0 < n_rows);
  return {normed, new_residual};
}

}  // namespace shm
}  // namespace tp_kernels
