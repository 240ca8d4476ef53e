// Two compiled variants of the reduction kernels (AVX2 + F16C, and the baseline x86-64-v2 target the
// extension is built for), the faster chosen once at load from what the CPU supports. Both are the same
// source (shm_reduce_impl.h); every rank of a host picks the same one, so ranks agree bit for bit.
#include "cpu/shm_reduce.h"

#include <c10/util/Half.h>

#include <algorithm>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TPK_HAVE_AVX2_VARIANT 1
#else
#define TPK_HAVE_AVX2_VARIANT 0
#endif

namespace tp_kernels {
namespace shm {

int64_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

#if TPK_HAVE_AVX2_VARIANT
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define TPK_REDUCE_NS avx2
#define TPK_REDUCE_F16C 1
#include "cpu/shm_reduce_impl.h"
#undef TPK_REDUCE_NS
#undef TPK_REDUCE_F16C
#pragma GCC pop_options
#endif

#define TPK_REDUCE_NS baseline
#define TPK_REDUCE_F16C 0
#include "cpu/shm_reduce_impl.h"
#undef TPK_REDUCE_NS
#undef TPK_REDUCE_F16C

namespace {

struct Variant {
  decltype(&baseline::Kernels::reduce_sum) reduce_sum;
  decltype(&baseline::Kernels::reduce_residual_rmsnorm) reduce_residual_rmsnorm;
  const char* name;
};

Variant pick_variant() {
#if TPK_HAVE_AVX2_VARIANT
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
    return {&avx2::Kernels::reduce_sum, &avx2::Kernels::reduce_residual_rmsnorm, "avx2+f16c"};
  }
#endif
  return {&baseline::Kernels::reduce_sum, &baseline::Kernels::reduce_residual_rmsnorm, "baseline"};
}

const Variant& variant() {
  static const Variant chosen = pick_variant();
  return chosen;
}

}  // namespace

void reduce_sum(DType dtype, const void* const* srcs, int n_srcs, int64_t n, void* out, void* out2) {
  variant().reduce_sum(dtype, srcs, n_srcs, n, out, out2);
}

void reduce_residual_rmsnorm(DType dtype, const void* const* srcs, int n_srcs, int64_t n_rows, int64_t hidden,
                             const void* residual, const void* weight, float eps, void* normed,
                             void* new_residual, void* x_out) {
  variant().reduce_residual_rmsnorm(dtype, srcs, n_srcs, n_rows, hidden, residual, weight, eps, normed,
                                    new_residual, x_out);
}

const char* reduce_isa() { return variant().name; }

void copy_streaming(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#if defined(__x86_64__) && defined(__GNUC__)
  const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
    for (int k = 0; k < 64; k += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
  }
#endif
  std::memcpy(d, s, bytes);
}

void streaming_fence() {
#if defined(__x86_64__) && defined(__GNUC__)
  _mm_sfence();
#endif
}

}  // namespace shm
}  // namespace tp_kernels
