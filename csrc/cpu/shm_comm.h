// A shared-memory all-reduce for the ranks of one group on one host.
//
// Segment: one per group, made by tp_kernels/comm/segment.py (an unnamed memfd of mode 0600, sealed against
// resizing, whose random secret every rank checked before mapping it; nothing in /dev/shm, so no name can
// be planted and no crash leaves anything behind) and handed here as a descriptor (map_fd). Every rank
// checks the descriptor (regular file, this uid, mode 0600, sealed) and that its size is exactly the layout
// its own arguments give, before mapping; the header rank 0 writes is then checked field by field against
// the mapping (finish_setup) before any slot is touched.
// Layout: a header, one control block per rank, then per rank two data slots (parities 0 and 1).
//
// Protocol: collective number `seq` (1, 2, ... per communicator; a message larger than a slot is several
// steps, each with its own seq) uses slot parity seq % 2. A rank copies its input into its slot, writes the
// call's description (seq, byte count, dtype, op, eps) next to it and release-stores `arrived = seq`; the
// others acquire-load `arrived` before reading the slot. Reusing a parity at seq + 2 is safe without a second
// barrier: a rank only arrives at seq + 1 after it finished reading everything of seq.
//   one-shot (small): every rank sums all slots itself, in rank order.
//   two-shot (large): a rank publishes only the parts the others reduce; rank r sums its own part (its
//     input's, then the peers' slots, in rank order), writes it into its own slot and release-stores
//     `reduced = seq`; then every rank copies the other parts from their owners' slots.
// Both give every rank the same bits (same code, same order; two-shot copies one rank's result).
//
// Failures. A mismatched call raises on every rank at the same seq and leaves the ranks in step. Anything
// else that ends a collective part-way on one rank (a wait that times out naming the ranks that did not
// arrive, an interrupt, use from a second thread) poisons the segment: the failing rank records itself and
// why in the header, and every rank's next call, and every wait in progress, raises naming it. A poisoned
// communicator stays unusable until the group is made again.
// Threads: the ranks pair calls by their order, so a communicator serves one thread (the one that made it,
// or the one bind_thread names) and at most one helper thread (allow_helper_thread: the group's overlap
// thread), never two at once; a call from any other thread raises before it touches the segment.
// Waits call the interrupt check (set_interrupt_check: the Python bindings raise KeyboardInterrupt there)
// at least every kInterruptCheckMs of waiting.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/shm_reduce.h"
#include "cpu/shm_store_policy.h"

namespace tp_kernels {
namespace shm {

struct SegmentHeader;
struct RankControl;

class ShmCommunicator {
 public:
  // Bytes of the segment's payload for world_size ranks with slots of slot_bytes (a positive multiple of
  // 4096): what the caller allocates.
  static int64_t segment_bytes(int world_size, int64_t slot_bytes);
  // Map `segment_bytes(world_size, slot_bytes)` bytes of the shared descriptor fd from offset (a multiple
  // of the page size) after checking the descriptor and its size; rank 0 writes the header. The caller
  // keeps fd and closes it when it likes (the mapping does not need it).
  static std::shared_ptr<ShmCommunicator> map_fd(int fd, int64_t offset, int rank, int world_size,
                                                 int64_t slot_bytes, double timeout_s, std::string label);
  ~ShmCommunicator();

  // Second half of setup, on every rank: rank 0 waits until all ranks mapped the segment, then marks it
  // ready; the others wait for that and check rank 0's header against their mapping. Raises naming the
  // ranks that did not map it in time, or the header field that disagrees.
  void finish_setup();
  // Sum of x over the ranks, written to out (allocated when not given) and returned.
  at::Tensor all_reduce(const at::Tensor& x, std::optional<at::Tensor> out);
  std::tuple<at::Tensor, at::Tensor> allreduce_residual_rmsnorm(const at::Tensor& x, const at::Tensor& residual,
                                                                const at::Tensor& weight, double eps);
  void close();

  // A random number rank 0 drew for this segment: equal on the ranks that share it (after finish_setup).
  uint64_t segment_id() const { return segment_id_; }
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  double timeout_s() const { return timeout_s_; }
  void set_timeout_s(double timeout_s);
  // Messages of at most this many bytes use one-shot, larger ones two-shot. Must be equal on all ranks
  // (it is part of every call's description, so a difference raises instead of corrupting).
  int64_t one_shot_max_bytes() const { return one_shot_max_bytes_; }
  void set_one_shot_max_bytes(int64_t bytes);
  // Two-shot all-reduces of at least this many bytes write their output with non-temporal stores (a
  // local choice: the ranks need not agree). Default: where the group's inputs and outputs together
  // (2 x world_size x bytes) exceed the L3 cache, the size from which they stream from memory anyway.
  int64_t stream_min_bytes() const { return stream_min_bytes_; }
  void set_stream_min_bytes(int64_t bytes);
  // How two-shot all-reduces write what they publish into the slot: "auto" (learned on rank 0, see
  // shm_store_policy.h), "ordinary" or "non-temporal" (this rank only; no agreement needed).
  std::string store_mode() const;
  void set_store_mode(const std::string& mode);
  // Rank 0's running means of time per byte, (ordinary, non-temporal), in seconds, for calls of `bytes`.
  std::tuple<double, double> store_estimates(uint64_t bytes) const {
    return {store_policy_.per_byte(bytes, false), store_policy_.per_byte(bytes, true)};
  }
  bool closed() const { return base_ == nullptr; }
  uint64_t sequence() const { return seq_; }
  // The rank whose failure poisoned the segment (this one or a peer), -1 while it is healthy.
  int poisoned_by() const;

  // Threads (pthread_self() values; Python's threading.get_ident()). The owner starts as the thread that
  // called map_fd.
  void bind_thread(uint64_t thread);
  void allow_helper_thread(uint64_t thread);
  uint64_t owner_thread() const { return owner_thread_.load(std::memory_order_relaxed); }

  // Called while waiting, from the waiting thread; may throw (the wait then ends, and the communicator is
  // poisoned: the ranks are out of step). One for the whole process.
  using InterruptCheck = void (*)();
  static void set_interrupt_check(InterruptCheck check);

  static constexpr int kMaxRanks = 64;

 private:
  ShmCommunicator(int rank, int world_size, int64_t slot_bytes, double timeout_s, std::string label);

  enum class Op : uint32_t { kAllReduce = 1, kResidualRmsNorm = 2 };
  enum class Algo : uint32_t { kOneShot = 1, kTwoShot = 2 };
  struct Call {
    Op op;
    Algo algo;
    DType dtype;
    uint64_t total_bytes;
    uint64_t hidden;  // residual_rmsnorm's row length, 0 for all_reduce
    double eps;       // residual_rmsnorm's eps, 0 for all_reduce
  };

  // The start of every collective: the calling thread may use it, no other thread is in a collective of
  // it (else: poisoned), it is usable. Returns the held lock.
  std::unique_lock<std::mutex> enter(const char* what);
  void check_usable(const char* what);
  void check_header();
  // The steps of a sum of n elements of x into out; call describes the whole message.
  void reduce_steps(const Call& call, const char* in, char* result, int64_t n, bool in_place);
  // Runs body (steps that publish into the segment); an exception other than a mismatch leaves this rank
  // out of step with the others, so it poisons the segment on the way out. Then raises if a peer poisoned
  // it meanwhile (its result cannot be trusted: a peer's call failed).
  template <typename Body>
  void run_collective(const char* what, Body&& body);
  // Record this rank's failure locally (broken_) and in the segment for the peers (publish_poison: the
  // first failure of any rank wins).
  void poison(const std::string& why);
  void publish_poison(const std::string& why);
  std::string segment_failure() const;  // "rank R: why" of the recorded failure, "" if none
  [[noreturn]] void raise_poisoned(const std::string& what);
  // Calls the interrupt check when kInterruptCheckMs passed since last_check; poisons if it throws.
  void check_interrupt(std::chrono::steady_clock::time_point& last_check, uint64_t seq, const char* phase);
  Algo choose_algo(uint64_t total_bytes) const;
  // One step: this rank's input of the step is [src, src + bytes); the step's slot parity is seq_ % 2.
  // Publishes all of it but bytes [own_lo, own_hi) (the part this rank reduces itself in two-shot, read
  // from src directly: copying it would only add traffic), waits for every rank and checks that all
  // describe the same call.
  void arrive(const Call& call, const void* src, uint64_t bytes, uint64_t own_lo, uint64_t own_hi, bool non_temporal);
  // reduce_sum of n elements into both destinations, with non-temporal stores
  void reduce_streaming_both(DType dtype, const void* const* srcs, int64_t n, char* slot_part, char* result_part);
  void wait_for(bool reduced_flag, const char* phase);
  void check_calls_match(const Call& call);
  [[noreturn]] void fail(const std::string& message);
  char* slot(int rank, uint64_t seq) const;
  std::string describe(int rank, uint64_t seq) const;

  std::string label_;
  int rank_;
  int world_size_;
  int64_t slot_bytes_;
  double timeout_s_;
  int64_t one_shot_max_bytes_;
  int64_t stream_min_bytes_;
  StorePolicy::Mode store_mode_ = StorePolicy::Mode::kAuto;
  StorePolicy store_policy_;  // rank 0's
  size_t mapped_bytes_ = 0;
  char* base_ = nullptr;
  SegmentHeader* header_ = nullptr;
  RankControl* control_ = nullptr;
  char* data_ = nullptr;
  uint64_t seq_ = 0;
  uint64_t segment_id_ = 0;
  bool setup_done_ = false;
  std::string broken_;  // why the communicator cannot be used any more ("" while it can); under mutex_
  std::mutex mutex_;    // one collective at a time per communicator (a second thread raises, see enter)
  std::atomic<uint64_t> owner_thread_{0};
  std::atomic<uint64_t> helper_thread_{0};
};

}  // namespace shm
}  // namespace tp_kernels
