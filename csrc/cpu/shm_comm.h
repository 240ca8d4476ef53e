// A shared-memory all-reduce for the ranks of one group on one host.
//
// Segment: one per group, created by rank 0 under a random name (mode 0600), mapped by every rank and
// unlinked by rank 0 as soon as all have mapped it, so nothing stays in /dev/shm after any kind of exit.
// Layout: a header, one control block per rank, then per rank two data slots (parities 0 and 1).
//
// Protocol: collective number `seq` (1, 2, ... per communicator; a message larger than a slot is several
// steps, each with its own seq) uses slot parity seq % 2. A rank copies its input into its slot, writes the
// call's description (seq, byte count, dtype, op) next to it and release-stores `arrived = seq`; the others
// acquire-load `arrived` before reading the slot. Reusing a parity at seq + 2 is safe without a second
// barrier: a rank only arrives at seq + 1 after it finished reading everything of seq.
//   one-shot (small): every rank sums all slots itself, in rank order.
//   two-shot (large): a rank publishes only the parts the others reduce; rank r sums its own part (its
//     input's, then the peers' slots, in rank order), writes it into its own slot and release-stores
//     `reduced = seq`; then every rank copies the other parts from their owners' slots.
// Both give every rank the same bits (same code, same order; two-shot copies one rank's result).
// Every wait times out naming the ranks that did not arrive; a mismatched call raises on every rank.
#pragma once

#include <ATen/ATen.h>

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
  // Rank 0: create a segment with a fresh random name (see name()) for world_size ranks.
  static std::shared_ptr<ShmCommunicator> create(int world_size, int64_t slot_bytes, double timeout_s,
                                                 std::string label);
  // Ranks 1..world_size-1: map the segment rank 0 created.
  static std::shared_ptr<ShmCommunicator> attach(const std::string& name, int rank, int world_size,
                                                 double timeout_s, std::string label);
  ~ShmCommunicator();

  // Second half of setup, on every rank: rank 0 waits until all ranks mapped the segment, then unlinks
  // it; the others wait until rank 0 did. Raises naming the ranks that did not map it in time (and rank 0
  // unlinks the segment then too).
  void finish_setup();

  // Sum of x over the ranks, written to out (allocated when not given) and returned.
  at::Tensor all_reduce(const at::Tensor& x, std::optional<at::Tensor> out);
  std::tuple<at::Tensor, at::Tensor> allreduce_residual_rmsnorm(const at::Tensor& x, const at::Tensor& residual,
                                                                const at::Tensor& weight, double eps);
  void close();

  const std::string& name() const { return name_; }
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

  static constexpr int kMaxRanks = 64;

 private:
  ShmCommunicator(std::string name, int rank, int world_size, int64_t slot_bytes, double timeout_s,
                  std::string label);
  void map_segment(int fd, size_t bytes);

  enum class Op : uint32_t { kAllReduce = 1, kResidualRmsNorm = 2 };
  enum class Algo : uint32_t { kOneShot = 1, kTwoShot = 2 };
  struct Call {
    Op op;
    Algo algo;
    DType dtype;
    uint64_t total_bytes;
    uint64_t hidden;  // residual_rmsnorm's row length, 0 for all_reduce
  };

  void check_usable(const char* what) const;
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

  std::string name_;
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
  bool setup_done_ = false;
  std::string broken_;  // why the communicator cannot be used any more ("" while it can)
  std::mutex mutex_;    // one collective at a time per communicator
};

}  // namespace shm
}  // namespace tp_kernels
