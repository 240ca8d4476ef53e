// The shared-memory communicator: segment setup and teardown, the arrival/reduction protocol described in
// shm_comm.h, timeouts and mismatch checks. The arithmetic is in shm_reduce.cpp.
#include "cpu/shm_comm.h"

#include <ATen/MemoryOverlap.h>

#include <fcntl.h>
#include <pthread.h>
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
constexpr uint32_t kVersion = 3;
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
// A wait calls the interrupt check (Python: PyErr_CheckSignals, under the GIL) this often: Ctrl-C is
// acted on within ~20 ms plus one sleep, well inside the 100 ms a user notices.
constexpr int kInterruptCheckMs = 20;

std::atomic<ShmCommunicator::InterruptCheck>& interrupt_check_fn() {
  static std::atomic<ShmCommunicator::InterruptCheck> check{nullptr};
  return check;
}

uint64_t this_thread() { return static_cast<uint64_t>(pthread_self()); }

// A call that differs from the peers' at the same seq: every rank sees the same records and raises at the
// same seq, so the ranks stay in step and the communicator stays usable (no poisoning).
class MismatchedCall : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
}  // namespace

struct CallRecord {
  uint64_t seq;
  uint64_t total_bytes;
  uint64_t hidden;
  double eps;
  uint32_t op;
  uint32_t algo;
  uint32_t dtype;
  uint32_t unused;
};

// Written by rank 0 before it marks setup_state 1; every other rank checks each field against its own
// mapping before it uses the segment (finish_setup).
struct alignas(64) SegmentHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t world_size;
  uint64_t slot_bytes;
  uint64_t segment_bytes;
  std::atomic<uint32_t> setup_state;  // 0: waiting for ranks to map; 1: ready; 2: setup failed
  uint32_t unused;
  uint64_t segment_id;
  // The first failure of any rank (see poison): 0 while healthy, else the failing rank + 1; its reason
  // follows once poison_reason_ready is 1. Own cache line: polled in every wait, written once.
  alignas(64) std::atomic<uint32_t> poisoned_by;
  std::atomic<uint32_t> poison_reason_ready;
  char poison_reason[248];
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

size_t layout_bytes(int world_size, int64_t slot_bytes) {
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

uint64_t random_u64() {
  std::random_device device;  // getrandom(2) on Linux
  return (static_cast<uint64_t>(device()) << 32) ^ device();
}

void check_layout_args(int world_size, int64_t slot_bytes) {
  if (world_size < 2 || world_size > ShmCommunicator::kMaxRanks)
    throw std::invalid_argument("world_size must be in [2, " + std::to_string(ShmCommunicator::kMaxRanks) + "], got " +
                                std::to_string(world_size));
  if (slot_bytes < 4096 || slot_bytes % 4096)
    throw std::invalid_argument("slot_bytes must be a positive multiple of 4096, got " + std::to_string(slot_bytes));
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

ShmCommunicator::ShmCommunicator(int rank, int world_size, int64_t slot_bytes, double timeout_s, std::string label)
    : label_(std::move(label)),
      rank_(rank),
      world_size_(world_size),
      slot_bytes_(slot_bytes),
      timeout_s_(timeout_s),
      one_shot_max_bytes_(kDefaultOneShotMaxBytes),
      stream_min_bytes_(default_stream_min_bytes(world_size)) {
  check_layout_args(world_size, slot_bytes);
  if (rank < 0 || rank >= world_size)
    throw std::invalid_argument("rank must be in [0, " + std::to_string(world_size) + "), got " + std::to_string(rank));
  set_timeout_s(timeout_s);
  owner_thread_.store(this_thread(), std::memory_order_relaxed);
}

int64_t ShmCommunicator::segment_bytes(int world_size, int64_t slot_bytes) {
  check_layout_args(world_size, slot_bytes);
  return static_cast<int64_t>(layout_bytes(world_size, slot_bytes));
}

std::shared_ptr<ShmCommunicator> ShmCommunicator::map_fd(int fd, int64_t offset, int rank, int world_size,
                                                         int64_t slot_bytes, double timeout_s, std::string label) {
  std::shared_ptr<ShmCommunicator> comm(new ShmCommunicator(rank, world_size, slot_bytes, timeout_s, std::move(label)));
  const std::string who = "shm communicator of group '" + comm->label_ + "' (rank " + std::to_string(rank) + "): ";
  const long page = sysconf(_SC_PAGESIZE);
  if (offset < 0 || offset % page)
    throw std::invalid_argument(who + "offset must be a non-negative multiple of the page size " + std::to_string(page) +
                                ", got " + std::to_string(offset));
  const size_t bytes = layout_bytes(world_size, slot_bytes);
  // The descriptor must be the kind tp_kernels.comm.segment makes, and exactly the size this rank's own
  // arguments give: every address computed below then lies inside the mapping, and the seal keeps it so
  // (a shrunk file would turn a slot access into SIGBUS).
  struct stat st;
  if (fstat(fd, &st) != 0) throw std::runtime_error(who + "fstat of descriptor " + std::to_string(fd) + " failed: " + errno_text(errno));
  std::string problem;
  if (!S_ISREG(st.st_mode)) {
    problem = "is not a regular file";
  } else if (st.st_uid != geteuid()) {
    problem = "belongs to uid " + std::to_string(st.st_uid) + ", not to this process's uid " + std::to_string(geteuid());
  } else if ((st.st_mode & 0777) != 0600) {
    std::ostringstream mode;
    mode << std::oct << (st.st_mode & 0777);
    problem = "has mode 0" + mode.str() + ", expected 0600";
  } else if (static_cast<uint64_t>(st.st_size) != static_cast<uint64_t>(offset) + bytes) {
    problem = "is " + std::to_string(st.st_size) + " bytes, but offset " + std::to_string(offset) + " + the layout of " +
              std::to_string(world_size) + " ranks with " + std::to_string(slot_bytes) + "-byte slots needs " +
              std::to_string(static_cast<uint64_t>(offset) + bytes);
  } else {
    const int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) problem = "is not sealed against shrinking (tp_kernels.comm.segment's are)";
  }
  if (!problem.empty()) throw std::runtime_error(who + "refused descriptor " + std::to_string(fd) + ": it " + problem);
  if (rank == 0) {
    // Reserve the pages now: when memory is short this fails here with ENOSPC/ENOMEM instead of a SIGBUS at
    // the first write into a slot.
    const int err = posix_fallocate(fd, static_cast<off_t>(offset), static_cast<off_t>(bytes));
    if (err != 0)
      throw std::runtime_error(who + "reserving " + std::to_string(bytes) + " bytes of shared memory failed: " +
                               errno_text(err));
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (p == MAP_FAILED) throw std::runtime_error(who + "mmap of " + std::to_string(bytes) + " bytes failed: " + errno_text(errno));
  comm->base_ = static_cast<char*>(p);
  comm->mapped_bytes_ = bytes;
  comm->header_ = reinterpret_cast<SegmentHeader*>(comm->base_);
  comm->control_ = reinterpret_cast<RankControl*>(comm->base_ + control_offset());
  comm->data_ = comm->base_ + data_offset(world_size);
  if (rank == 0) {
    SegmentHeader* h = comm->header_;
    h->magic = kMagic;
    h->version = kVersion;
    h->world_size = static_cast<uint32_t>(world_size);
    h->slot_bytes = static_cast<uint64_t>(slot_bytes);
    h->segment_bytes = bytes;
    h->segment_id = random_u64();
  }
  comm->control_[rank].pid = static_cast<int32_t>(getpid());
  comm->control_[rank].attached.store(1, std::memory_order_release);  // rank 0: after the header (finish_setup)
  return comm;
}

ShmCommunicator::~ShmCommunicator() { close(); }

void ShmCommunicator::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (base_ == nullptr) return;
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
  auto last_interrupt_check = start;
  const auto timeout = std::chrono::duration<double>(timeout_s_);
  for (;;) {
    if (rank_ == 0) {
      std::vector<int> missing;
      for (int r = 1; r < world_size_; ++r)
        if (control_[r].attached.load(std::memory_order_acquire) != 1) missing.push_back(r);
      if (missing.empty()) {
        setup_done_ = true;
        segment_id_ = header_->segment_id;
        header_->setup_state.store(1, std::memory_order_release);  // matches the acquire of the others below
        return;
      }
      if (std::chrono::steady_clock::now() - start > timeout) {
        setup_done_ = true;
        header_->setup_state.store(2, std::memory_order_release);
        fail("rank(s) " + rank_list(missing) + " did not map the shared memory segment within " +
             seconds(timeout_s_) + " (TP_KERNELS_COMM_TIMEOUT)");
      }
    } else {
      const uint32_t state = header_->setup_state.load(std::memory_order_acquire);
      if (state == 1) {
        setup_done_ = true;
        check_header();
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
    check_interrupt(last_interrupt_check, 0, "setup");
    struct timespec pause = {0, 100000};  // setup is once per group: 0.1 ms polls keep the core free
    nanosleep(&pause, nullptr);
  }
}

void ShmCommunicator::check_header() {
  // Every field rank 0 wrote, against what this rank mapped from its own arguments: the header is only
  // information (no address is computed from it), so a forged or stale one is refused, never followed.
  const SegmentHeader* h = header_;
  std::ostringstream problem;
  if (h->magic != kMagic || h->version != kVersion) {
    problem << "magic " << std::hex << h->magic << std::dec << " version " << h->version << ", expected "
            << std::hex << kMagic << std::dec << " version " << kVersion;
  } else if (h->world_size != static_cast<uint32_t>(world_size_)) {
    problem << "world size " << h->world_size << ", this rank's is " << world_size_;
  } else if (h->slot_bytes != static_cast<uint64_t>(slot_bytes_)) {
    problem << "slot_bytes " << h->slot_bytes << ", this rank's is " << slot_bytes_;
  } else if (h->segment_bytes != mapped_bytes_) {
    problem << "segment size " << h->segment_bytes << " bytes, this rank mapped " << mapped_bytes_;
  }
  if (!problem.str().empty())
    fail("the segment header disagrees with this rank's mapping (" + problem.str() + "); refused before any use");
  segment_id_ = h->segment_id;
}

// ------------------------------------------------------------------------------------------------------
// protocol
// ------------------------------------------------------------------------------------------------------
char* ShmCommunicator::slot(int rank, uint64_t seq) const {
  return data_ + (static_cast<size_t>(rank) * 2 + (seq & 1)) * static_cast<size_t>(slot_bytes_);
}

void ShmCommunicator::fail(const std::string& message) {
  poison(message);
  throw std::runtime_error("tp_kernels shm communicator of group '" + label_ + "' (rank " + std::to_string(rank_) +
                           " of " + std::to_string(world_size_) + "): " + message);
}

// ------------------------------------------------------------------------------------------------------
// poisoning, threads, interrupts
// ------------------------------------------------------------------------------------------------------
void ShmCommunicator::poison(const std::string& why) {
  if (broken_.empty()) broken_ = "rank " + std::to_string(rank_) + ": " + why;
  publish_poison(why);
}

void ShmCommunicator::publish_poison(const std::string& why) {
  if (header_ == nullptr) return;
  uint32_t healthy = 0;
  if (!header_->poisoned_by.compare_exchange_strong(healthy, static_cast<uint32_t>(rank_ + 1),
                                                    std::memory_order_acq_rel))
    return;  // a failure was recorded already: the first one is the cause, the others its consequences
  const size_t n = std::min(why.size(), sizeof(header_->poison_reason) - 1);
  std::memcpy(header_->poison_reason, why.data(), n);
  header_->poison_reason[n] = '\0';
  header_->poison_reason_ready.store(1, std::memory_order_release);  // matches the acquire in segment_failure
}

int ShmCommunicator::poisoned_by() const {
  if (header_ == nullptr) return -1;
  return static_cast<int>(header_->poisoned_by.load(std::memory_order_acquire)) - 1;
}

std::string ShmCommunicator::segment_failure() const {
  const int by = poisoned_by();
  if (by < 0) return "";
  std::string s = "rank " + std::to_string(by);
  if (header_->poison_reason_ready.load(std::memory_order_acquire) == 1)  // written by another process: bounded
    s += ": " + std::string(header_->poison_reason, strnlen(header_->poison_reason, sizeof(header_->poison_reason)));
  return s;
}

void ShmCommunicator::raise_poisoned(const std::string& what) {
  const std::string reason = segment_failure();
  if (broken_.empty()) broken_ = reason;
  throw std::runtime_error("tp_kernels shm communicator of group '" + label_ + "' (rank " + std::to_string(rank_) +
                           " of " + std::to_string(world_size_) + "): " + what + " cannot complete: a rank failed (" +
                           reason + "); the communicator is unusable until the group is made again");
}

void ShmCommunicator::check_usable(const char* what) {
  if (base_ == nullptr)
    throw std::runtime_error(std::string(what) + ": the shm communicator of group '" + label_ + "' is closed");
  if (!setup_done_)
    throw std::runtime_error(std::string(what) + ": the shm communicator of group '" + label_ +
                             "' has not finished setup (call finish_setup on every rank)");
  if (broken_.empty() && poisoned_by() >= 0) broken_ = segment_failure();
  if (!broken_.empty())
    throw std::runtime_error(std::string(what) + ": the shm communicator of group '" + label_ + "' (rank " +
                             std::to_string(rank_) + ") is unusable after an earlier failure: " + broken_ +
                             " (make the group again on every rank)");
}

void ShmCommunicator::bind_thread(uint64_t thread) { owner_thread_.store(thread, std::memory_order_relaxed); }

void ShmCommunicator::allow_helper_thread(uint64_t thread) {
  helper_thread_.store(thread, std::memory_order_relaxed);
}

void ShmCommunicator::set_interrupt_check(InterruptCheck check) {
  interrupt_check_fn().store(check, std::memory_order_relaxed);
}

std::unique_lock<std::mutex> ShmCommunicator::enter(const char* what) {
  const uint64_t me = this_thread();
  const uint64_t owner = owner_thread_.load(std::memory_order_relaxed);
  if (me != owner && me != helper_thread_.load(std::memory_order_relaxed))
    throw std::runtime_error(std::string(what) + ": the shm communicator of group '" + label_ + "' (rank " +
                             std::to_string(rank_) + ") belongs to thread " + std::to_string(owner) + ", but thread " +
                             std::to_string(me) + " called it. The ranks pair collectives by their order, so a group "
                             "is used by one thread: the one that made it, or the one that called "
                             "tp.bind_to_current_thread()");
  std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock()) {
    // Two threads of this rank are in collectives of the group at once; the peers may have paired them the
    // other way round. The call in progress holds the lock (and broken_), so only the segment is marked:
    // that call, and every rank's next, raise.
    const std::string why = "threads " + std::to_string(me) + " and another one called collectives of group '" +
                            label_ + "' at the same time on rank " + std::to_string(rank_);
    publish_poison(why);
    throw std::runtime_error(std::string(what) + ": " + why + "; the ranks pair collectives by their order, so "
                             "this is never safe; the communicator is unusable until the group is made again");
  }
  check_usable(what);
  return lock;
}

template <typename Body>
void ShmCommunicator::run_collective(const char* what, Body&& body) {
  try {
    body();
  } catch (const MismatchedCall&) {
    throw;  // raised alike on every rank at the same seq: still in step
  } catch (const std::exception& e) {
    if (broken_.empty()) poison(std::string(what) + " failed part-way: " + e.what());
    throw;
  } catch (...) {
    if (broken_.empty()) poison(std::string(what) + " failed part-way");
    throw;
  }
  // A peer that failed during this call (after this rank read what it needed) failed the call as a whole.
  if (poisoned_by() >= 0) raise_poisoned(what);
}

void ShmCommunicator::check_interrupt(std::chrono::steady_clock::time_point& last_check, uint64_t seq,
                                      const char* phase) {
  const auto now = std::chrono::steady_clock::now();
  if (now - last_check < std::chrono::milliseconds(kInterruptCheckMs)) return;
  last_check = now;
  const InterruptCheck check = interrupt_check_fn().load(std::memory_order_relaxed);
  if (check == nullptr) return;
  try {
    check();
  } catch (...) {
    poison("interrupted by a signal (e.g. Ctrl-C) while waiting in " + std::string(phase) +
           (seq ? " of collective #" + std::to_string(seq) : std::string()));
    throw;
  }
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
  mine.calls[seq & 1] = CallRecord{seq,
                                   call.total_bytes,
                                   call.hidden,
                                   call.eps,
                                   static_cast<uint32_t>(call.op),
                                   static_cast<uint32_t>(call.algo),
                                   static_cast<uint32_t>(call.dtype),
                                   0};
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
  auto last_interrupt_check = start;
  for (uint32_t polls = 1;; ++polls) {
    while (next < world_size_ && (next == rank_ || flag(next).load(std::memory_order_acquire) >= seq)) ++next;
    if (next >= world_size_) return;
    if (polls % 64 != 0) {  // the clock is read every 64 polls (~20 ns each, vs ~1 ns for a poll)
      TPK_CPU_RELAX();
      continue;
    }
    // a peer that failed will not arrive: raise now, naming it, instead of at the timeout
    if (poisoned_by() >= 0)
      raise_poisoned("collective #" + std::to_string(seq) + " (phase '" + phase + "')");
    const double waited_us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    if (waited_us < kSpinUs) {
      TPK_CPU_RELAX();
      continue;
    }
    check_interrupt(last_interrupt_check, seq, phase);
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
  if (c.hidden) s << ", hidden " << c.hidden << ", eps " << c.eps;
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
    // eps compared as bits: a different eps on one rank would normalize its rows differently
    mismatch |= c.total_bytes != call.total_bytes || c.hidden != call.hidden ||
                std::memcmp(&c.eps, &call.eps, sizeof(double)) != 0 ||
                c.op != static_cast<uint32_t>(call.op) || c.algo != static_cast<uint32_t>(call.algo) ||
                c.dtype != static_cast<uint32_t>(call.dtype);
  }
  if (!mismatch) return;
  // Every rank sees the same records, so every rank raises here at the same seq and the ranks stay in
  // step: the communicator remains usable for the next (matching) call.
  std::string table;
  for (int r = 0; r < world_size_; ++r) table += "\n  " + describe(r, seq);
  throw MismatchedCall("tp_kernels shm communicator of group '" + label_ + "' (rank " + std::to_string(rank_) +
                       "): mismatched collective #" + std::to_string(seq) +
                       ": every rank must make the same call with the same size, dtype (and eps);" + table);
}

// ------------------------------------------------------------------------------------------------------
// collectives
// ------------------------------------------------------------------------------------------------------
at::Tensor ShmCommunicator::all_reduce(const at::Tensor& x, std::optional<at::Tensor> out_arg) {
  auto lock = enter("all_reduce");
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
  const uint64_t total = static_cast<uint64_t>(x.numel() * dtype_size(dtype));
  const Call call{Op::kAllReduce, choose_algo(total), dtype, total, 0, 0.0};
  run_collective("all_reduce", [&] {
    reduce_steps(call, static_cast<const char*>(x.data_ptr()), static_cast<char*>(out.data_ptr()), x.numel(), in_place);
  });
  return out;
}

void ShmCommunicator::reduce_steps(const Call& call, const char* in, char* result, int64_t n, bool in_place) {
  const DType dtype = call.dtype;
  const int64_t elem = dtype_size(dtype);
  const int64_t step_elems = slot_bytes_ / elem;
  // Two-shot parts are whole cache lines, so no two ranks write the same line of a slot.
  const int64_t part_align = 64 / elem;
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
  auto lock = enter("allreduce_residual_rmsnorm");
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
  at::Tensor normed = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor new_residual = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n_rows = hidden == 0 ? 0 : x.numel() / hidden;
  const uint64_t total = static_cast<uint64_t>(x.numel() * elem);
  const Call call{Op::kResidualRmsNorm, choose_algo(total), dtype, total, static_cast<uint64_t>(hidden), eps};
  const char* res = static_cast<const char*>(residual.data_ptr());
  char* normed_out = static_cast<char*>(normed.data_ptr());
  char* residual_out = static_cast<char*>(new_residual.data_ptr());
  const float epsf = static_cast<float>(eps);
  if (row_bytes > slot_bytes_) {
    // A row wider than a slot cannot be normalized from one step's slots: sum in slot-sized steps as
    // all_reduce does (under this call's own description, so a peer making another call, or using another
    // eps, still raises), then add and normalize the reduced rows here.
    at::Tensor reduced = at::empty_like(x, at::MemoryFormat::Contiguous);
    run_collective("allreduce_residual_rmsnorm", [&] {
      reduce_steps(call, static_cast<const char*>(x.data_ptr()), static_cast<char*>(reduced.data_ptr()), x.numel(),
                   false);
    });
    const void* sum = reduced.data_ptr();
    reduce_residual_rmsnorm(dtype, &sum, 1, n_rows, hidden, res, weight.data_ptr(), epsf, normed_out,
                            residual_out, nullptr);
    return {normed, new_residual};
  }
  const int64_t rows_per_step = hidden == 0 ? 1 : slot_bytes_ / row_bytes;
  const char* in = static_cast<const char*>(x.data_ptr());
  const void* srcs[kMaxRanks];
  auto epilogue = [&](const void* const* sources, int n_sources, int64_t row0, int64_t rows, void* x_out) {
    const int64_t at = row0 * row_bytes;
    reduce_residual_rmsnorm(dtype, sources, n_sources, rows, hidden, res + at, weight.data_ptr(), epsf,
                            normed_out + at, residual_out + at, x_out);
  };
  run_collective("allreduce_residual_rmsnorm", [&] {
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
  });
  return {normed, new_residual};
}

}  // namespace shm
}  // namespace tp_kernels
