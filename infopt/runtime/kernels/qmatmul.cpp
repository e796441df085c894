// Quantized-weight matrix-vector and small-batch kernels for x86-64 CPUs with AVX-512 (F, BW, VL, DQ).
//
// y[b, o] = sum_k x[b, k] * w[o, k] with w[o, k] = (value(o, k) - zero[o, g]) * scale[o, g], g the group of k,
// all in fp32. Each weight is formed exactly as the plain-torch fallback forms it ((value - zero) is a small
// integer or a table value minus 0, exact in fp32; times the fp32 scale, rounded once), so the two differ only in
// summation order. A float32 "zero" is an additive offset instead: w = value * scale + offset, multiplied and then
// added (no fused multiply-add), as ggml dequantizes its affine blocks (Q4_1: d * q + m; Q4_K: (d * sc) * q - dmin
// * mn, the offset holding -dmin * mn), so a GGUF file's weights are formed bit for bit as its reader forms them.
//
// Packed layouts (built by infopt/runtime/kernels/packing.py, columns already in act-order-sorted order):
//   Rows come in tiles of 4 and columns in units (128 columns for lut4, 32 for int8). A tile is one contiguous
//   run of bytes: for each unit, the 4 rows' unit bytes one after the other, so a tile reads as one forward
//   stream. Rows are padded to a multiple of 4 and columns to a whole unit with zero-scale rows / zero inputs.
//   lut4: a row's unit is 64 bytes = 16 little-endian dwords; nibble j (bits 4j..4j+3) of dword l is the 4-bit
//         index of column 16j + l. value = lut[index], a 16-entry fp32 table (index - 8 for signed int2/3/4
//         codes; the NF4/FP4 code values).
//   int8: a row's unit is its 32 int8 codes; value = code.
//   scale: fp32 [tiles, groups, 4]; zero: int8 zero points or fp32 offsets [tiles, groups, 4], or absent. A group
//   spans group_size columns: a multiple of the unit, or 32 or 64 (lut4) / 16 (int8) columns; all padded columns
//   for one scale per row.
//
// lut4 decode: per row and group the 16 possible weights (lut - zero) * scale sit in one zmm register, and
// vpermps (_mm512_permutexvar_ps) picks one per lane by the low 4 bits of each 32-bit index lane (Intel SDM,
// VPERMPS: 512-bit forms select with index bits 3:0 and ignore the rest). Shifting the unit's 16 dwords right by
// 4j puts nibble j in those bits, so 16 weights cost one shift and one permute, and no widening shuffle.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

namespace {

constexpr int64_t kRows = 4;       // rows per tile of the packed layout
constexpr int kBatchTile = 4;  // activation rows per register tile (4 rows x 4 tokens = 16 accumulators)
// Software prefetch distance along a tile stream. The hardware prefetchers alone left 2-4 token products from
// DRAM up to 2.5x slower than the same products on L3-resident weights on the development machine (AMD EPYC,
// Zen 5); prefetching 4-16 KiB ahead closed that gap (measured with one thread on a busy machine).
constexpr int64_t kPrefetchBytes = 8192;
// Weight bytes per chunk of tiles when more than 4 activation rows loop over it: stays in L2 (1 MiB on Zen 5)
// while each activation slice streams past; 32 KiB measured the same up to 128 tokens, slower at 512.
constexpr int64_t kChunkBytes = 256 << 10;

// Activations as fp32 rows of length ld (the packed width), permuted and zero-padded when needed.
struct Activations {
  at::Tensor owner;  // keeps a converted copy alive
  const float* data;
  int64_t rows;
  int64_t ld;
};

template <typename T>
void gather_rows(const T* src, int64_t in, float* dst, int64_t rows, int64_t ld, const int64_t* perm) {
  for (int64_t b = 0; b < rows; ++b) {
    const T* s = src + b * in;
    float* d = dst + b * ld;
    if (perm != nullptr) {
      for (int64_t j = 0; j < in; ++j) d[j] = static_cast<float>(s[perm[j]]);
    } else {
      for (int64_t j = 0; j < in; ++j) d[j] = static_cast<float>(s[j]);
    }
    std::fill(d + in, d + ld, 0.0f);
  }
}

Activations prepare(const at::Tensor& x_in, int64_t ld, const std::optional<at::Tensor>& perm) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "x must be a 2-D CPU tensor [tokens, in_features]");
  const int64_t rows = x_in.size(0), in = x_in.size(1);
  TORCH_CHECK(in <= ld, "x has ", in, " columns but the packed weight only ", ld);
  const int64_t* p = nullptr;
  if (perm.has_value()) {
    // perm comes from packing.py (an argsort), so its entries are trusted to lie in [0, in)
    TORCH_CHECK(perm->scalar_type() == at::kLong && perm->is_contiguous() && perm->numel() == in,
                "perm must be a contiguous int64 tensor of in_features entries");
    p = perm->data_ptr<int64_t>();
  }
  const at::Tensor x = x_in.contiguous();
  if (x.scalar_type() == at::kFloat && p == nullptr && in == ld) {
    return {x, x.data_ptr<float>(), rows, ld};
  }
  at::Tensor buf = at::empty({rows, ld}, x.options().dtype(at::kFloat));
  float* d = buf.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: gather_rows(x.data_ptr<float>(), in, d, rows, ld, p); break;
    case at::kBFloat16: gather_rows(x.data_ptr<c10::BFloat16>(), in, d, rows, ld, p); break;
    case at::kHalf: gather_rows(x.data_ptr<c10::Half>(), in, d, rows, ld, p); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  return {buf, d, rows, ld};
}

// Hot-path helpers and the lambdas they call must inline, or the accumulators leave registers.
#define INFOPT_INLINE __attribute__((always_inline)) inline
#define INFOPT_LAMBDA_INLINE __attribute__((always_inline))

// f(std::integral_constant<int, J>) for J = 0 .. N - 1, unrolled at compile time.
template <int N, typename F>
INFOPT_INLINE void unroll(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) INFOPT_LAMBDA_INLINE {
    (f(std::integral_constant<int, J>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// Shared description of one packed weight, validated once per call.
struct Weight {
  const uint8_t* data;
  int64_t out, tiles, in_pad, groups, group_size, unit_bytes, tile_bytes;
  const float* scale;  // [tiles, groups, 4]
  const int8_t* zero;  // same shape, nullptr when symmetric or affine
  const float* offset;  // same shape, nullptr unless affine (w = value * scale + offset)

  INFOPT_INLINE const uint8_t* unit(int64_t t, int64_t u, int64_t r) const {
    return data + t * tile_bytes + (u * kRows + r) * unit_bytes;
  }
  int64_t param(int64_t t, int64_t g, int64_t r) const { return (t * groups + g) * kRows + r; }
  float zero_at(int64_t i) const { return zero == nullptr ? 0.0f : static_cast<float>(zero[i]); }
};

Weight describe(const at::Tensor& data, int64_t unit_cols, int64_t unit_bytes, const at::Tensor& scale,
                const std::optional<at::Tensor>& zero, int64_t group_size, int64_t out) {
  TORCH_CHECK(data.dim() == 2 && data.is_contiguous() && data.device().is_cpu(),
              "packed data must be a contiguous 2-D CPU tensor");
  const int64_t tiles = data.size(0), tile_bytes = data.size(1);
  TORCH_CHECK(tile_bytes % (kRows * unit_bytes) == 0, "packed rows must hold whole units");
  TORCH_CHECK(out > (tiles - 1) * kRows && out <= tiles * kRows, "out_features does not match the row tiles");
  const int64_t in_pad = tile_bytes / (kRows * unit_bytes) * unit_cols;
  TORCH_CHECK(group_size > 0 && group_size % 16 == 0 && in_pad % group_size == 0 &&
                  (group_size % unit_cols == 0 || unit_cols % group_size == 0),
              "group_size must be a multiple or a divisor of the ", unit_cols, "-column unit and divide in_pad");
  const int64_t groups = in_pad / group_size;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 3 &&
                  scale.size(0) == tiles && scale.size(1) == groups && scale.size(2) == kRows,
              "scale must be contiguous float32 [tiles, groups, 4]");
  Weight w{static_cast<const uint8_t*>(data.data_ptr()), out, tiles, in_pad, groups, group_size, unit_bytes,
           tile_bytes, scale.data_ptr<float>(), nullptr, nullptr};
  if (zero.has_value()) {
    TORCH_CHECK((zero->scalar_type() == at::kChar || zero->scalar_type() == at::kFloat) && zero->is_contiguous() &&
                    zero->sizes() == scale.sizes(),
                "zero must be contiguous int8 (zero points) or float32 (offsets) shaped like scale");
    if (zero->scalar_type() == at::kChar) {
      w.zero = zero->data_ptr<int8_t>();
    } else {
      w.offset = zero->data_ptr<float>();
    }
  }
  return w;
}

// Decoders: load one row's unit, then produce its 16-column vectors J = 0 .. kVectors - 1 as fp32 weights,
// given per-group state prepared once per row and group.
struct Lut4 {
  static constexpr int64_t kUnitCols = 128, kUnitBytes = 64, kVectors = 8;
  __m512 lut;
  struct Group {
    __m512 table;  // the 16 weights (lut - zero) * scale, or lut * scale + offset
  };
  INFOPT_INLINE Group group(const Weight& w, int64_t t, int64_t g, int64_t r) const {
    const int64_t i = w.param(t, g, r);
    if (w.offset != nullptr) {
      return {_mm512_add_ps(_mm512_mul_ps(lut, _mm512_set1_ps(w.scale[i])), _mm512_set1_ps(w.offset[i]))};
    }
    const __m512 shifted = _mm512_sub_ps(lut, _mm512_set1_ps(w.zero_at(i)));
    return {_mm512_mul_ps(shifted, _mm512_set1_ps(w.scale[i]))};
  }
  INFOPT_INLINE static __m512i load(const uint8_t* unit) { return _mm512_loadu_si512(unit); }
  template <int J>
  INFOPT_INLINE static __m512 vec(__m512i raw, const Group& grp) {
    const __m512i idx = J == 0 ? raw : _mm512_srli_epi32(raw, 4 * J);
    return _mm512_permutexvar_ps(idx, grp.table);
  }
};

// How an int8 code becomes a weight: code * scale, (code - zero) * scale, or code * scale + offset.
enum class Shift { kNone, kZero, kOffset };

template <Shift kShift>
struct Int8 {
  static constexpr int64_t kUnitCols = 32, kUnitBytes = 32, kVectors = 2;
  struct Group {
    __m512 scale, shift;
  };
  INFOPT_INLINE Group group(const Weight& w, int64_t t, int64_t g, int64_t r) const {
    const int64_t i = w.param(t, g, r);
    return {_mm512_set1_ps(w.scale[i]), _mm512_set1_ps(kShift == Shift::kOffset ? w.offset[i] : w.zero_at(i))};
  }
  INFOPT_INLINE static const uint8_t* load(const uint8_t* unit) { return unit; }
  template <int J>
  INFOPT_INLINE static __m512 vec(const uint8_t* unit, const Group& grp) {
    const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 16 * J));
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
    if constexpr (kShift == Shift::kZero) return _mm512_mul_ps(_mm512_sub_ps(v, grp.shift), grp.scale);
    if constexpr (kShift == Shift::kOffset) return _mm512_add_ps(_mm512_mul_ps(v, grp.scale), grp.shift);
    return _mm512_mul_ps(v, grp.scale);
  }
};

// The int8 product or decoder f(decoder) for w's kind of shift.
template <typename F>
auto with_int8_decoder(const Weight& w, F f) {
  if (w.offset != nullptr) return f(Int8<Shift::kOffset>{});
  if (w.zero != nullptr) return f(Int8<Shift::kZero>{});
  return f(Int8<Shift::kNone>{});
}

// Accumulators for R rows x NB activation rows. One activation row gets a second set (odd vectors) so that 8
// independent FMA chains are in flight. The choice depends on NB only, so a row's summation order (and result)
// does not depend on how rows are split between threads or register tiles. All indices are compile-time
// constants (unroll) so that the accumulators stay in registers.
template <int R, int NB>
struct Acc {
  static constexpr bool kSplit = NB == 1;
  __m512 a[R][NB];
  __m512 b[R][NB];

  Acc() {
    unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE {
      unroll<NB>([&](auto n) INFOPT_LAMBDA_INLINE { a[r][n] = b[r][n] = _mm512_setzero_ps(); });
    });
  }

  // acc[r][n] += wv[r] * x[n][col : col + 16]: each activation vector is loaded once for all R rows.
  template <bool kOdd>
  INFOPT_INLINE void fma(const __m512 (&wv)[R], const float* x, int64_t ldx, int64_t col) {
    unroll<NB>([&](auto n) INFOPT_LAMBDA_INLINE {
      const __m512 xv = _mm512_loadu_ps(x + n * ldx + col);
      unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE {
        if constexpr (kSplit && kOdd) {
          b[r][n] = _mm512_fmadd_ps(wv[r], xv, b[r][n]);
        } else {
          a[r][n] = _mm512_fmadd_ps(wv[r], xv, a[r][n]);
        }
      });
    });
  }

  // y[n, row0 + r] for the rows below `out` (padding rows are dropped).
  INFOPT_INLINE void store(float* y, int64_t ldy, int64_t row0, int64_t out) {
    for (int r = 0; r < R; ++r) {
      if (row0 + r >= out) break;
      for (int n = 0; n < NB; ++n) {
        const __m512 v = kSplit ? _mm512_add_ps(a[r][n], b[r][n]) : a[r][n];
        y[n * ldy + row0 + r] = _mm512_reduce_add_ps(v);
      }
    }
  }
};

// The R = 4 rows of tile t times activation rows 0 .. NB - 1 of x. GPU = groups per unit: 1 when a group
// spans whole units (its state is built once per group), else 2 or 4 (lut4 with groups of 64 or 32 columns).
// Per 16-column vector: decode it for the R rows, then one activation load feeds R FMAs.
template <int R, int NB, int GPU, typename Dec>
void tile_dot(const Weight& w, const Dec& dec, int64_t t, const float* x, int64_t ldx, float* y) {
  constexpr int V = Dec::kVectors;
  Acc<R, NB> acc;
  const int64_t units = w.in_pad / Dec::kUnitCols;
  const int64_t units_per_step = GPU == 1 ? w.group_size / Dec::kUnitCols : 1;
  for (int64_t u0 = 0; u0 < units; u0 += units_per_step) {
    typename Dec::Group grp[R][GPU];
    const int64_t g0 = u0 * Dec::kUnitCols / w.group_size;
    unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE {
      unroll<GPU>([&](auto k) INFOPT_LAMBDA_INLINE { grp[r][k] = dec.group(w, t, g0 + k, r); });
    });
    for (int64_t u = u0; u < u0 + units_per_step; ++u) {
      decltype(Dec::load(nullptr)) raw[R];
      unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE { raw[r] = Dec::load(w.unit(t, u, r)); });
      // The tile-unit kPrefetchBytes further down the stream (prefetches never fault past the end).
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(w.unit(t, u, 0)) + kPrefetchBytes;
      unroll<kRows * Dec::kUnitBytes / 64>([&](auto l) INFOPT_LAMBDA_INLINE {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * l), _MM_HINT_T0);
      });
      unroll<V>([&](auto j) INFOPT_LAMBDA_INLINE {
        constexpr int J = decltype(j)::value;
        __m512 wv[R];
        unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE { wv[r] = Dec::template vec<J>(raw[r], grp[r][J * GPU / V]); });
        acc.template fma<(J & 1) == 1>(wv, x, ldx, u * Dec::kUnitCols + 16 * J);
      });
    }
  }
  acc.store(y, w.out, t * kRows, w.out);
}

// Calls f(std::integral_constant<int, NB>) with NB = n in 1..kMax.
template <int kMax, typename F>
void with_batch(int64_t n, F f) {
  static_assert(kMax == 4 || kMax == 6);
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: if constexpr (kMax >= 5) f(std::integral_constant<int, 5>{}); break;
    default: if constexpr (kMax >= 6) f(std::integral_constant<int, 6>{}); break;
  }
}

// Runs tiles [0, tiles) of tile_bytes weight bytes each against slices of up to kMax activation rows, in parallel
// over tiles (at least ~64 KiB of weight per task, so small layers stay on one thread): tile(NB constant, t, first
// activation row). With more than kMax activation rows the slices loop inside chunks of tiles (kChunkBytes), so
// slices after the first re-read those weight bytes from L2 rather than memory.
template <int kMax, typename F>
void for_tiles(int64_t tiles, int64_t tile_bytes, int64_t rows, F tile) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / tile_bytes);
  const int64_t chunk = rows <= kMax ? tiles : std::max<int64_t>(1, kChunkBytes / tile_bytes);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t c0 = t0; c0 < t1; c0 += chunk) {
      const int64_t c1 = std::min(t1, c0 + chunk);
      for (int64_t b0 = 0; b0 < rows; b0 += kMax) {
        with_batch<kMax>(std::min<int64_t>(kMax, rows - b0), [&](auto nb) {
          for (int64_t t = c0; t < c1; ++t) tile(nb, t, b0);
        });
      }
    }
  });
}

template <int GPU, typename Dec>
at::Tensor drive(const Weight& w, const Activations& x, const Dec& dec) {
  at::Tensor y = at::empty({x.rows, w.out}, at::TensorOptions().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (x.rows == 0 || w.out == 0) return y;
  for_tiles<kBatchTile>(w.tiles, w.tile_bytes, x.rows, [&](auto nb, int64_t t, int64_t b0) {
    constexpr int NB = decltype(nb)::value;
    tile_dot<kRows, NB, GPU>(w, dec, t, x.data + b0 * x.ld, x.ld, yp + b0 * w.out);
  });
  return y;
}

// Dense weights, fp32 or bf16 [out, in] row-major as nn.Linear holds them (no repacking): a tile is 4 row
// streams read side by side. Memory-bound like the quantized kernels; it exists because torch's fp32 GEMM here
// (MKL without an AVX-512 path on this AMD CPU) runs 2-8 token products at about half its 1-token bandwidth, which
// made verifying a speculative draft cost two decode steps.
INFOPT_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
INFOPT_INLINE __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is exact: the bits move up 16 places
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// Per row stream; 4 streams x 2 KiB ahead is the 8 KiB the tiled layouts prefetch.
constexpr int64_t kDensePrefetchBytes = 2048;
// Without decoding work, 4 rows x 6 tokens (24 accumulators) fit the 32 registers and cover a K=5 speculative check.
constexpr int kDenseBatchTile = 6;

template <int NB, typename T>
void dense_tile(const T* w, int64_t in, int64_t out, int64_t t, const float* x, float* y) {
  constexpr int R = kRows;
  const T* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = w + std::min(t * R + r, out - 1) * in;  // padding rows repeat the last
  Acc<R, NB> acc;
  auto step = [&](int64_t col, auto odd) INFOPT_LAMBDA_INLINE {
    __m512 wv[R];
    unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE { wv[r] = load16(rows[r] + col); });
    acc.template fma<decltype(odd)::value>(wv, x, in, col);
  };
  int64_t col = 0;
  for (; col + 32 <= in; col += 32) {
    unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE {
      const char* ahead = reinterpret_cast<const char*>(rows[r] + col) + kDensePrefetchBytes;
      for (int64_t b = 0; b < int64_t{32} * int64_t{sizeof(T)}; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    });
    step(col, std::false_type{});
    step(col + 16, std::true_type{});
  }
  if (col < in) step(col, std::false_type{});
  acc.store(y, out, t * R, out);
}

at::Tensor dense_mm(const at::Tensor& x_in, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(),
              "weight must be a contiguous 2-D CPU tensor [out_features, in_features]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "dense weight must be float32 or bfloat16");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(in % 16 == 0, "dense kernel needs in_features divisible by 16");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == in, "x must be [tokens, in_features] matching the weight");
  const Activations x = prepare(x_in, in, std::nullopt);
  at::Tensor y = at::empty({x.rows, out}, at::TensorOptions().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (x.rows == 0 || out == 0) return y;
  const int64_t tiles = (out + kRows - 1) / kRows;
  const int64_t tile_bytes = kRows * in * static_cast<int64_t>(weight.element_size());
  auto run = [&](const auto* w) {
    for_tiles<kDenseBatchTile>(tiles, tile_bytes, x.rows, [&](auto nb, int64_t t, int64_t b0) {
      constexpr int NB = decltype(nb)::value;
      dense_tile<NB>(w, in, out, t, x.data + b0 * in, yp + b0 * out);
    });
  };
  if (weight.scalar_type() == at::kFloat) {
    run(weight.data_ptr<float>());
  } else {
    run(weight.data_ptr<c10::BFloat16>());
  }
  return y;
}

#ifdef INFOPT_VNNI
// int4 weights x int8 activations (W4A8), for linear int codes (lut[i] = i - 8) in groups of whole 128-column
// units: the activations of each token are quantized per unit to int8 with a scale amax / 127 (rounded to nearest
// even; the scheme llama.cpp's CPU path uses with its 8-bit activation blocks), and AVX512-VNNI's vpdpbusd
// multiplies 64 unsigned 4-bit indices by 64 signed 8-bit activations per instruction, 4 products summed per
// 32-bit lane. Per row and unit: sum_k (index_k - c) * x8_k in int32 with c = 8 + zero, then times
// scale * activation scale in fp32. Not exact like the kernels above (the activations are rounded to 8 bits).
//
// The unit's 16 dwords hold nibble j of dword l at column 16j + l, so "bytes & 0x0F" puts in byte b of lane l
// the index of column 32b + l, and "(bytes >> 4) & 0x0F" the index of column 32b + 16 + l. The activations are
// laid out to match, once per call: per token and unit 64 bytes "lo" (lane l, byte b = x8[32b + l]), 64 bytes
// "hi" (x8[32b + 16 + l]) and 16 int32 lanes of -sum(x8) over those 8 columns (for the zero-point correction,
// c * sum(x8), through vpmaddwd: the sums fit 16 bits and c's upper 16 bits are 0).
constexpr int64_t kA8UnitBytes = 192;

struct QuantizedActivations {
  at::Tensor bytes;  // [rows, units, kA8UnitBytes]
  at::Tensor scale;  // fp32 [rows, units]
  int64_t units;
};

QuantizedActivations quantize_activations(const Activations& x) {
  const int64_t units = x.ld / Lut4::kUnitCols;
  QuantizedActivations q{at::empty({x.rows, units, kA8UnitBytes}, at::TensorOptions().dtype(at::kByte)),
                         at::empty({x.rows, units}, at::TensorOptions().dtype(at::kFloat)), units};
  uint8_t* out = q.bytes.data_ptr<uint8_t>();
  float* scale = q.scale.data_ptr<float>();
  const __m512i byte = _mm512_set1_epi32(0xFF);
  for (int64_t b = 0; b < x.rows; ++b) {
    for (int64_t u = 0; u < units; ++u) {
      const float* src = x.data + b * x.ld + u * Lut4::kUnitCols;
      __m512 v[8];
      __m512 amax = _mm512_setzero_ps();
      for (int j = 0; j < 8; ++j) {
        v[j] = _mm512_loadu_ps(src + 16 * j);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[j]));
      }
      const float m = _mm512_reduce_max_ps(amax);
      const __m512 inv = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
      __m512i c[8];
      __m512i sum = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        c[j] = _mm512_cvtps_epi32(_mm512_mul_ps(v[j], inv));  // round to nearest even (default MXCSR)
        sum = _mm512_add_epi32(sum, c[j]);
      }
      __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
      for (int k = 0; k < 4; ++k) {
        lo = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_and_si512(c[2 * k], byte), 8 * k));
        hi = _mm512_or_si512(hi, _mm512_slli_epi32(_mm512_and_si512(c[2 * k + 1], byte), 8 * k));
      }
      uint8_t* dst = out + (b * units + u) * kA8UnitBytes;
      _mm512_storeu_si512(dst, lo);
      _mm512_storeu_si512(dst + 64, hi);
      _mm512_storeu_si512(dst + 128, _mm512_sub_epi32(_mm512_setzero_si512(), sum));
      scale[b * units + u] = m / 127.0f;
    }
  }
  return q;
}

template <int NB>
void tile_dot_a8(const Weight& w, int64_t t, const uint8_t* xq, const float* xs, int64_t units, float* y) {
  constexpr int R = kRows;
  __m512 acc[R][NB];
  unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE {
    unroll<NB>([&](auto n) INFOPT_LAMBDA_INLINE { acc[r][n] = _mm512_setzero_ps(); });
  });
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t units_per_group = w.group_size / Lut4::kUnitCols;
  for (int64_t u = 0; u < units; ++u) {
    const int64_t g = u / units_per_group;
    __m512i lo[R], hi[R], c[R];
    __m512 s[R];
    unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE {
      const __m512i raw = _mm512_loadu_si512(w.unit(t, u, r));
      lo[r] = _mm512_and_si512(raw, low4);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      const int64_t i = w.param(t, g, r);
      c[r] = _mm512_set1_epi32(8 + (w.zero == nullptr ? 0 : w.zero[i]));
      s[r] = _mm512_set1_ps(w.scale[i]);
    });
    const uintptr_t ahead = reinterpret_cast<uintptr_t>(w.unit(t, u, 0)) + kPrefetchBytes;
    unroll<kRows * Lut4::kUnitBytes / 64>([&](auto l) INFOPT_LAMBDA_INLINE {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * l), _MM_HINT_T0);
    });
    unroll<NB>([&](auto n) INFOPT_LAMBDA_INLINE {
      const uint8_t* a = xq + (n * units + u) * kA8UnitBytes;
      const __m512i xlo = _mm512_loadu_si512(a), xhi = _mm512_loadu_si512(a + 64);
      const __m512i neg_sum = _mm512_loadu_si512(a + 128);
      const __m512 sx = _mm512_set1_ps(xs[n * units + u]);
      unroll<R>([&](auto r) INFOPT_LAMBDA_INLINE {
        __m512i dot = _mm512_madd_epi16(neg_sum, c[r]);  // -c * sum(x8), per lane
        dot = _mm512_dpbusd_epi32(dot, lo[r], xlo);
        dot = _mm512_dpbusd_epi32(dot, hi[r], xhi);
        acc[r][n] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), sx), s[r], acc[r][n]);
      });
    });
  }
  for (int r = 0; r < R; ++r) {
    if (t * R + r >= w.out) break;
    for (int n = 0; n < NB; ++n) y[n * w.out + t * R + r] = _mm512_reduce_add_ps(acc[r][n]);
  }
}
#endif

at::Tensor lut4_mm_a8(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale,
                      const std::optional<at::Tensor>& zero, int64_t group_size, int64_t out_features,
                      const std::optional<at::Tensor>& perm) {
#ifdef INFOPT_VNNI
  TORCH_CHECK(packed.scalar_type() == at::kByte, "lut4 data must be uint8");
  const Weight w = describe(packed, Lut4::kUnitCols, Lut4::kUnitBytes, scale, zero, group_size, out_features);
  TORCH_CHECK(w.group_size % Lut4::kUnitCols == 0, "int8-activation products need groups of whole 128-column units");
  TORCH_CHECK(w.offset == nullptr, "int8-activation products take zero points, not float offsets");
  const QuantizedActivations q = quantize_activations(prepare(x_in, w.in_pad, perm));
  const int64_t rows = x_in.size(0);
  at::Tensor y = at::empty({rows, w.out}, at::TensorOptions().dtype(at::kFloat));
  if (rows == 0 || w.out == 0) return y;
  const uint8_t* xq = q.bytes.data_ptr<uint8_t>();
  const float* xs = q.scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_tiles<kBatchTile>(w.tiles, w.tile_bytes, rows, [&](auto nb, int64_t t, int64_t b0) {
    constexpr int NB = decltype(nb)::value;
    tile_dot_a8<NB>(w, t, xq + b0 * q.units * kA8UnitBytes, xs + b0 * q.units, q.units, yp + b0 * w.out);
  });
  return y;
#else
  TORCH_CHECK(false, "this build of the infopt kernels has no AVX512-VNNI int8-activation path");
#endif
}

// Dequantized fp32 rows [row0, row1) in packed column order, [row1 - row0, in_pad]: lets large batches go
// through a dense GEMM tile by tile.
template <typename Dec>
at::Tensor dequant_rows(const Weight& w, const Dec& dec, int64_t row0, int64_t row1) {
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 <= w.out, "row range out of bounds");
  constexpr int V = Dec::kVectors;
  at::Tensor out = at::empty({row1 - row0, w.in_pad}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) * kRows / w.tile_bytes);
  at::parallel_for(row0, row1, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / kRows, r = row % kRows;
      float* dst = op + (row - row0) * w.in_pad;
      for (int64_t u = 0; u < w.in_pad / Dec::kUnitCols; ++u) {
        const auto raw = Dec::load(w.unit(t, u, r));
        unroll<V>([&](auto j) INFOPT_LAMBDA_INLINE {
          constexpr int J = decltype(j)::value;
          const int64_t col = u * Dec::kUnitCols + 16 * J;
          _mm512_storeu_ps(dst + col, Dec::template vec<J>(raw, dec.group(w, t, col / w.group_size, r)));
        });
      }
    }
  });
  return out;
}

// Groups per unit for the tile_dot template: 1 when groups span whole units.
int64_t groups_per_unit(const Weight& w, int64_t unit_cols) {
  return w.group_size >= unit_cols ? 1 : unit_cols / w.group_size;
}

Lut4 lut4_decoder(const at::Tensor& lut) {
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.is_contiguous() && lut.numel() == 16,
              "lut must be 16 contiguous float32 values");
  return {_mm512_loadu_ps(lut.data_ptr<float>())};
}

Weight describe_lut4(const at::Tensor& packed, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                     int64_t group_size, int64_t out) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "lut4 data must be uint8");
  return describe(packed, Lut4::kUnitCols, Lut4::kUnitBytes, scale, zero, group_size, out);
}

Weight describe_int8(const at::Tensor& codes, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                     int64_t group_size, int64_t out) {
  TORCH_CHECK(codes.scalar_type() == at::kChar, "int8 data must be int8");
  return describe(codes, Int8<Shift::kNone>::kUnitCols, Int8<Shift::kNone>::kUnitBytes, scale, zero, group_size, out);
}

at::Tensor lut4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const std::optional<at::Tensor>& zero, const at::Tensor& lut, int64_t group_size,
                   int64_t out_features, const std::optional<at::Tensor>& perm) {
  const Weight w = describe_lut4(packed, scale, zero, group_size, out_features);
  const Activations a = prepare(x, w.in_pad, perm);
  const Lut4 dec = lut4_decoder(lut);
  switch (groups_per_unit(w, Lut4::kUnitCols)) {
    case 1: return drive<1>(w, a, dec);
    case 2: return drive<2>(w, a, dec);
    case 4: return drive<4>(w, a, dec);
    default: TORCH_CHECK(false, "lut4 groups must be 32, 64 or a multiple of 128 columns");
  }
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                   const std::optional<at::Tensor>& zero, int64_t group_size, int64_t out_features,
                   const std::optional<at::Tensor>& perm) {
  const Weight w = describe_int8(codes, scale, zero, group_size, out_features);
  const int64_t per_unit = groups_per_unit(w, Int8<Shift::kNone>::kUnitCols);
  TORCH_CHECK(per_unit == 1 || per_unit == 2, "int8 groups must be 16 columns or a multiple of 32");
  const Activations a = prepare(x, w.in_pad, perm);
  return with_int8_decoder(w, [&](auto dec) { return per_unit == 1 ? drive<1>(w, a, dec) : drive<2>(w, a, dec); });
}

at::Tensor lut4_dequant(const at::Tensor& packed, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                        const at::Tensor& lut, int64_t group_size, int64_t out_features, int64_t row0, int64_t row1) {
  const Weight w = describe_lut4(packed, scale, zero, group_size, out_features);
  return dequant_rows(w, lut4_decoder(lut), row0, row1);
}

at::Tensor int8_dequant(const at::Tensor& codes, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                        int64_t group_size, int64_t out_features, int64_t row0, int64_t row1) {
  const Weight w = describe_int8(codes, scale, zero, group_size, out_features);
  return with_int8_decoder(w, [&](auto dec) { return dequant_rows(w, dec, row0, row1); });
}

}  // namespace

// The products for decode_ops.cpp's layer loop (declared there): direct calls, no dispatcher round trip.
namespace infopt {
at::Tensor dense_product(const at::Tensor& x, const at::Tensor& weight) { return dense_mm(x, weight); }
at::Tensor lut4_product(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                        const std::optional<at::Tensor>& zero, const at::Tensor& lut, int64_t group_size,
                        int64_t out_features, const std::optional<at::Tensor>& perm) {
  return lut4_mm(x, packed, scale, zero, lut, group_size, out_features, perm);
}
at::Tensor int8_product(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const std::optional<at::Tensor>& zero, int64_t group_size, int64_t out_features,
                        const std::optional<at::Tensor>& perm) {
  return int8_mm(x, codes, scale, zero, group_size, out_features, perm);
}
at::Tensor lut4_a8_product(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero, int64_t group_size, int64_t out_features,
                           const std::optional<at::Tensor>& perm) {
  return lut4_mm_a8(x, packed, scale, zero, group_size, out_features, perm);
}
}  // namespace infopt

TORCH_LIBRARY(infopt_kernels, m) {
  m.def("lut4_mm", &lut4_mm);
  m.def("int8_mm", &int8_mm);
  m.def("lut4_dequant", &lut4_dequant);
  m.def("int8_dequant", &int8_dequant);
  m.def("dense_mm", &dense_mm);
  m.def("lut4_mm_a8", &lut4_mm_a8);
}
