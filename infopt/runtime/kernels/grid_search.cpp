// Per-block scale searches of the GGUF quantizers (infopt.formats.ggml_quants, infopt.quant.kgrid), one block of
// 16 or 32 values at a time in registers instead of ~10 full-tensor torch passes per candidate.
//
//   symmetric_scale_search(x, w, nmax, steps)       x = s q, q in [-nmax, nmax - 1]: the least-squares s of the
//                                                   candidate rounding that maximises (sum w x q)^2 / sum w q^2
//   affine_scale_search(x, w, nmax, steps, nonneg)  x = s q - m, q in [0, nmax]: the weighted least-squares (s, m) of
//                                                   the candidate rounding with the smallest weighted error
//   round_q8_0(x), round_q4_0(x, d)                 ggml's Q8_0 / Q4_0 blocks of 32, scaled, rounded and packed
//   round_to_nearest(x, group, qmin, qmax, sym)     the RTN grid and codes of infopt.quant.rtn
//
// Each is the exact mirror of its torch form (_symmetric_search, affine_search): the same fp32 elementwise steps in
// the same order (AVX-512, 16 values at a time; no fused multiply-adds, see build.CFLAGS), and every sum in float64
// (8 lanes), where its order changes
// nothing but the last bits of a float64; a candidate must beat the best by 1e-12 relative, so those bits decide
// nothing (the two forms give the same bytes). Rows are independent,
// so the result does not depend on the thread count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxBlock = 256;
constexpr int64_t kWidth = 16;  // floats per AVX-512 vector; blocks are whole vectors
// A later candidate replaces the best only when it is better by more than 1e-12 relative. Exact fits tie (every
// candidate of a constant block fits it), and the two forms, summing in different orders, would break such ties
// differently; the summation order moves a float64 sum of 16-32 same-signed terms by ~1e-15 at most.
constexpr double kBetter = 1.0 + 1e-12;
constexpr double kWorse = 1.0 - 1e-12;
constexpr double kSingular = 1e-12;
constexpr double kFloor = 1e-15;

// clamp(round_half_away((x - shift) * iscale), lo, hi) on 16 floats: C's roundf, halves away from zero
// (kgrid.round_half_away: sign(v) * floor(|v| + 0.5))
inline __m512 grid_codes(__m512 x, __m512 shift, __m512 iscale, __m512 lo, __m512 hi) {
  const __m512 sign_bit = _mm512_set1_ps(-0.0f);
  const __m512 v = _mm512_mul_ps(_mm512_sub_ps(x, shift), iscale);
  const __m512 magnitude = _mm512_add_ps(_mm512_andnot_ps(sign_bit, v), _mm512_set1_ps(0.5f));
  const __m512 rounded = _mm512_or_ps(_mm512_roundscale_ps(magnitude, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                      _mm512_and_ps(v, sign_bit));
  return _mm512_min_ps(_mm512_max_ps(rounded, lo), hi);
}

inline __m512d low_half(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline __m512d high_half(__m512 v) { return _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)); }

void check_blocks(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, op, ": float32 blocks and weights");
  TORCH_CHECK(x.dim() == 2 && w.sizes() == x.sizes(), op, ": x and w must both be [blocks, block size]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), op, ": contiguous blocks only");
  TORCH_CHECK(x.size(1) >= kWidth && x.size(1) <= kMaxBlock && x.size(1) % kWidth == 0, op,
              ": block size must be a multiple of 16 up to ", kMaxBlock);
}

// The symmetric search for 16 blocks at once, one block per vector lane (blocks of at most kLaneBlock values): the
// sums run down each lane, with no horizontal reductions, and the candidates' choice is a per-lane select. The same
// steps as the one-block form below, with the sums in another order (see kBetter). 1.9x the one-block form's speed
// (2026-12-02), which waits on each candidate's reductions.
constexpr int64_t kLaneBlock = 32;

void symmetric_search_lanes(const float* xp, const float* wp, float* op, int64_t size, int64_t nmax, int64_t steps) {
  alignas(64) float xt[kLaneBlock][kWidth];
  alignas(64) double wx[kLaneBlock][kWidth], wd[kLaneBlock][kWidth];
  for (int64_t j = 0; j < size; ++j) {
    for (int64_t b = 0; b < kWidth; ++b) {
      xt[j][b] = xp[b * size + j];
      wd[j][b] = static_cast<double>(wp[b * size + j]);
      wx[j][b] = wd[j][b] * static_cast<double>(xt[j][b]);
    }
  }
  const __m512 sign_bit = _mm512_set1_ps(-0.0f), zero = _mm512_setzero_ps();
  const __m512 lo = _mm512_set1_ps(static_cast<float>(-nmax)), hi = _mm512_set1_ps(static_cast<float>(nmax - 1));
  __m512 peak = _mm512_load_ps(xt[0]);  // the first value of largest magnitude, as torch.argmax picks it
  __m512 largest = _mm512_andnot_ps(sign_bit, peak);
  for (int64_t j = 1; j < size; ++j) {
    const __m512 v = _mm512_load_ps(xt[j]), magnitude = _mm512_andnot_ps(sign_bit, v);
    const __mmask16 larger = _mm512_cmp_ps_mask(magnitude, largest, _CMP_GT_OQ);
    largest = _mm512_mask_blend_ps(larger, largest, magnitude);
    peak = _mm512_mask_blend_ps(larger, peak, v);
  }
  const __m512 inverse = _mm512_div_ps(_mm512_set1_ps(1.0f), peak);
  const __mmask16 flat = _mm512_cmp_ps_mask(peak, zero, _CMP_EQ_OQ);
  const __m512d better_by = _mm512_set1_pd(kBetter), zero_d = _mm512_setzero_pd();
  __m512d best[2] = {zero_d, zero_d}, best_scale[2] = {zero_d, zero_d};
  for (int64_t step = -steps; step <= steps; ++step) {
    const float c = static_cast<float>(-(static_cast<double>(nmax) + 0.1 * static_cast<double>(step)));
    const __m512 iscale = _mm512_mask_blend_ps(flat, _mm512_mul_ps(inverse, _mm512_set1_ps(c)), zero);
    __m512d lx[2] = {zero_d, zero_d}, l2[2] = {zero_d, zero_d};
    for (int64_t j = 0; j < size; ++j) {
      const __m512 q = grid_codes(_mm512_load_ps(xt[j]), zero, iscale, lo, hi);
      const __m512d qh[2] = {low_half(q), high_half(q)};
      for (int h = 0; h < 2; ++h) {
        lx[h] = _mm512_add_pd(lx[h], _mm512_mul_pd(_mm512_load_pd(wx[j] + 8 * h), qh[h]));
        l2[h] = _mm512_add_pd(l2[h], _mm512_mul_pd(_mm512_mul_pd(_mm512_load_pd(wd[j] + 8 * h), qh[h]), qh[h]));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __mmask8 positive = _mm512_cmp_pd_mask(l2[h], zero_d, _CMP_GT_OQ);
      const __m512d value = _mm512_maskz_div_pd(positive, _mm512_mul_pd(lx[h], lx[h]), l2[h]);
      const __mmask8 better = _mm512_cmp_pd_mask(value, _mm512_mul_pd(best[h], better_by), _CMP_GT_OQ);
      best[h] = _mm512_mask_blend_pd(better, best[h], value);
      best_scale[h] = _mm512_mask_div_pd(best_scale[h], better, lx[h], l2[h]);
    }
  }
  _mm256_storeu_ps(op, _mm512_cvtpd_ps(best_scale[0]));
  _mm256_storeu_ps(op + 8, _mm512_cvtpd_ps(best_scale[1]));
}

at::Tensor symmetric_scale_search(const at::Tensor& x, const at::Tensor& w, int64_t nmax, int64_t steps) {
  check_blocks(x, w, "symmetric_scale_search");
  TORCH_CHECK(nmax >= 1 && nmax <= 1 << 15 && steps >= 0 && steps <= 1000, "symmetric_scale_search: bad nmax/steps");
  const int64_t blocks = x.size(0), size = x.size(1), vectors = size / kWidth;
  at::Tensor out = at::empty({blocks, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const __m512 lo = _mm512_set1_ps(static_cast<float>(-nmax)), hi = _mm512_set1_ps(static_cast<float>(nmax - 1));
  const __m512 zero = _mm512_setzero_ps();
  const int64_t laned = size <= kLaneBlock ? blocks / kWidth * kWidth : 0;
  at::parallel_for(0, laned / kWidth, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      symmetric_search_lanes(xp + g * kWidth * size, wp + g * kWidth * size, op + g * kWidth, size, nmax, steps);
    }
  });
  at::parallel_for(laned, blocks, 256, [&](int64_t begin, int64_t end) {  // the rest, one block at a time
    __m512d wx[2 * kMaxBlock / kWidth], wd[2 * kMaxBlock / kWidth];
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * size;
      const float* wr = wp + r * size;
      int64_t arg = 0;  // the first value of largest magnitude, as torch.argmax picks it
      for (int64_t i = 1; i < size; ++i) {
        if (std::fabs(xr[i]) > std::fabs(xr[arg])) arg = i;
      }
      const float peak = xr[arg];
      const float inverse = 1.0f / peak;
      for (int64_t v = 0; v < vectors; ++v) {
        const __m512 xv = _mm512_loadu_ps(xr + v * kWidth), wv = _mm512_loadu_ps(wr + v * kWidth);
        wd[2 * v] = low_half(wv);
        wd[2 * v + 1] = high_half(wv);
        wx[2 * v] = _mm512_mul_pd(wd[2 * v], low_half(xv));
        wx[2 * v + 1] = _mm512_mul_pd(wd[2 * v + 1], high_half(xv));
      }
      double best = 0.0, best_scale = 0.0;
      for (int64_t step = -steps; step <= steps; ++step) {
        const float c = static_cast<float>(-(static_cast<double>(nmax) + 0.1 * static_cast<double>(step)));
        const __m512 iscale = _mm512_set1_ps(peak == 0.0f ? 0.0f : inverse * c);
        __m512d lx = _mm512_setzero_pd(), l2 = _mm512_setzero_pd();  // any order: see kBetter
        for (int64_t v = 0; v < vectors; ++v) {
          const __m512 q = grid_codes(_mm512_loadu_ps(xr + v * kWidth), zero, iscale, lo, hi);
          const __m512d q0 = low_half(q), q1 = high_half(q);
          lx = _mm512_add_pd(lx, _mm512_add_pd(_mm512_mul_pd(wx[2 * v], q0), _mm512_mul_pd(wx[2 * v + 1], q1)));
          l2 = _mm512_add_pd(l2, _mm512_add_pd(_mm512_mul_pd(_mm512_mul_pd(wd[2 * v], q0), q0),
                                               _mm512_mul_pd(_mm512_mul_pd(wd[2 * v + 1], q1), q1)));
        }
        const double sumlx = _mm512_reduce_add_pd(lx), suml2 = _mm512_reduce_add_pd(l2);
        const double value = suml2 > 0.0 ? sumlx * sumlx / suml2 : 0.0;
        if (value > best * kBetter) {
          best = value;
          best_scale = sumlx / suml2;
        }
      }
      op[r] = static_cast<float>(best_scale);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_scale_search(const at::Tensor& x, const at::Tensor& w, int64_t nmax,
                                                       int64_t steps, bool nonnegative_min) {
  check_blocks(x, w, "affine_scale_search");
  TORCH_CHECK(nmax >= 1 && nmax <= 1 << 15 && steps >= 0 && steps <= 1000, "affine_scale_search: bad nmax/steps");
  const int64_t blocks = x.size(0), size = x.size(1), vectors = size / kWidth;
  at::Tensor scale_out = at::empty({blocks, 1}, x.options());
  at::Tensor min_out = at::empty({blocks, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* sp = scale_out.data_ptr<float>();
  float* mp = min_out.data_ptr<float>();
  const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(static_cast<float>(nmax));
  at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
    constexpr int64_t kHalves = 2 * kMaxBlock / kWidth;
    __m512d xd[kHalves], wd[kHalves], qd[kHalves];
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * size;
      const float* wr = wp + r * size;
      float low = xr[0], high = xr[0];
      for (int64_t i = 1; i < size; ++i) {
        low = std::min(low, xr[i]);
        high = std::max(high, xr[i]);
      }
      if (nonnegative_min) low = std::min(low, 0.0f);
      const float span = std::max(high - low, 1e-30f);
      double best_scale = static_cast<double>(span) / static_cast<double>(nmax);
      double best_min = -static_cast<double>(low);
      double best_err = std::numeric_limits<double>::infinity();
      __m512d sw_v = _mm512_setzero_pd(), sx_v = _mm512_setzero_pd(), energy = _mm512_setzero_pd();
      for (int64_t v = 0; v < vectors; ++v) {
        const __m512 xv = _mm512_loadu_ps(xr + v * kWidth), wv = _mm512_loadu_ps(wr + v * kWidth);
        xd[2 * v] = low_half(xv);
        xd[2 * v + 1] = high_half(xv);
        wd[2 * v] = low_half(wv);
        wd[2 * v + 1] = high_half(wv);
        for (int64_t h = 2 * v; h < 2 * v + 2; ++h) {
          sw_v = _mm512_add_pd(sw_v, wd[h]);
          sx_v = _mm512_add_pd(sx_v, _mm512_mul_pd(wd[h], xd[h]));
          energy = _mm512_add_pd(energy, _mm512_mul_pd(_mm512_mul_pd(wd[h], xd[h]), xd[h]));
        }
      }
      const double sw = _mm512_reduce_add_pd(sw_v), sx = _mm512_reduce_add_pd(sx_v);
      const double margin = kFloor * _mm512_reduce_add_pd(energy);  // see kgrid.FLOOR
      const __m512 shift = _mm512_set1_ps(low);
      const float inverse = 1.0f / span;
      for (int64_t step = 0; step <= steps; ++step) {
        const __m512 iscale = _mm512_set1_ps(
            inverse * static_cast<float>(static_cast<double>(nmax) - 1.0 + 0.1 * static_cast<double>(step)));
        __m512d pq = _mm512_setzero_pd(), pqq = _mm512_setzero_pd(), pqx = _mm512_setzero_pd();
        for (int64_t v = 0; v < vectors; ++v) {
          const __m512 q = grid_codes(_mm512_loadu_ps(xr + v * kWidth), shift, iscale, zero, top);
          qd[2 * v] = low_half(q);
          qd[2 * v + 1] = high_half(q);
          for (int64_t h = 2 * v; h < 2 * v + 2; ++h) {
            const __m512d wq = _mm512_mul_pd(wd[h], qd[h]);
            pq = _mm512_add_pd(pq, wq);
            pqq = _mm512_add_pd(pqq, _mm512_mul_pd(wq, qd[h]));
            pqx = _mm512_add_pd(pqx, _mm512_mul_pd(wq, xd[h]));
          }
        }
        const double sq = _mm512_reduce_add_pd(pq), sqq = _mm512_reduce_add_pd(pqq);
        const double sqx = _mm512_reduce_add_pd(pqx);
        const double det = sw * sqq - sq * sq;
        const bool solvable = det > kSingular * (sw * sqq);  // see kgrid.SINGULAR
        double scale = solvable ? (sw * sqx - sq * sx) / std::max(det, 1e-30) : best_scale;
        double offset = solvable ? (sqq * sx - sq * sqx) / std::max(det, 1e-30) : static_cast<double>(low);
        if (nonnegative_min) {  // x = scale q - min with min = -offset >= 0
          offset = std::min(offset, 0.0);
          if (offset == 0.0) scale = sqx / std::max(sqq, 1e-30);
        }
        scale = std::max(scale, 0.0);
        const __m512d scale_v = _mm512_set1_pd(scale), offset_v = _mm512_set1_pd(offset);
        __m512d pe = _mm512_setzero_pd();
        for (int64_t h = 0; h < 2 * vectors; ++h) {
          const __m512d residual = _mm512_sub_pd(_mm512_add_pd(_mm512_mul_pd(scale_v, qd[h]), offset_v), xd[h]);
          pe = _mm512_add_pd(pe, _mm512_mul_pd(wd[h], _mm512_mul_pd(residual, residual)));
        }
        const double err = _mm512_reduce_add_pd(pe);
        if (err < best_err * kWorse - margin) {
          best_err = err;
          best_scale = scale;
          best_min = -offset;
        }
      }
      sp[r] = static_cast<float>(best_scale);
      mp[r] = static_cast<float>(best_min);
    }
  });
  return {scale_out, min_out};
}

// --- the legacy 32-value blocks, rounded and packed in one pass (ggml_quants._quantize_rows, step for step) ---

constexpr int64_t kLegacy = 32;
constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // vfpclassps: quiet NaN, +inf, -inf, signalling NaN

void check_float_matrix(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, op,
              ": a contiguous float32 CPU matrix only");
}

void check_legacy(const at::Tensor& x, const char* op) {
  check_float_matrix(x, op);
  TORCH_CHECK(x.size(1) == kLegacy, op, ": x must be [blocks, 32]");
}

// x rounded to fp16 and back, as torch's .to(float16).to(float32): nearest even, overflow to infinity
inline float through_f16(float x, uint16_t* bits) {
  *bits = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _cvtsh_ss(*bits);
}

inline void store_le16(uint8_t* out, uint16_t bits) {
  out[0] = static_cast<uint8_t>(bits & 0xFF);
  out[1] = static_cast<uint8_t>(bits >> 8);
}

// Q8_0 (34 bytes a block: fp16 d little-endian, 32 int8 codes): d = fp16(amax / 127), codes
// clamp(round_half_away(x * (1 / d)), -127, 127), 0 where d is 0
at::Tensor round_q8_0(const at::Tensor& x) {
  check_legacy(x, "round_q8_0");
  const int64_t blocks = x.size(0);
  at::Tensor out = at::empty({blocks, 34}, x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, blocks, 1024, [&](int64_t begin, int64_t end) {
    const __m512 sign_bit = _mm512_set1_ps(-0.0f), zero = _mm512_setzero_ps();
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int64_t r = begin; r < end; ++r) {
      const __m512 a = _mm512_loadu_ps(xp + r * kLegacy), b = _mm512_loadu_ps(xp + r * kLegacy + kWidth);
      if (_mm512_fpclass_ps_mask(a, kNonFinite) | _mm512_fpclass_ps_mask(b, kNonFinite)) {
        finite = false;
        continue;
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign_bit, a),
                                                            _mm512_andnot_ps(sign_bit, b)));
      uint16_t bits;
      const float d = through_f16(amax / 127.0f, &bits);
      const __m512 inv = _mm512_set1_ps(d == 0.0f ? 0.0f : 1.0f / d);
      uint8_t* o = op + r * 34;
      store_le16(o, bits);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2),
                       _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(grid_codes(a, zero, inv, lo, hi))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 18),
                       _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(grid_codes(b, zero, inv, lo, hi))));
    }
  });
  TORCH_CHECK(finite.load(), "round_q8_0: a block holds a value that is not finite");
  return out;
}

// Q4_0 (18 bytes a block: fp16 d little-endian, 16 bytes with value j low and value j + 16 high) under given
// fp16-exact scales d: codes clamp(round_half_away(x * (1 / d)), -8, 7) + 8, 0 + 8 where d is 0
at::Tensor round_q4_0(const at::Tensor& x, const at::Tensor& d) {
  check_legacy(x, "round_q4_0");
  TORCH_CHECK(d.device().is_cpu() && d.scalar_type() == at::kFloat && d.is_contiguous() && d.numel() == x.size(0),
              "round_q4_0: d must be one float32 scale per block");
  const int64_t blocks = x.size(0);
  at::Tensor out = at::empty({blocks, 18}, x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  const float* dp = d.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  std::atomic<bool> finite{true}, exact{true};
  at::parallel_for(0, blocks, 1024, [&](int64_t begin, int64_t end) {
    const __m512 zero = _mm512_setzero_ps(), lo = _mm512_set1_ps(-8.0f), hi = _mm512_set1_ps(7.0f);
    const __m512i eight = _mm512_set1_epi32(8);
    for (int64_t r = begin; r < end; ++r) {
      const __m512 a = _mm512_loadu_ps(xp + r * kLegacy), b = _mm512_loadu_ps(xp + r * kLegacy + kWidth);
      if (_mm512_fpclass_ps_mask(a, kNonFinite) | _mm512_fpclass_ps_mask(b, kNonFinite) || !std::isfinite(dp[r])) {
        finite = false;
        continue;
      }
      uint16_t bits;
      const float scale = through_f16(dp[r], &bits);
      if (scale != dp[r]) {
        exact = false;
        continue;
      }
      const __m512 inv = _mm512_set1_ps(scale == 0.0f ? 0.0f : 1.0f / scale);
      const __m512i low = _mm512_add_epi32(_mm512_cvtps_epi32(grid_codes(a, zero, inv, lo, hi)), eight);
      const __m512i high = _mm512_add_epi32(_mm512_cvtps_epi32(grid_codes(b, zero, inv, lo, hi)), eight);
      uint8_t* o = op + r * 18;
      store_le16(o, bits);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2),
                       _mm512_cvtepi32_epi8(_mm512_or_si512(low, _mm512_slli_epi32(high, 4))));
    }
  });
  TORCH_CHECK(finite.load(), "round_q4_0: a block holds a value that is not finite");
  TORCH_CHECK(exact.load(), "round_q4_0: the scales must be fp16 values");
  return out;
}

// --- round to nearest on a min/max grid (infopt.quant.rtn.quantize_rtn, step for step) ---------------------------

bool is_kernel_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// f(data) with the tensor's data typed as float, c10::BFloat16 or c10::Half (is_kernel_float checked before).
template <typename F>
void with_float_data(const at::Tensor& t, F f) {
  switch (t.scalar_type()) {
    case at::kBFloat16: f(t.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: f(t.data_ptr<c10::Half>()); break;
    default: f(t.data_ptr<float>());
  }
}

// 16 values of a weight row as fp32 (bf16 and fp16 widen exactly).
inline __m512 load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load_f32(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// A scale rounded to its storage type (nearest even, as Tensor.to rounds) and stored; returns the stored value in
// fp32. A 16-bit scale that rounds to 0 becomes the type's smallest normal (rtn.compute_qparams: finfo.tiny).
template <typename S>
inline float store_scale(float s, S* out) {
  if constexpr (std::is_same_v<S, float>) {
    *out = s;
    return s;
  } else {
    S stored(s);
    if (static_cast<float>(stored) == 0.0f) stored = std::numeric_limits<S>::min();
    *out = stored;
    return static_cast<float>(stored);
  }
}

// Per group of `group` values: the range widened to include 0, s = absmax / ((qmax - qmin) / 2) (symmetric) or
// (max - min) / (qmax - qmin), 1 where that is 0, rounded to the scale's storage type; asymmetric z =
// round(qmin - min / s) clamped; codes clamp(round(x / s) (+ z), qmin, qmax), all in fp32 with s the stored scale.
// round is torch.round's: halves to even. The steps of rtn.compute_qparams / quantize_codes in order.
template <typename T, typename S>
void round_groups(const T* xp, int8_t* cp, S* sp, int8_t* zp, int64_t count, int64_t group, int64_t qmin,
                  int64_t qmax, bool symmetric, std::atomic<bool>& finite) {
  const float half_range = static_cast<float>(static_cast<double>(qmax - qmin) / 2.0);
  const float range = static_cast<float>(qmax - qmin);
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    const __m512 lo = _mm512_set1_ps(static_cast<float>(qmin)), hi = _mm512_set1_ps(static_cast<float>(qmax));
    for (int64_t g = begin; g < end; ++g) {
      const T* xg = xp + g * group;
      __m512 vmin = load_f32(xg), vmax = vmin;
      __mmask16 bad = _mm512_fpclass_ps_mask(vmin, kNonFinite);
      for (int64_t i = kWidth; i < group; i += kWidth) {
        const __m512 v = load_f32(xg + i);
        bad |= _mm512_fpclass_ps_mask(v, kNonFinite);
        vmin = _mm512_min_ps(vmin, v);
        vmax = _mm512_max_ps(vmax, v);
      }
      if (bad) {
        finite = false;
        continue;
      }
      const float wmin = std::min(_mm512_reduce_min_ps(vmin), 0.0f), wmax = std::max(_mm512_reduce_max_ps(vmax), 0.0f);
      float s = symmetric ? std::max(-wmin, wmax) / half_range : (wmax - wmin) / range;
      s = store_scale(s > 0.0f ? s : 1.0f, sp + g);
      __m512 shift = _mm512_setzero_ps();
      if (!symmetric) {
        const float z = std::min(std::max(std::nearbyint(static_cast<float>(qmin) - wmin / s),
                                          static_cast<float>(qmin)), static_cast<float>(qmax));
        zp[g] = static_cast<int8_t>(z);
        shift = _mm512_set1_ps(z);
      }
      const __m512 step = _mm512_set1_ps(s);
      for (int64_t i = 0; i < group; i += kWidth) {
        __m512 level = _mm512_roundscale_ps(_mm512_div_ps(load_f32(xg + i), step),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        level = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(level, shift), lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(cp + g * group + i),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(level)));
      }
    }
  });
}

// x: a contiguous float32, bfloat16 or float16 CPU matrix; scales stored as scale_dtype (float32, bfloat16 or
// float16). Returns (codes int8, scale, zero int8 or an empty tensor when symmetric).
std::tuple<at::Tensor, at::Tensor, at::Tensor> round_to_nearest(const at::Tensor& x, int64_t group, int64_t qmin,
                                                                int64_t qmax, bool symmetric,
                                                                at::ScalarType scale_dtype) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2 && is_kernel_float(x.scalar_type()),
              "round_to_nearest: a contiguous float32, bfloat16 or float16 CPU matrix only");
  TORCH_CHECK(is_kernel_float(scale_dtype), "round_to_nearest: scales are float32, bfloat16 or float16");
  TORCH_CHECK(group >= kWidth && group % kWidth == 0 && x.size(1) % group == 0,
              "round_to_nearest: groups must be multiples of 16 that divide the rows");
  TORCH_CHECK(qmin < 0 && qmax > 0 && qmin >= -128 && qmax <= 127, "round_to_nearest: bad qmin/qmax");
  const int64_t rows = x.size(0), cols = x.size(1), groups = cols / group;
  at::Tensor codes = at::empty({rows, cols}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({rows, groups}, x.options().dtype(scale_dtype));
  at::Tensor zero = at::empty({symmetric ? 0 : rows, symmetric ? 0 : groups}, x.options().dtype(at::kChar));
  int8_t* zp = symmetric ? nullptr : zero.data_ptr<int8_t>();
  int8_t* cp = codes.data_ptr<int8_t>();
  std::atomic<bool> finite{true};
  with_float_data(x, [&](const auto* xp) {
    with_float_data(scale, [&](auto* sp) {
      round_groups(xp, cp, sp, zp, rows * groups, group, qmin, qmax, symmetric, finite);
    });
  });
  TORCH_CHECK(finite.load(), "round_to_nearest: a group holds a value that is not finite");
  return {codes, scale, zero};
}

// v rounded to the scale's storage type (nearest even) and back: QuantizedWeight.dequantize forms the weights in
// that type. bf16: the upper half of the fp32 bits after adding 0x7FFF plus the kept lowest bit (finite values).
inline __m512 rounded_as(__m512 v, const float*) { return v; }
inline __m512 rounded_as(__m512 v, const c10::BFloat16*) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline __m512 rounded_as(__m512 v, const c10::Half*) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T, typename S>
void grid_error_sums(const T* xp, const int8_t* cp, const S* sp, const int8_t* zp, int64_t count, int64_t group,
                     std::vector<double>& partial) {
  at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
    __m512d err = _mm512_setzero_pd(), energy = _mm512_setzero_pd();
    for (int64_t g = begin; g < end; ++g) {
      const __m512 step = _mm512_set1_ps(static_cast<float>(sp[g]));
      const __m512 shift = _mm512_set1_ps(zp != nullptr ? static_cast<float>(zp[g]) : 0.0f);
      for (int64_t i = g * group; i < (g + 1) * group; i += kWidth) {
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + i))));
        const __m512 v = load_f32(xp + i);
        const __m512 r = _mm512_sub_ps(rounded_as(_mm512_mul_ps(_mm512_sub_ps(q, shift), step), sp), v);
        for (const __m512d h : {low_half(r), high_half(r)}) err = _mm512_add_pd(err, _mm512_mul_pd(h, h));
        for (const __m512d h : {low_half(v), high_half(v)}) energy = _mm512_add_pd(energy, _mm512_mul_pd(h, h));
      }
    }
    const int slot = at::get_thread_num();
    partial[2 * slot] += _mm512_reduce_add_pd(err);
    partial[2 * slot + 1] += _mm512_reduce_add_pd(energy);
  });
}

// (sum of (dequantized - x)^2, sum of x^2) for a weight on a grouped grid, dequantized as QuantizedWeight.dequantize
// does ((q - z) * s, an exact fp32 product rounded to the scale's type); the sums in float64, for the relative
// weight error a command reports. x and the scales: float32, bfloat16 or float16.
at::Tensor grid_error(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                      int64_t group) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2 && is_kernel_float(x.scalar_type()),
              "grid_error: a contiguous float32, bfloat16 or float16 CPU matrix only");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.sizes() == x.sizes() && codes.is_contiguous(),
              "grid_error: int8 codes of the weight's shape");
  TORCH_CHECK(group >= kWidth && group % kWidth == 0 && x.size(1) % group == 0,
              "grid_error: groups must be multiples of 16 that divide the rows");
  const int64_t rows = x.size(0), groups = x.size(1) / group;
  TORCH_CHECK(is_kernel_float(scale.scalar_type()) && scale.is_contiguous() && scale.numel() == rows * groups,
              "grid_error: one float32, bfloat16 or float16 scale per group");
  const bool shifted = zero.numel() > 0;
  TORCH_CHECK(!shifted || (zero.scalar_type() == at::kChar && zero.is_contiguous() && zero.numel() == rows * groups),
              "grid_error: one int8 zero point per group, or none");
  const int8_t* cp = codes.data_ptr<int8_t>();
  const int8_t* zp = shifted ? zero.data_ptr<int8_t>() : nullptr;
  std::vector<double> partial(2 * at::get_num_threads(), 0.0);
  with_float_data(x, [&](const auto* xp) {
    with_float_data(scale, [&](const auto* sp) { grid_error_sums(xp, cp, sp, zp, rows * groups, group, partial); });
  });
  at::Tensor out = at::empty({2}, x.options().dtype(at::kDouble));
  double* op = out.data_ptr<double>();
  op[0] = op[1] = 0.0;
  for (size_t t = 0; t < partial.size(); t += 2) {
    op[0] += partial[t];
    op[1] += partial[t + 1];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(infopt_kernels, m) {
  m.def("grid_error(Tensor x, Tensor codes, Tensor scale, Tensor zero, int group) -> Tensor", &grid_error);
  m.def("round_to_nearest(Tensor x, int group, int qmin, int qmax, bool symmetric, ScalarType scale_dtype) -> "
        "(Tensor, Tensor, Tensor)",
        &round_to_nearest);
  m.def("round_q8_0(Tensor x) -> Tensor", &round_q8_0);
  m.def("round_q4_0(Tensor x, Tensor d) -> Tensor", &round_q4_0);
  m.def("symmetric_scale_search(Tensor x, Tensor w, int nmax, int steps) -> Tensor", &symmetric_scale_search);
  m.def("affine_scale_search(Tensor x, Tensor w, int nmax, int steps, bool nonnegative_min) -> (Tensor, Tensor)",
        &affine_scale_search);
}
