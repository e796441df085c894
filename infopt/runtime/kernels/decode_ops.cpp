// Fused CPU ops for the small steps of the runtime (decode, speculative checks): each replaces the 5-20 aten calls
// its plain-torch form makes, which on a small model cost more than the matrix products (about 1.5-2 ms of Python
// and aten dispatch per forward of the 5M bench model).
//
//   rms_norm(x, w, eps)                       RMSNorm as transformers computes it: fp32 statistics, the normalised
//                                             row rounded to x's dtype, then times the weight in that dtype
//   add_rms_norm(x!, delta, w, eps)           x += delta (in x's dtype), then rms_norm(x)
//   rotary_kv_write(q!, k!, v, cos, sin,      rotate q and k in place (rotate-half convention, sign-folded sin as
//                   key_cache!, value_cache!,  Rotary.tables gives it) and store k and v at their flat cache slots
//                   slots)
//   paged_attention(q, key_cache, value_cache, softmax(q K^T * scale) V for each query token against its own
//                   block_tables, token_seq,   sequence's cached keys 0 .. pos (within the sliding window), read
//                   token_pos, scale, window)  from the blocks in place: no gathered copy of the context
//   silu_mul(gate, up)                        silu(gate) * up
//   decode_step(x!, ...)                      a small step's whole forward from the embedded tokens to the
//                                             logits in one call: the ops above plus the products (see below),
//                                             so a step crosses from Python into C++ once, not some 15 times a layer
//
// Elementwise results are rounded to the activation dtype after each operation exactly where the torch form rounds
// (so fp32 is plain fp32 and bf16 matches torch's bf16 ops); reductions run in fp32 in their own order, so results
// differ from torch's by summation order only. Activations are float32, bfloat16 or float16; every op checks shapes,
// strides and indices before it reads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace infopt {  // qmatmul.cpp
at::Tensor dense_product(const at::Tensor& x, const at::Tensor& weight);
at::Tensor lut4_product(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                        const std::optional<at::Tensor>& zero, const at::Tensor& lut, int64_t group_size,
                        int64_t out_features, const std::optional<at::Tensor>& perm);
at::Tensor int8_product(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const std::optional<at::Tensor>& zero, int64_t group_size, int64_t out_features,
                        const std::optional<at::Tensor>& perm);
at::Tensor lut4_a8_product(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero, int64_t group_size, int64_t out_features,
                           const std::optional<at::Tensor>& perm);
}  // namespace infopt

namespace {

template <typename T>
inline float round_to(float v) {  // v rounded to T (nearest even), back in fp32
  return static_cast<float>(T(v));
}
template <>
inline float round_to<float>(float v) {
  return v;
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // exact: the bits move up 16 places
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// exp of 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial (S. Moshier's Cephes
// library, expf.c: its coefficients and two-part ln2), times 2^n by vscalefps. About 1 ulp on [-87, 88]; lanes
// below -87 (scores far under the row's maximum) come out as 0 or denormals, as they should.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.972084f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// The first n < 16 lanes (the rest 0): a row's tail without a scalar loop.
inline __m512 load_tail(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_tail(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load_tail(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1); }

template <typename F>
void with_dtype(at::ScalarType type, F f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "activations must be float32, bfloat16 or float16");
  }
}

template <typename T>
float dot(const T* a, const T* b, int64_t n) {
  int64_t j = 0;
  float sum = 0.0f;
  if (n >= 16) {
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(load16(a + j), load16(b + j), acc);
    sum = _mm512_reduce_add_ps(acc);
  }
  for (; j < n; ++j) sum += static_cast<float>(a[j]) * static_cast<float>(b[j]);
  return sum;
}

// A 2-D view [rows, n] whose rows are contiguous (stride(1) == 1), as the split outputs of a fused product are.
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1),
              name, " must be a 2-D CPU tensor with contiguous rows");
}

template <typename T>
void normalise_row(const T* x, const T* w, int64_t n, float eps, T* out) {
  const float inv = 1.0f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t j = 0; j < n; ++j) {
    out[j] = T(static_cast<float>(w[j]) * round_to<T>(static_cast<float>(x[j]) * inv));
  }
}

void check_norm_weight(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type() && weight.device().is_cpu(),
              "norm weight must be a contiguous CPU vector of x's width and dtype");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_norm_weight(x, weight);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows, n}, x.options());
  with_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    for (int64_t r = 0; r < rows; ++r) {
      normalise_row(xp + r * x.stride(0), weight.data_ptr<T>(), n, static_cast<float>(eps), out.data_ptr<T>() + r * n);
    }
  });
  return out;
}

at::Tensor add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(delta, "delta");
  check_norm_weight(x, weight);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type(), "delta must match x");
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows, n}, x.options());
  with_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t r = 0; r < rows; ++r) {
      T* xr = x.data_ptr<T>() + r * x.stride(0);
      const T* dr = delta.data_ptr<T>() + r * delta.stride(0);
      for (int64_t j = 0; j < n; ++j) xr[j] = T(static_cast<float>(xr[j]) + static_cast<float>(dr[j]));
      normalise_row(xr, weight.data_ptr<T>(), n, static_cast<float>(eps), out.data_ptr<T>() + r * n);
    }
  });
  return out;
}

// [tokens, heads, head_dim] with each head's vector contiguous; the token stride is free (a view of a fused
// product's output).
void check_heads(const at::Tensor& t, const char* name, int64_t tokens, int64_t head_dim) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 3 && t.size(0) == tokens && t.size(2) == head_dim &&
                  (head_dim <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == head_dim),
              name, " must be a CPU tensor [tokens, heads, head_dim] with contiguous heads");
}

void check_cache(const at::Tensor& cache, const at::Tensor& like, int64_t kv_heads, int64_t head_dim,
                 const char* name) {
  TORCH_CHECK(cache.device().is_cpu() && cache.dim() == 4 && cache.is_contiguous() && cache.size(2) == kv_heads &&
                  cache.size(3) == head_dim && cache.scalar_type() == like.scalar_type(),
              name, " must be a contiguous CPU tensor [blocks, block_size, kv_heads, head_dim] of the activations' dtype");
}

// C is T (per-token tables Rotary.tables cast) or float (the fp32 tables, rounded to T here as .to(dtype) rounds).
template <typename T, typename C>
void rotate(T* x, const C* cos, const C* sin, int64_t half) {
  // out_i = x_i cos_i + x_{i+half} sin_i and out_{i+half} = x_{i+half} cos_{i+half} + x_i sin_{i+half}, sin
  // sign-folded; each product and the sum rounded to T as torch's elementwise ops round them
  for (int64_t i = 0; i < half; ++i) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[i + half]);
    const float c0 = round_to<T>(static_cast<float>(cos[i])), c1 = round_to<T>(static_cast<float>(cos[i + half]));
    const float s0 = round_to<T>(static_cast<float>(sin[i])), s1 = round_to<T>(static_cast<float>(sin[i + half]));
    x[i] = T(round_to<T>(a * c0) + round_to<T>(b * s0));
    x[i + half] = T(round_to<T>(b * c1) + round_to<T>(a * s1));
  }
}

// Rotation and cache write. Table row of token t: t (rows == nullptr; tables [tokens, ..., rotary_dim] of q's
// dtype) or rows[t] (fp32 tables [positions, rotary_dim] covering every row asked for).
void rotary_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
               const at::Tensor& sin, const int64_t* rows, const at::Tensor& key_cache, const at::Tensor& value_cache,
               const at::Tensor& slots) {
  const int64_t tokens = q.size(0), head_dim = q.dim() == 3 ? q.size(2) : 0;
  check_heads(q, "q", tokens, head_dim);
  check_heads(k, "k", tokens, head_dim);
  check_heads(v, "v", tokens, head_dim);
  const int64_t kv_heads = k.size(1);
  TORCH_CHECK(v.size(1) == kv_heads && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k and v must have the same heads and dtype as each other and q's dtype");
  check_cache(key_cache, q, kv_heads, head_dim, "key_cache");
  check_cache(value_cache, q, kv_heads, head_dim, "value_cache");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "key and value caches must have the same shape");
  const at::ScalarType table_type = rows == nullptr ? q.scalar_type() : at::kFloat;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.dim() >= 2 &&
                  cos.scalar_type() == table_type && sin.scalar_type() == table_type,
              "cos and sin must be contiguous tables of the same shape (q's dtype per token, or fp32 per position)");
  const int64_t table_rows = cos.size(0), rotary_dim = table_rows ? cos.numel() / table_rows : 0;
  TORCH_CHECK(rows != nullptr || table_rows == tokens, "per-token tables need one row per token");
  TORCH_CHECK(cos.size(-1) == rotary_dim && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
              "the rotary dimension must be even and at most head_dim");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous() && slots.size(0) == tokens,
              "slots must be a contiguous int64 vector of one slot per token");
  const int64_t capacity = key_cache.size(0) * key_cache.size(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "slot ", slot[t], " lies outside the cache (", capacity, " slots)");
    TORCH_CHECK(rows == nullptr || (rows[t] >= 0 && rows[t] < table_rows), "position ", rows[t],
                " lies beyond the rotary tables (", table_rows, " rows)");
  }
  const int64_t row = kv_heads * head_dim;
  with_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](const auto* cos_data, const auto* sin_data) {
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t r = rows == nullptr ? t : rows[t];
        const auto* c = cos_data + r * rotary_dim;
        const auto* s = sin_data + r * rotary_dim;
        T* qt = q.data_ptr<T>() + t * q.stride(0);
        for (int64_t h = 0; h < q.size(1); ++h) rotate(qt + h * head_dim, c, s, rotary_dim / 2);
        T* kt = k.data_ptr<T>() + t * k.stride(0);
        const T* vt = v.data_ptr<T>() + t * v.stride(0);
        for (int64_t h = 0; h < kv_heads; ++h) rotate(kt + h * head_dim, c, s, rotary_dim / 2);
        std::copy(kt, kt + row, key_cache.data_ptr<T>() + slot[t] * row);
        std::copy(vt, vt + row, value_cache.data_ptr<T>() + slot[t] * row);
      }
    };
    if (rows == nullptr) {
      run(cos.data_ptr<T>(), sin.data_ptr<T>());
    } else {
      run(cos.data_ptr<float>(), sin.data_ptr<float>());
    }
  });
}

void rotary_kv_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& slots) {
  rotary_kv(q, k, v, cos, sin, nullptr, key_cache, value_cache, slots);
}

// f(position, slot) for positions lo .. hi of a sequence, a block at a time (no division per position).
template <typename F>
inline void for_context(const int64_t* table, int64_t block_size, int64_t lo, int64_t hi, F f) {
  for (int64_t b = lo / block_size, j = lo; j <= hi; ++b) {
    const int64_t base = (table[b] - b) * block_size;  // slot of position j in block b: base + j
    const int64_t end = std::min(hi, (b + 1) * block_size - 1);
    for (; j <= end; ++j) f(j, base + j);
  }
}

// One query head against its context: scores in fp32, max-subtracted exp, the weighted sum of values in fp32.
template <typename T>
void attend_one(const T* q, const T* keys, const T* values, const int64_t* table, int64_t block_size,
                int64_t row, int64_t lo, int64_t hi, float scale, int64_t head_dim, float* scores, float* acc,
                T* out) {
  float peak = -std::numeric_limits<float>::infinity();
  for_context(table, block_size, lo, hi, [&](int64_t j, int64_t slot) {
    const float s = dot(q, keys + slot * row, head_dim) * scale;
    scores[j - lo] = s;
    peak = std::max(peak, s);
  });
  const int64_t count = hi - lo + 1;
  const __m512 top = _mm512_set1_ps(peak);
  __m512 sum16 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), top));
    _mm512_storeu_ps(scores + j, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  if (j < count) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (count - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + j), top)));
    _mm512_mask_storeu_ps(scores + j, tail, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  const float total = _mm512_reduce_add_ps(sum16);
  if (head_dim <= 16) {  // one register holds the sum (a masked store and reload per position would stall)
    const __mmask16 m = tail_mask(head_dim);
    __m512 sum = _mm512_setzero_ps();
    for_context(table, block_size, lo, hi, [&](int64_t j, int64_t slot) {
      sum = _mm512_fmadd_ps(_mm512_set1_ps(scores[j - lo]), load_tail(values + slot * row, m), sum);
    });
    _mm512_mask_storeu_ps(acc, m, _mm512_mul_ps(sum, _mm512_set1_ps(1.0f / total)));
    for (int64_t d = 0; d < head_dim; ++d) out[d] = T(acc[d]);
    return;
  }
  std::fill(acc, acc + head_dim, 0.0f);
  for_context(table, block_size, lo, hi, [&](int64_t j, int64_t slot) {
    const float e = scores[j - lo];
    const T* vj = values + slot * row;
    int64_t d = 0;
    const __m512 ev = _mm512_set1_ps(e);
    for (; d + 16 <= head_dim; d += 16) {
      _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(ev, load16(vj + d), _mm512_loadu_ps(acc + d)));
    }
    for (; d < head_dim; ++d) acc[d] += e * static_cast<float>(vj[d]);
  });
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < head_dim; ++d) out[d] = T(acc[d] * inv);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& token_pos,
                           double scale, int64_t window) {
  const int64_t tokens = q.size(0), head_dim = q.dim() == 3 ? q.size(2) : 0;
  check_heads(q, "q", tokens, head_dim);
  const int64_t heads = q.size(1), kv_heads = key_cache.dim() == 4 ? key_cache.size(2) : 0;
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of the cache's kv heads");
  check_cache(key_cache, q, kv_heads, head_dim, "key_cache");
  check_cache(value_cache, q, kv_heads, head_dim, "value_cache");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "key and value caches must have the same shape");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "block_tables must be a contiguous int64 [sequences, blocks] tensor");
  for (const at::Tensor* t : {&token_seq, &token_pos}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() && t->size(0) == tokens,
                "token_seq and token_pos must be contiguous int64 vectors of one entry per token");
  }
  const int64_t sequences = block_tables.size(0), width = block_tables.size(1);
  const int64_t block_size = key_cache.size(1), num_blocks = key_cache.size(0);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* seq = token_seq.data_ptr<int64_t>();
  const int64_t* pos = token_pos.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(seq[t] >= 0 && seq[t] < sequences, "token ", t, " names sequence ", seq[t], " of ", sequences);
    TORCH_CHECK(pos[t] >= 0 && pos[t] < width * block_size, "token ", t, " at position ", pos[t],
                " lies beyond its block table (", width * block_size, " slots)");
    // every block the token reads must exist
    for (int64_t b = 0; b <= pos[t] / block_size; ++b) {
      const int64_t id = tables[seq[t] * width + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block id ", id, " lies outside the cache (", num_blocks, " blocks)");
    }
    longest = std::max(longest, pos[t] + 1);
  }
  at::Tensor out = at::empty({tokens, heads, head_dim}, q.options());
  if (tokens == 0 || heads == 0) return out;
  const int64_t group = heads / kv_heads, row = kv_heads * head_dim;
  // about 64K multiply-adds per task, so a batch-1 step stays on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, 2 * longest * head_dim));
  with_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* keys = key_cache.data_ptr<T>();
    const T* values = value_cache.data_ptr<T>();
    at::parallel_for(0, tokens * heads, grain, [&](int64_t begin, int64_t end) {
      // on the stack up to 4K positions (a decode step's usual context), else on the heap
      constexpr int64_t kStack = 4096;
      float stack_scores[kStack], stack_acc[512];
      std::vector<float> heap_scores(longest > kStack ? longest : 0), heap_acc(head_dim > 512 ? head_dim : 0);
      float* scores = longest > kStack ? heap_scores.data() : stack_scores;
      float* acc = head_dim > 512 ? heap_acc.data() : stack_acc;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = i / heads, h = i % heads, kvh = h / group;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, pos[t] - window + 1) : 0;
        attend_one(q.data_ptr<T>() + t * q.stride(0) + h * head_dim, keys + kvh * head_dim, values + kvh * head_dim,
                   tables + seq[t] * width, block_size, row, lo, pos[t], static_cast<float>(scale), head_dim,
                   scores, acc, out.data_ptr<T>() + (t * heads + h) * head_dim);
      }
    });
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "gate");
  check_rows(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "gate and up must match");
  const int64_t rows = gate.size(0), n = gate.size(1);
  at::Tensor out = at::empty({rows, n}, gate.options());
  with_dtype(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    float silu[16];
    for (int64_t r = 0; r < rows; ++r) {
      const T* g = gate.data_ptr<T>() + r * gate.stride(0);
      const T* u = up.data_ptr<T>() + r * up.stride(0);
      T* o = out.data_ptr<T>() + r * n;
      for (int64_t j0 = 0; j0 < n; j0 += 16) {  // silu(x) = x / (1 + exp(-x)), 16 lanes at a time
        const int64_t width = std::min<int64_t>(16, n - j0);
        const __m512 x = load_tail(g + j0, tail_mask(width));
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(silu, _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
        for (int64_t j = 0; j < width; ++j) o[j0 + j] = T(round_to<T>(silu[j]) * static_cast<float>(u[j0 + j]));
      }
    }
  });
  return out;
}

// decode_step: a linear is 6 tensor slots (a, b, c, d, e, bias; absent ones None) and 3 ints (kind, p1, p2),
// written by the modules' kernel_record() (model.py, qlinear.py) with the kinds of kernels/ops.py:
//   0 dense       a = weight [out, in] (x's dtype); p1 = most tokens for dense_product (else at::linear, as
//                 DenseLinear.forward chooses)
//   1 lut4        a = packed, b = scale, c = zero, d = lut, e = perm; p1 = group size, p2 = out features
//   2 int8        the same without the table
//   3 lut4 + int8 activations (AVX512-VNNI), as lut4 without the table
//   4 float       a = a dense fp32 copy (QuantLinear's torch backend)
//   5 none        no product: the slot of k, v or up when q/k/v or gate/up are one fused product
// Packed products give fp32; the bias is added in fp32 and the sum rounded to x's dtype, as QuantLinear does.
// A layer's linears: q (or the fused q/k/v), k, v, o, gate (or the fused gate/up), up, down. Projections whose
// layouts do not concatenate (a GGUF mixture's Q6_K attn_v beside Q4_K q/k) are computed one product each.
constexpr int64_t kLinearTensors = 6, kLinearInts = 3, kLinears = 7, kNormTensors = 4, kNone = 5;
constexpr int64_t kLayerTensors = kNormTensors + kLinears * kLinearTensors, kLayerInts = kLinears * kLinearInts;

at::Tensor slot(const c10::List<std::optional<at::Tensor>>& t, int64_t i, const char* what) {
  std::optional<at::Tensor> entry = t.get(i);  // List::get returns a copy (one reference count)
  TORCH_CHECK(entry.has_value(), "decode_step: missing ", what);
  return *std::move(entry);
}

at::Tensor linear(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& t, int64_t base,
                  const int64_t* ints) {
  const int64_t kind = ints[0], p1 = ints[1], p2 = ints[2];
  const std::optional<at::Tensor> c = t.get(base + 2), e = t.get(base + 4), bias = t.get(base + 5);
  const at::Tensor a = slot(t, base, "weight");
  at::Tensor y;
  switch (kind) {
    case 0:
      if (x.size(0) > p1) return at::linear(x, a, bias);
      y = infopt::dense_product(x, a);
      break;
    case 1: y = infopt::lut4_product(x, a, slot(t, base + 1, "scale"), c, slot(t, base + 3, "lut"), p1, p2, e); break;
    case 2: y = infopt::int8_product(x, a, slot(t, base + 1, "scale"), c, p1, p2, e); break;
    case 3: y = infopt::lut4_a8_product(x, a, slot(t, base + 1, "scale"), c, p1, p2, e); break;
    case 4: y = at::linear(x.to(a.scalar_type()), a).to(at::kFloat); break;
    default: TORCH_CHECK(false, "decode_step: no product of linear kind ", kind);
  }
  if (bias.has_value()) y.add_(*bias);
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// x [tokens, hidden] (the embedded tokens; used as the residual stream, so overwritten) through every layer, then
// the final norm and lm_head at logit_rows (all rows when absent): fp32 logits. The rotary tables are Rotary's fp32
// cos / sign-folded sin [positions, rotary_dim], indexed by token_pos. tensors / ints: per layer the input,
// post-attention, q and k norm weights and the q/k/v, o, gate/up and down records; then the final norm weight and the
// lm_head record.
at::Tensor decode_step(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& tensors,
                       at::IntArrayRef ints, at::TensorList key_caches, at::TensorList value_caches,
                       const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                       const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& token_pos,
                       const std::optional<at::Tensor>& logit_rows, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, double eps, double scale, int64_t window) {
  const int64_t layers = static_cast<int64_t>(key_caches.size());
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == layers * kLayerTensors + 1 + kLinearTensors &&
                  static_cast<int64_t>(ints.size()) == layers * kLayerInts + kLinearInts &&
                  static_cast<int64_t>(value_caches.size()) == layers,
              "decode_step: ", layers, " layers need ", layers * kLayerTensors + 1 + kLinearTensors, " tensors and ",
              layers * kLayerInts + kLinearInts, " ints");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [tokens, hidden] tensor");
  TORCH_CHECK(token_pos.scalar_type() == at::kLong && token_pos.is_contiguous() && token_pos.numel() == x.size(0),
              "token_pos must be a contiguous int64 vector of one position per token");
  c10::InferenceMode inference;  // the intermediates and views need no autograd records
  const int64_t tokens = x.size(0), q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t tb = l * kLayerTensors;
    const int64_t* li = ints.data() + l * kLayerInts;
    auto lin = [&](int64_t i) { return tb + kNormTensors + i * kLinearTensors; };
    auto product = [&](const at::Tensor& in, int64_t i) { return linear(in, tensors, lin(i), li + i * kLinearInts); };
    auto fused = [&](int64_t second) { return li[second * kLinearInts] == kNone; };
    const at::Tensor h = rms_norm(x, slot(tensors, tb, "input norm"), eps);
    const at::Tensor qkv = fused(1) ? product(h, 0) : at::cat({product(h, 0), product(h, 1), product(h, 2)}, 1);
    TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == q_width + 2 * kv_width, "decode_step: q/k/v width mismatch");
    at::Tensor q = qkv.narrow(1, 0, q_width).view({tokens, num_heads, head_dim});
    at::Tensor k = qkv.narrow(1, q_width, kv_width).view({tokens, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_width + kv_width, kv_width).view({tokens, num_kv_heads, head_dim});
    if (tensors.get(tb + 2).has_value()) {  // Qwen3: each query and key head normalised before the rotation
      q = rms_norm(q.reshape({tokens * num_heads, head_dim}), slot(tensors, tb + 2, "q norm"), eps)
              .view({tokens, num_heads, head_dim});
      k = rms_norm(k.reshape({tokens * num_kv_heads, head_dim}), slot(tensors, tb + 3, "k norm"), eps)
              .view({tokens, num_kv_heads, head_dim});
    }
    rotary_kv(q, k, v, cos, sin, token_pos.data_ptr<int64_t>(), key_caches[l], value_caches[l], slots);
    const at::Tensor attn = paged_attention(q, key_caches[l], value_caches[l], block_tables, token_seq, token_pos,
                                            scale, window);
    const at::Tensor o = product(attn.view({tokens, q_width}), 3);
    const at::Tensor h2 = add_rms_norm(x, o, slot(tensors, tb + 1, "post-attention norm"), eps);
    at::Tensor act;
    if (fused(5)) {
      const at::Tensor gate_up = product(h2, 4);
      TORCH_CHECK(gate_up.size(1) % 2 == 0, "decode_step: gate/up must be two equal halves");
      const int64_t inner = gate_up.size(1) / 2;
      act = silu_mul(gate_up.narrow(1, 0, inner), gate_up.narrow(1, inner, inner));
    } else {
      const at::Tensor gate = product(h2, 4), up = product(h2, 5);
      TORCH_CHECK(gate.sizes() == up.sizes(), "decode_step: gate and up must be the same width");
      act = silu_mul(gate, up);
    }
    x.add_(product(act, 6));
  }
  const int64_t head = layers * kLayerTensors;
  const at::Tensor last = logit_rows.has_value() ? x.index_select(0, *logit_rows) : x;
  const at::Tensor normed = rms_norm(last, slot(tensors, head, "final norm"), eps);
  return linear(normed, tensors, head + 1, ints.data() + layers * kLayerInts).to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(infopt_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  m.def("rotary_kv_write(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor cos, Tensor sin, Tensor(c!) key_cache, "
        "Tensor(d!) value_cache, Tensor slots) -> ()",
        &rotary_kv_write);
  m.def("paged_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor token_seq, "
        "Tensor token_pos, float scale, int window) -> Tensor",
        &paged_attention);
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor", &silu_mul);
  m.def("decode_step(Tensor(a!) x, Tensor?[] tensors, int[] ints, Tensor(b!)[] key_caches, "
        "Tensor(c!)[] value_caches, Tensor cos, Tensor sin, Tensor slots, Tensor block_tables, Tensor token_seq, "
        "Tensor token_pos, Tensor? logit_rows, int num_heads, int num_kv_heads, int head_dim, float eps, float scale, "
        "int window) -> Tensor",
        &decode_step);
}
