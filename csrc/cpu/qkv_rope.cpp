// CPU kernels of tp_kernels::qkv_rope and tp_kernels::qkv_rope_kv_cache: one GEMM for the fused QKV
// projection, then one pass over its output that adds the bias, rotates q and k (RoPE) and writes q, k and v
// (or k and v straight into the caches). Semantics of tp_kernels.reference.qkv_rope / write_kv_cache: the
// projection and the rotation in float32 (float64 for float64 inputs), rounded once to x's dtype; a token at
// position -1 (reference.SKIP_POSITION, a padding token) rotates as position 0 and writes no cache slot.
//
// Why C++: the same steps as torch ops from Python took ~170 us per call at the 156M model's TP=2 decode
// shapes, ~115 us of it beyond the GEMM (58 us), ~0.9 ms per 8-layer decode step that torch.compile cannot
// remove (a custom op is opaque to it). The argument checks repeat tp_kernels/ops/checks.py's
// check_qkv_rope and check_kv_cache word for word (tests/test_qkv_rope_cpu.py compares the messages), so a
// bad call fails alike in eager mode and under the fake implementation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

namespace tp_kernels {
namespace {

constexpr int64_t kSkipPosition = -1;  // reference.SKIP_POSITION

enum class RopeStyle { kNeox, kGptj, kNone };

// -- messages in Python's spelling, so they equal checks.py's -----------------------------------------------
std::string py_tuple(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

void check_dim(const char* name, const at::Tensor& t, int64_t ndim, const char* shape_doc) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must be ", ndim, "-D ", shape_doc, ", got shape ", py_tuple(t.sizes()));
}

// checks.check_dtype with FLOAT_DTYPES
void check_float_dtype(const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, name,
                    " must have dtype in ['torch.float32', 'torch.float16', 'torch.bfloat16', 'torch.float64'], got ",
                    py_dtype(dtype));
}

void check_same(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                    py_dtype(ref.scalar_type()), "), got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
                    "), got ", t.device());
}

RopeStyle parse_rope_style(c10::string_view style) {
  if (style == "neox") return RopeStyle::kNeox;
  if (style == "gptj") return RopeStyle::kGptj;
  if (style == "none") return RopeStyle::kNone;
  TORCH_CHECK_VALUE(false, "rope_style must be one of ('neox', 'gptj', 'none'), got '", std::string(style), "'");
}

// checks.check_qkv_rope
RopeStyle check_qkv_rope_args(const at::Tensor& x, const at::Tensor& w_qkv, const c10::optional<at::Tensor>& b_qkv,
                              const c10::optional<at::Tensor>& cos_sin_cache, const at::Tensor& positions,
                              int64_t n_heads_per_rank, int64_t n_kv_heads_per_rank, int64_t head_dim,
                              c10::string_view rope_style) {
  check_dim("x", x, 2, "(T, hidden)");
  check_float_dtype("x", x);
  check_same("w_qkv", w_qkv, "x", x);
  TORCH_CHECK_VALUE(n_heads_per_rank >= 1 && n_kv_heads_per_rank >= 1 && head_dim >= 1,
                    "n_heads_per_rank, n_kv_heads_per_rank and head_dim must be >= 1, got ", n_heads_per_rank, ", ",
                    n_kv_heads_per_rank, ", ", head_dim);
  TORCH_CHECK_VALUE(n_heads_per_rank % n_kv_heads_per_rank == 0, "n_heads_per_rank (", n_heads_per_rank,
                    ") must be a multiple of n_kv_heads_per_rank (", n_kv_heads_per_rank, ")");
  const int64_t qkv_rows = (n_heads_per_rank + 2 * n_kv_heads_per_rank) * head_dim;
  TORCH_CHECK_VALUE(w_qkv.dim() == 2 && w_qkv.size(0) == qkv_rows && w_qkv.size(1) == x.size(1),
                    "w_qkv must be ((n_heads_per_rank + 2 * n_kv_heads_per_rank) * head_dim, hidden) = (", qkv_rows,
                    ", ", x.size(1), "), got ", py_tuple(w_qkv.sizes()));
  if (b_qkv.has_value()) {
    check_same("b_qkv", *b_qkv, "x", x);
    TORCH_CHECK_VALUE(b_qkv->dim() == 1 && b_qkv->size(0) == qkv_rows, "b_qkv must be (", qkv_rows, ",), got ",
                      py_tuple(b_qkv->sizes()));
  }
  const RopeStyle style = parse_rope_style(rope_style);
  check_dim("positions", positions, 1, "(T,)");
  TORCH_CHECK_VALUE(positions.size(0) == x.size(0), "positions must have one entry per token (", x.size(0),
                    "), got ", positions.size(0));
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
                    "positions must be int32 or int64, got ", py_dtype(positions.scalar_type()));
  if (style != RopeStyle::kNone) {
    TORCH_CHECK_VALUE(cos_sin_cache.has_value(), "cos_sin_cache is required for rope_style='",
                      std::string(rope_style), "'");
    check_dim("cos_sin_cache", *cos_sin_cache, 2, "(max_position, rotary_dim)");
    const int64_t rotary_dim = cos_sin_cache->size(1);
    TORCH_CHECK_VALUE(rotary_dim % 2 == 0 && rotary_dim > 0 && rotary_dim <= head_dim,
                      "cos_sin_cache's rotary_dim must be even and in (0, head_dim=", head_dim, "], got ", rotary_dim);
    TORCH_CHECK_VALUE(cos_sin_cache->device() == x.device(), "cos_sin_cache must be on ", x.device(), ", got ",
                      cos_sin_cache->device());
  }
  if (cos_sin_cache.has_value()) check_float_dtype("cos_sin_cache", *cos_sin_cache);  // ints truncate cos and sin
  return style;
}

// checks.check_kv_cache
void check_kv_cache_args(const at::Tensor& x, const at::Tensor& cache_batch_index, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, int64_t n_kv_heads_per_rank, int64_t head_dim) {
  check_dim("cache_batch_index", cache_batch_index, 1, "(T,)");
  TORCH_CHECK_VALUE(cache_batch_index.size(0) == x.size(0), "cache_batch_index must have one entry per token (",
                    x.size(0), "), got ", cache_batch_index.size(0));
  for (const auto& [name, cache] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache},
                                    std::pair<const char*, const at::Tensor&>{"v_cache", v_cache}}) {
    check_dim(name, cache, 4, "(batch, max_seq, n_kv_heads_per_rank, head_dim)");
    TORCH_CHECK_VALUE(cache.size(2) == n_kv_heads_per_rank && cache.size(3) == head_dim, name, " must be (batch, max_seq, ",
                      n_kv_heads_per_rank, ", ", head_dim, "), got ", py_tuple(cache.sizes()));
    check_same(name, cache, "x", x);
  }
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache ", py_tuple(k_cache.sizes()), " and v_cache ",
                    py_tuple(v_cache.sizes()), " must match");
}

std::vector<int64_t> to_int64(const at::Tensor& index) {
  const at::Tensor longs = index.to(at::kLong).contiguous();
  return std::vector<int64_t>(longs.data_ptr<int64_t>(), longs.data_ptr<int64_t>() + longs.numel());
}

// Indices of the tokens not at the skip position must lie in [0, bound); the message is the reference's
// (cache) or the Triton launcher's (table), which say the same.
void check_index_range(const char* name, const std::vector<int64_t>& index, const std::vector<int64_t>& positions,
                       int64_t bound, const char* bound_name, bool for_cache) {
  int64_t lo = 0, hi = 0;
  bool any = false;
  for (size_t t = 0; t < index.size(); ++t) {
    if (positions[t] == kSkipPosition) continue;
    lo = any ? std::min(lo, index[t]) : index[t];
    hi = any ? std::max(hi, index[t]) : index[t];
    any = true;
  }
  if (!any || (lo >= 0 && hi < bound)) return;
  if (for_cache) {
    TORCH_CHECK_VALUE(false, name, " must be in [0, ", bound, ") for the tokens written to the cache (position ",
                      kSkipPosition, " skips a token), got values in [", lo, ", ", hi, "]");
  }
  TORCH_CHECK_VALUE(false, name, " must be in [0, ", bound_name, "=", bound, ") (or the position ", kSkipPosition,
                    " that marks a padding token), got values in [", lo, ", ", hi, "]");
}

// Where one head's output goes: base pointer and element stride of its features.
template <typename scalar_t>
struct HeadOut {
  scalar_t* data;
  int64_t feature_stride;
};

// One head of one token: bias added, the first rotary_dim features rotated (neox: halves as pairs; gptj:
// adjacent pairs), rounded once to scalar_t. src is the GEMM's row slice in the compute type acc_t.
template <typename scalar_t, typename acc_t>
void finish_head(const acc_t* src, const acc_t* bias, const acc_t* cos_sin, int64_t rotary_dim, RopeStyle style,
                 int64_t head_dim, HeadOut<scalar_t> out) {
  auto value = [&](int64_t i) { return bias ? src[i] + bias[i] : src[i]; };
  auto store = [&](int64_t i, acc_t v) { out.data[i * out.feature_stride] = static_cast<scalar_t>(v); };
  int64_t first_plain = 0;
  if (style != RopeStyle::kNone) {
    const int64_t half = rotary_dim / 2;
    const acc_t* cos = cos_sin;
    const acc_t* sin = cos_sin + half;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t a = style == RopeStyle::kNeox ? i : 2 * i;        // the pair (a, b) rotated by angle i
      const int64_t b = style == RopeStyle::kNeox ? i + half : 2 * i + 1;
      const acc_t xa = value(a), xb = value(b);
      store(a, xa * cos[i] - xb * sin[i]);
      store(b, xb * cos[i] + xa * sin[i]);
    }
    first_plain = rotary_dim;
  }
  for (int64_t i = first_plain; i < head_dim; ++i) store(i, value(i));
}

struct QkvShape {
  int64_t n_heads_per_rank, n_kv_heads_per_rank, head_dim;
  int64_t rows() const { return (n_heads_per_rank + 2 * n_kv_heads_per_rank) * head_dim; }
};

// The whole op: qkv = x @ w_qkv.T in acc_t, then per token and head finish_head into q and into k_dst/v_dst
// (k_dst(t) and v_dst(t) give token t's k and v base pointers with their head and feature strides, or a null
// pointer for a token that writes nothing).
template <typename scalar_t, typename acc_t, typename KvDst>
void qkv_rope_into(const at::Tensor& x, const at::Tensor& w_qkv, const c10::optional<at::Tensor>& b_qkv,
                   const c10::optional<at::Tensor>& cos_sin_cache, const std::vector<int64_t>& positions,
                   RopeStyle style, QkvShape shape, const at::Tensor& q, KvDst kv_dst) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t n_tokens = x.size(0);
  // (T, rows) in acc_t. For fp32/fp64 the GEMM reads x and w_qkv as they are; 16-bit inputs are upcast as the
  // reference does, so the projection is rounded once, after the rotation.
  const at::Tensor qkv = x.scalar_type() == acc_type ? at::mm(x, w_qkv.t())
                                                      : at::mm(x.to(acc_type), w_qkv.to(acc_type).t());
  const at::Tensor bias = b_qkv.has_value() ? b_qkv->to(acc_type).contiguous() : at::Tensor();
  const int64_t rotary_dim = style == RopeStyle::kNone ? 0 : cos_sin_cache->size(1);
  // each token's cos/sin row in acc_t (a padding token's is position 0's): read in place from a table in
  // acc_t, else gathered and converted (T rows, not the whole table)
  std::vector<const acc_t*> angle_rows(style == RopeStyle::kNone ? 0 : n_tokens);
  at::Tensor gathered;
  if (style != RopeStyle::kNone) {
    const at::Tensor& table = *cos_sin_cache;
    std::vector<int64_t> rows(positions);
    for (auto& p : rows) p = p == kSkipPosition ? 0 : p;
    const bool in_place = table.scalar_type() == acc_type && table.stride(1) == 1;
    if (!in_place) {
      gathered = table.index_select(0, at::tensor(rows, at::TensorOptions().dtype(at::kLong))).to(acc_type).contiguous();
    }
    for (int64_t t = 0; t < n_tokens; ++t) {
      angle_rows[t] = in_place ? table.data_ptr<acc_t>() + rows[t] * table.stride(0)
                               : gathered.data_ptr<acc_t>() + t * rotary_dim;
    }
  }
  const acc_t* qkv_data = qkv.data_ptr<acc_t>();
  const int64_t qkv_row_stride = qkv.stride(0);
  const acc_t* bias_data = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  scalar_t* q_data = q.data_ptr<scalar_t>();
  const int64_t head_dim = shape.head_dim, n_q = shape.n_heads_per_rank, n_kv = shape.n_kv_heads_per_rank;
  // Tokens are independent; below ~32K outputs per chunk a thread costs more to start than the work (a decode
  // token of the 156M preset at TP=2 is 768 outputs: one thread).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, shape.rows()));
  at::parallel_for(0, n_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* row = qkv_data + t * qkv_row_stride;
      const acc_t* angle = angle_rows.empty() ? nullptr : angle_rows[t];
      for (int64_t h = 0; h < n_q; ++h) {
        const int64_t col = h * head_dim;
        finish_head<scalar_t, acc_t>(row + col, bias_data ? bias_data + col : nullptr, angle, rotary_dim, style,
                                     head_dim, {q_data + (t * n_q + h) * head_dim, 1});
      }
      const auto dst = kv_dst(t);
      if (dst.k == nullptr) continue;
      for (int64_t h = 0; h < n_kv; ++h) {
        const int64_t k_col = (n_q + h) * head_dim, v_col = (n_q + n_kv + h) * head_dim;
        finish_head<scalar_t, acc_t>(row + k_col, bias_data ? bias_data + k_col : nullptr, angle, rotary_dim, style,
                                     head_dim, {dst.k + h * dst.k_head_stride, dst.k_feature_stride});
        finish_head<scalar_t, acc_t>(row + v_col, bias_data ? bias_data + v_col : nullptr, nullptr, 0,
                                     RopeStyle::kNone, head_dim, {dst.v + h * dst.v_head_stride, dst.v_feature_stride});
      }
    }
  });
}

template <typename scalar_t>
struct KvSlot {
  scalar_t* k;
  int64_t k_head_stride, k_feature_stride;
  scalar_t* v;
  int64_t v_head_stride, v_feature_stride;
};

// Dispatch on x's dtype; acc_t is double for float64, float otherwise.
template <typename Fn>
void dispatch_qkv(at::ScalarType dtype, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "qkv_rope_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fn(scalar_t{}, acc_t{});
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope_cpu(
    const at::Tensor& x, const at::Tensor& w_qkv, const c10::optional<at::Tensor>& b_qkv,
    const c10::optional<at::Tensor>& cos_sin_cache, const at::Tensor& positions, int64_t n_heads_per_rank,
    int64_t n_kv_heads_per_rank, int64_t head_dim, c10::string_view rope_style) {
  const RopeStyle style = check_qkv_rope_args(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank,
                                              n_kv_heads_per_rank, head_dim, rope_style);
  const std::vector<int64_t> pos = to_int64(positions);
  if (style != RopeStyle::kNone) {
    check_index_range("positions", pos, pos, cos_sin_cache->size(0), "cos_sin_cache's max_position", false);
  }
  const int64_t n_tokens = x.size(0);
  at::Tensor q = at::empty({n_tokens, n_heads_per_rank, head_dim}, x.options());
  at::Tensor k = at::empty({n_tokens, n_kv_heads_per_rank, head_dim}, x.options());
  at::Tensor v = at::empty({n_tokens, n_kv_heads_per_rank, head_dim}, x.options());
  const QkvShape shape{n_heads_per_rank, n_kv_heads_per_rank, head_dim};
  dispatch_qkv(x.scalar_type(), [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    scalar_t* k_data = k.data_ptr<scalar_t>();
    scalar_t* v_data = v.data_ptr<scalar_t>();
    const int64_t token_stride = n_kv_heads_per_rank * head_dim;
    qkv_rope_into<scalar_t, acc_t>(x, w_qkv, b_qkv, cos_sin_cache, pos, style, shape, q, [&](int64_t t) {
      return KvSlot<scalar_t>{k_data + t * token_stride, head_dim, 1, v_data + t * token_stride, head_dim, 1};
    });
  });
  return {q, k, v};
}

at::Tensor qkv_rope_kv_cache_cpu(const at::Tensor& x, const at::Tensor& w_qkv, const c10::optional<at::Tensor>& b_qkv,
                                 const c10::optional<at::Tensor>& cos_sin_cache, const at::Tensor& positions,
                                 const at::Tensor& cache_batch_index, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, int64_t n_heads_per_rank, int64_t n_kv_heads_per_rank,
                                 int64_t head_dim, c10::string_view rope_style) {
  // in the fake implementation's order, so a call with several bad arguments names the same one
  const RopeStyle style = check_qkv_rope_args(x, w_qkv, b_qkv, cos_sin_cache, positions, n_heads_per_rank,
                                              n_kv_heads_per_rank, head_dim, rope_style);
  check_kv_cache_args(x, cache_batch_index, k_cache, v_cache, n_kv_heads_per_rank, head_dim);
  TORCH_CHECK_VALUE(cache_batch_index.scalar_type() == at::kInt || cache_batch_index.scalar_type() == at::kLong,
                    "cache_batch_index must be int32 or int64, got ", py_dtype(cache_batch_index.scalar_type()));
  const std::vector<int64_t> pos = to_int64(positions);
  const std::vector<int64_t> batch_index = to_int64(cache_batch_index);
  // every index checked before anything is written: a call that raises leaves the caches as they were
  if (style != RopeStyle::kNone) {
    check_index_range("positions", pos, pos, cos_sin_cache->size(0), "cos_sin_cache's max_position", false);
  }
  check_index_range("cache_batch_index", batch_index, pos, k_cache.size(0), "", true);
  check_index_range("positions", pos, pos, k_cache.size(1), "", true);
  at::Tensor q = at::empty({x.size(0), n_heads_per_rank, head_dim}, x.options());
  const QkvShape shape{n_heads_per_rank, n_kv_heads_per_rank, head_dim};
  dispatch_qkv(x.scalar_type(), [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    scalar_t* k_data = k_cache.data_ptr<scalar_t>();
    scalar_t* v_data = v_cache.data_ptr<scalar_t>();
    const auto ks = k_cache.strides();
    const auto vs = v_cache.strides();
    qkv_rope_into<scalar_t, acc_t>(x, w_qkv, b_qkv, cos_sin_cache, pos, style, shape, q, [&](int64_t t) {
      if (pos[t] == kSkipPosition) return KvSlot<scalar_t>{nullptr, 0, 0, nullptr, 0, 0};
      return KvSlot<scalar_t>{k_data + batch_index[t] * ks[0] + pos[t] * ks[1], ks[2], ks[3],
                              v_data + batch_index[t] * vs[0] + pos[t] * vs[1], vs[2], vs[3]};
    });
  });
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(tp_kernels, CPU, m) {
  m.impl("qkv_rope", &qkv_rope_cpu);
  m.impl("qkv_rope_kv_cache", &qkv_rope_kv_cache_cpu);
}

}  // namespace tp_kernels
