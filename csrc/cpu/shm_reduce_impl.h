// The body of the reduction kernels, included twice by shm_reduce.cpp: once compiled for AVX2 + F16C and
// once for the baseline target, each inside its own namespace (TPK_REDUCE_NS). Written as plain loops over
// short fp32 blocks, which GCC vectorizes for either target; only fp16 conversion needs intrinsics (the
// baseline x86-64-v2 target has no F16C). No FMA is enabled in either variant: a fused multiply-add
// would round differently from the separate multiply and add the reference does.
//
// Expects: TPK_REDUCE_NS (namespace name), TPK_REDUCE_F16C (0/1), and <cstring>, <cmath>, <cstdint>,
// <immintrin.h> (when TPK_REDUCE_F16C), c10/util/Half.h included before.

namespace TPK_REDUCE_NS {

// 512 fp32 = 2 KB per block buffer: two of them stay in L1 (32 KB) next to the streamed inputs.
constexpr int64_t kBlock = 512;
// Partial sums of squares in 8 lanes (one AVX2 register), combined in a fixed order at the end.
constexpr int kLanes = 8;

inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  // NaN stays a (quiet) NaN; a select, not a branch, so that the loops over it vectorize
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// load: dst[i] = float(src[i]); accumulate: dst[i] += float(src[i]); add: dst[i] = float(a[i]) + float(b[i])
// (load then accumulate in one pass); store: dst[i] = T(src[i]) (nearest even); store2: the same into two
// outputs in one pass; add_store2: dst[i] = dst2[i] = T(float(a[i]) + float(b[i])), no block buffer;
// round: x[i] = float(T(x[i])), the value a T tensor would hold. Passes and stores matter here: this
// host's cores retire one 128-bit store per cycle, and a 2-rank fp32 reduce of in-cache data ran 2.4x
// slower than a plain a + b loop with separate load / accumulate / store / store passes, 1.55x with one
// add pass and one store2 pass (the block buffer's extra stores).
template <DType D>
struct Convert;

template <>
struct Convert<DType::kFloat32> {
  static void load(const void* src, float* __restrict dst, int64_t n) { std::memcpy(dst, src, n * 4); }
  static void accumulate(const void* src, float* __restrict dst, int64_t n) {
    const float* __restrict s = static_cast<const float*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] += s[i];
  }
  static void add(const void* a, const void* b, float* __restrict dst, int64_t n) {
    const float* __restrict x = static_cast<const float*>(a);
    const float* __restrict y = static_cast<const float*>(b);
    for (int64_t i = 0; i < n; ++i) dst[i] = x[i] + y[i];
  }
  static void store(const float* __restrict src, void* dst, int64_t n) { std::memcpy(dst, src, n * 4); }
  static void store2(const float* __restrict src, void* dst, void* dst2, int64_t n) {
    float* __restrict d = static_cast<float*>(dst);
    float* __restrict d2 = static_cast<float*>(dst2);
    for (int64_t i = 0; i < n; ++i) d[i] = d2[i] = src[i];
  }
  static void add_store2(const void* a, const void* b, void* dst, void* dst2, int64_t n) {
    // no __restrict: dst2 may be a (an in-place all-reduce); GCC checks for overlap at run time
    const float* x = static_cast<const float*>(a);
    const float* y = static_cast<const float*>(b);
    float* d = static_cast<float*>(dst);
    float* d2 = static_cast<float*>(dst2);
    for (int64_t i = 0; i < n; ++i) d[i] = d2[i] = x[i] + y[i];
  }
  static void round(float* __restrict, int64_t) {}
};

template <>
struct Convert<DType::kBFloat16> {
  static void load(const void* src, float* __restrict dst, int64_t n) {
    const uint16_t* __restrict s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]);
  }
  static void accumulate(const void* src, float* __restrict dst, int64_t n) {
    const uint16_t* __restrict s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] += bf16_bits_to_float(s[i]);
  }
  static void add(const void* a, const void* b, float* __restrict dst, int64_t n) {
    const uint16_t* __restrict x = static_cast<const uint16_t*>(a);
    const uint16_t* __restrict y = static_cast<const uint16_t*>(b);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(x[i]) + bf16_bits_to_float(y[i]);
  }
  static void store(const float* __restrict src, void* dst, int64_t n) {
    uint16_t* __restrict d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(src[i]);
  }
  static void store2(const float* __restrict src, void* dst, void* dst2, int64_t n) {
    uint16_t* __restrict d = static_cast<uint16_t*>(dst);
    uint16_t* __restrict d2 = static_cast<uint16_t*>(dst2);
    for (int64_t i = 0; i < n; ++i) d[i] = d2[i] = float_to_bf16_bits(src[i]);
  }
  static void add_store2(const void* a, const void* b, void* dst, void* dst2, int64_t n) {
    const uint16_t* x = static_cast<const uint16_t*>(a);  // no __restrict: see the float32 one
    const uint16_t* y = static_cast<const uint16_t*>(b);
    uint16_t* d = static_cast<uint16_t*>(dst);
    uint16_t* d2 = static_cast<uint16_t*>(dst2);
    for (int64_t i = 0; i < n; ++i) d[i] = d2[i] = float_to_bf16_bits(bf16_bits_to_float(x[i]) + bf16_bits_to_float(y[i]));
  }
  static void round(float* __restrict x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = bf16_bits_to_float(float_to_bf16_bits(x[i]));
  }
};

#if TPK_REDUCE_F16C
template <>
struct Convert<DType::kFloat16> {
  static void load(const void* src, float* __restrict dst, int64_t n) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
  }
  static void accumulate(const void* src, float* __restrict dst, int64_t n) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
      _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), v));
    }
    for (; i < n; ++i) dst[i] += _cvtsh_ss(s[i]);
  }
  static void add(const void* a, const void* b, float* __restrict dst, int64_t n) {
    const uint16_t* x = static_cast<const uint16_t*>(a);
    const uint16_t* y = static_cast<const uint16_t*>(b);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))),
                                              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i)))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(x[i]) + _cvtsh_ss(y[i]);
  }
  static void store(const float* __restrict src, void* dst, int64_t n) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; ++i) d[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store2(const float* __restrict src, void* dst, void* dst2, int64_t n) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    uint16_t* d2 = static_cast<uint16_t*>(dst2);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d2 + i), h);
    }
    for (; i < n; ++i) d[i] = d2[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void add_store2(const void* a, const void* b, void* dst, void* dst2, int64_t n) {
    const uint16_t* x = static_cast<const uint16_t*>(a);
    const uint16_t* y = static_cast<const uint16_t*>(b);
    uint16_t* d = static_cast<uint16_t*>(dst);
    uint16_t* d2 = static_cast<uint16_t*>(dst2);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 sum = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))),
                                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i))));
      const __m128i h = _mm256_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d2 + i), h);
    }
    for (; i < n; ++i) d[i] = d2[i] = _cvtss_sh(_cvtsh_ss(x[i]) + _cvtsh_ss(y[i]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void round(float* __restrict x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    for (; i < n; ++i) x[i] = _cvtsh_ss(_cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
#else
template <>
struct Convert<DType::kFloat16> {
  static void load(const void* src, float* __restrict dst, int64_t n) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(c10::Half(s[i], c10::Half::from_bits()));
  }
  static void accumulate(const void* src, float* __restrict dst, int64_t n) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<float>(c10::Half(s[i], c10::Half::from_bits()));
  }
  static void add(const void* a, const void* b, float* __restrict dst, int64_t n) {
    load(a, dst, n);
    accumulate(b, dst, n);
  }
  static void store(const float* __restrict src, void* dst, int64_t n) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(src[i]).x;
  }
  static void store2(const float* __restrict src, void* dst, void* dst2, int64_t n) {
    store(src, dst, n);
    std::memcpy(dst2, dst, n * 2);
  }
  static void add_store2(const void* a, const void* b, void* dst, void* dst2, int64_t n) {
    alignas(64) float sum[kBlock];
    for (int64_t start = 0; start < n; start += kBlock) {
      const int64_t len = n - start < kBlock ? n - start : kBlock;
      add(static_cast<const uint16_t*>(a) + start, static_cast<const uint16_t*>(b) + start, sum, len);
      store2(sum, static_cast<uint16_t*>(dst) + start, static_cast<uint16_t*>(dst2) + start, len);
    }
  }
  static void round(float* __restrict x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(c10::Half(x[i]));
  }
};
#endif

// acc[0, n) = sum over sources of element offset + [0, n), in source order.
template <DType D>
inline void sum_block(const void* const* srcs, int n_srcs, int64_t offset, int64_t n, float* __restrict acc) {
  const int64_t elem = dtype_size(D);
  auto src = [&](int r) { return static_cast<const char*>(srcs[r]) + offset * elem; };
  if (n_srcs == 1) {
    Convert<D>::load(src(0), acc, n);
    return;
  }
  Convert<D>::add(src(0), src(1), acc, n);  // (s0 + s1) + s2 + ...: the same order as load + accumulate
  for (int r = 2; r < n_srcs; ++r) Convert<D>::accumulate(src(r), acc, n);
}

template <DType D>
void reduce_sum_t(const void* const* srcs, int n_srcs, int64_t n, void* out, void* out2) {
  alignas(64) float acc[kBlock];
  const int64_t elem = dtype_size(D);
  if (n_srcs == 2 && out2 != nullptr) {  // two ranks, two-shot: the common case, without the block buffer
    Convert<D>::add_store2(srcs[0], srcs[1], out, out2, n);
    return;
  }
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = n - start < kBlock ? n - start : kBlock;
    sum_block<D>(srcs, n_srcs, start, len, acc);
    if (out2 != nullptr) {
      Convert<D>::store2(acc, static_cast<char*>(out) + start * elem, static_cast<char*>(out2) + start * elem, len);
    } else {
      Convert<D>::store(acc, static_cast<char*>(out) + start * elem, len);
    }
  }
}

template <DType D>
void reduce_residual_rmsnorm_t(const void* const* srcs, int n_srcs, int64_t n_rows, int64_t hidden,
                               const void* residual, const void* weight, float eps, void* normed,
                               void* new_residual, void* x_out) {
  alignas(64) float acc[kBlock];
  alignas(64) float other[kBlock];
  const int64_t elem = dtype_size(D);
  const void* row_srcs[64];
  for (int64_t row = 0; row < n_rows; ++row) {
    const int64_t row_offset = row * hidden;
    for (int r = 0; r < n_srcs; ++r) row_srcs[r] = static_cast<const char*>(srcs[r]) + row_offset * elem;
    char* new_residual_row = static_cast<char*>(new_residual) + row_offset * elem;
    float lanes[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    // pass 1: x = T(sum), new_residual = T(x + residual), sum of squares of new_residual
    for (int64_t start = 0; start < hidden; start += kBlock) {
      const int64_t len = hidden - start < kBlock ? hidden - start : kBlock;
      sum_block<D>(row_srcs, n_srcs, start, len, acc);
      if (x_out != nullptr) Convert<D>::store(acc, static_cast<char*>(x_out) + (row_offset + start) * elem, len);
      // x is a T tensor once reduced: round before the residual add, as all_reduce then add_rmsnorm would
      Convert<D>::round(acc, len);
      Convert<D>::load(static_cast<const char*>(residual) + (row_offset + start) * elem, other, len);
      for (int64_t i = 0; i < len; ++i) acc[i] += other[i];
      Convert<D>::round(acc, len);  // the norm is taken of the residual stream as stored (T)
      Convert<D>::store(acc, new_residual_row + start * elem, len);
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes)
        for (int l = 0; l < kLanes; ++l) lanes[l] += acc[i + l] * acc[i + l];
      for (; i < len; ++i) lanes[i % kLanes] += acc[i] * acc[i];
    }
    const float sum_sq = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
    // pass 2: normed = T(new_residual * inv_rms * weight); the row was just written, so it is read from L1/L2
    for (int64_t start = 0; start < hidden; start += kBlock) {
      const int64_t len = hidden - start < kBlock ? hidden - start : kBlock;
      Convert<D>::load(new_residual_row + start * elem, acc, len);
      Convert<D>::load(static_cast<const char*>(weight) + start * elem, other, len);
      for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] * inv_rms * other[i];
      Convert<D>::store(acc, static_cast<char*>(normed) + (row_offset + start) * elem, len);
    }
  }
}

struct Kernels {
  static void reduce_sum(DType dtype, const void* const* srcs, int n_srcs, int64_t n, void* out, void* out2) {
    switch (dtype) {
      case DType::kFloat32: return reduce_sum_t<DType::kFloat32>(srcs, n_srcs, n, out, out2);
      case DType::kFloat16: return reduce_sum_t<DType::kFloat16>(srcs, n_srcs, n, out, out2);
      case DType::kBFloat16: return reduce_sum_t<DType::kBFloat16>(srcs, n_srcs, n, out, out2);
    }
  }
  static void reduce_residual_rmsnorm(DType dtype, const void* const* srcs, int n_srcs, int64_t n_rows,
                                      int64_t hidden, const void* residual, const void* weight, float eps,
                                      void* normed, void* new_residual, void* x_out) {
    switch (dtype) {
      case DType::kFloat32:
        return reduce_residual_rmsnorm_t<DType::kFloat32>(srcs, n_srcs, n_rows, hidden, residual, weight, eps,
                                                          normed, new_residual, x_out);
      case DType::kFloat16:
        return reduce_residual_rmsnorm_t<DType::kFloat16>(srcs, n_srcs, n_rows, hidden, residual, weight, eps,
                                                          normed, new_residual, x_out);
      case DType::kBFloat16:
        return reduce_residual_rmsnorm_t<DType::kBFloat16>(srcs, n_srcs, n_rows, hidden, residual, weight, eps,
                                                           normed, new_residual, x_out);
    }
  }
};

}  // namespace TPK_REDUCE_NS
