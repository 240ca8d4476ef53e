// Whether a rank writes the data it publishes in its slot (the parts the peers reduce, its reduced part)
// with ordinary stores or with non-temporal ones, learned from measured calls.
//
// Why learned: which is faster depends on where the host put the cores, and a VM's host may move them
// while a job runs. On the 2-core CI VM the cross-core round trip flips between ~0.2 us and ~0.6-1 us
// from minute to minute; in the far placement, writing lines the peer has just read runs at ~4 GB/s
// (each store waits for the peer's copy to be invalidated) and non-temporal publishing measured 2.4x
// faster at 1 MiB (385 -> 162 us); in the near placement the peer reads the data from its neighbour's
// cache at ~26 GB/s and non-temporal publishing, which sends it through memory, is 1.9x slower
// (102 -> 190 us). So rank 0 times its two-shot calls, keeps per message size class (powers of two from
// 64 KiB) a running mean of time per byte for either kind, uses the faster and tries the other on every
// kExplorePeriod-th call of the class, and publishes its choices in the segment; the others follow them
// from their next call. A rank that runs a call with a stale choice only costs time: the choice changes
// no result bit and needs no agreement. The whole call is timed, waits included: time spent working
// alone (less the waits) misjudged 16 MiB calls, where non-temporal publishing shortens a rank's own
// work but lengthens its peer's (reading from memory), and the waits carry that.
#pragma once

#include <cstdint>

namespace tp_kernels {
namespace shm {

class StorePolicy {
 public:
  enum class Mode : uint32_t { kAuto = 0, kOrdinary = 1, kNonTemporal = 2 };

  // Calls smaller than this are not timed (a few microseconds are mostly fixed costs) and publish with
  // ordinary stores.
  static constexpr uint64_t kMinTimedBytes = 64 * 1024;
  static constexpr uint32_t kExplorePeriod = 32;
  static constexpr int kClasses = 12;  // 64 KiB, 128 KiB, ..., 64 MiB and larger

  static int size_class(uint64_t bytes) {
    int c = 0;
    for (uint64_t b = kMinTimedBytes * 2; b <= bytes && c < kClasses - 1; b *= 2) ++c;
    return c;
  }

  // Rank 0: record the duration of a call of `bytes` (>= kMinTimedBytes) made with the given kind of
  // stores; returns the choices for the next calls, bit c set where class c should use non-temporal ones.
  uint32_t record(bool non_temporal, double seconds, uint64_t bytes) {
    const int c = size_class(bytes);
    Class& k = classes_[c];
    Estimate& e = k.estimates[non_temporal];
    const double per_byte = seconds / static_cast<double>(bytes);
    e.per_byte = e.samples == 0 ? per_byte : e.per_byte + kWeight * (per_byte - e.per_byte);
    ++e.samples;
    ++k.calls;
    bool next;
    if (k.estimates[0].samples < kWarmup || k.estimates[1].samples < kWarmup) {
      next = k.estimates[1].samples < k.estimates[0].samples;  // measure both kinds first
    } else {
      const bool best = k.estimates[1].per_byte < k.estimates[0].per_byte;
      next = k.calls % kExplorePeriod == 0 ? !best : best;
    }
    choices_ = next ? choices_ | (1u << c) : choices_ & ~(1u << c);
    return choices_;
  }

  uint32_t choices() const { return choices_; }

  // The running means in seconds per byte of the class of `bytes` (0 before its first sample).
  double per_byte(uint64_t bytes, bool non_temporal) const {
    return classes_[size_class(bytes)].estimates[non_temporal].per_byte;
  }

 private:
  struct Estimate {
    double per_byte = 0;
    uint32_t samples = 0;
  };
  struct Class {
    Estimate estimates[2];
    uint64_t calls = 0;
  };
  static constexpr double kWeight = 0.25;  // of the newest sample in the running mean
  static constexpr uint32_t kWarmup = 2;
  Class classes_[kClasses];
  uint32_t choices_ = 0;
};

}  // namespace shm
}  // namespace tp_kernels
