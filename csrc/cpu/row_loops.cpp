// Row loops of the CPU kernels (see row_loops.h for the column order of the side rows).
//
// Portable loops are plain C++ the compiler vectorizes, built for AVX2+FMA+F16C and for the baseline (the
// loader picks one per machine). On machines with AVX2, FMA and F16C, float32, float16 and bfloat16 rows take
// the hand-written loops below instead: the compiler leaves c10's float16 and bfloat16 conversions scalar, and
// it does not emit the non-temporal stores that big outputs want (stream_output).
#include "row_loops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "embedfast/kernel_math.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EMBEDFAST_AVX2_LOOPS 1
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EMBEDFAST_ROW_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EMBEDFAST_ROW_KERNEL
#endif

namespace embedfast {
namespace {

// Outputs at least this big are written around the caches: they cannot stay cached for the next operator
// anyway, and ordinary stores would first read every output line (a third more memory traffic in the forward)
// and evict the position rows the loop reuses.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;

template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void combine_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ token, const acc_t* __restrict__ position,
                        const acc_t* __restrict__ segment, acc_t scale, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    out[j] = static_cast<scalar_t>(combine(static_cast<acc_t>(token[j]), scale, position[j], segment[j]));
  }
}

template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void scale_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ grad, acc_t scale, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    out[j] = static_cast<scalar_t>(static_cast<acc_t>(grad[j]) * scale);
  }
}

template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void scale_and_accumulate_row(scalar_t* __restrict__ out, acc_t* __restrict__ acc, const scalar_t* __restrict__ grad,
                                     acc_t scale, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    const acc_t value = static_cast<acc_t>(grad[j]);
    out[j] = static_cast<scalar_t>(value * scale);
    acc[j] += value;
  }
}

template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void accumulate_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ grad, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    acc[j] += static_cast<acc_t>(grad[j]);
  }
}

template <typename out_t>
inline void rotate_row_impl(out_t* __restrict__ row, double* __restrict__ sine, double* __restrict__ cosine,
                            const double* __restrict__ step_sin, const double* __restrict__ step_cos, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    row[j] = static_cast<out_t>(sine[j]);
    const double next_sine = sine[j] * step_cos[j] + cosine[j] * step_sin[j];
    cosine[j] = cosine[j] * step_cos[j] - sine[j] * step_sin[j];
    sine[j] = next_sine;
  }
}

// Either the scaled values, the sums, or both (the AVX2 loops' tails and the portable fallback).
template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void scale_or_accumulate_row(scalar_t* out, acc_t* acc, const scalar_t* grad, acc_t scale, int64_t dim) {
  if (out != nullptr && acc != nullptr) {
    scale_and_accumulate_row(out, acc, grad, scale, dim);
  } else if (out != nullptr) {
    scale_row(out, grad, scale, dim);
  } else {
    accumulate_row(acc, grad, dim);
  }
}

constexpr int64_t kBlock = 16;  // columns per AVX2 step: two float32 vectors

#ifdef EMBEDFAST_AVX2_LOOPS
bool has_avx2() {
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
}

namespace avx2 {
#define EMBEDFAST_AVX2 __attribute__((target("avx2,fma,f16c")))

// 16 columns as two float32 vectors: columns 0-7 and 8-15 of a float32 or float16 row; of a bfloat16 row, the
// lane order 0-3, 8-11 and 4-7, 12-15 (row_loops.h).
struct Block {
  __m256 lo, hi;
};

EMBEDFAST_AVX2 inline Block load(const float* row) { return {_mm256_loadu_ps(row), _mm256_loadu_ps(row + 8)}; }

EMBEDFAST_AVX2 inline Block load(const c10::Half* row) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8)))};
}

// Unpacking with zeros puts each bfloat16 in the high half of a float32 lane: the exact value, no arithmetic.
EMBEDFAST_AVX2 inline Block load(const c10::BFloat16* row) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
  const __m256i zero = _mm256_setzero_si256();
  return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits))};
}

template <bool kStream>
EMBEDFAST_AVX2 inline void store(float* row, Block block) {
  if (kStream) {
    _mm256_stream_ps(row, block.lo);
    _mm256_stream_ps(row + 8, block.hi);
  } else {
    _mm256_storeu_ps(row, block.lo);
    _mm256_storeu_ps(row + 8, block.hi);
  }
}

// F16C rounds to nearest even and keeps NaNs, as c10::Half does
template <bool kStream>
EMBEDFAST_AVX2 inline void store(c10::Half* row, Block block) {
  constexpr int kRounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m128i lo = _mm256_cvtps_ph(block.lo, kRounding), hi = _mm256_cvtps_ph(block.hi, kRounding);
  if (kStream) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(row), lo);
    _mm_stream_si128(reinterpret_cast<__m128i*>(row + 8), hi);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 8), hi);
  }
}

// Round to nearest even, as c10::BFloat16 does, without its NaN test: every NaN these loops can produce has zero
// low 16 bits (it comes from a bfloat16 input, from a canonical NaN scale, or is the default NaN of an invalid
// operation), so the increment (at most 0x8000) cannot carry out of them and a NaN stays a NaN.
EMBEDFAST_AVX2 inline __m256i rounded_high_halves(__m256 values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
}

// Packing is the inverse of load's unpacking: the columns come back in natural order.
template <bool kStream>
EMBEDFAST_AVX2 inline void store(c10::BFloat16* row, Block block) {
  const __m256i packed = _mm256_packus_epi32(rounded_high_halves(block.lo), rounded_high_halves(block.hi));
  if (kStream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(row), packed);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), packed);
  }
}

EMBEDFAST_AVX2 inline __m256 load8(const float* side) { return _mm256_loadu_ps(side); }

EMBEDFAST_AVX2 inline void add_to(float* acc, __m256 values) { _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), values)); }

inline float canonical(float scale) { return std::isnan(scale) ? std::numeric_limits<float>::quiet_NaN() : scale; }

// combine(), with the multiply and the position add fused
template <bool kStream, typename scalar_t>
EMBEDFAST_AVX2 void combine_rows(scalar_t* out, const scalar_t* token, const float* position, const float* segment,
                                 float scale, int64_t dim) {
  const __m256 factor = _mm256_set1_ps(canonical(scale));
  int64_t j = 0;
  for (; j + kBlock <= dim; j += kBlock) {
    const Block t = load(token + j);
    store<kStream>(out + j, {_mm256_add_ps(_mm256_fmadd_ps(t.lo, factor, load8(position + j)), load8(segment + j)),
                             _mm256_add_ps(_mm256_fmadd_ps(t.hi, factor, load8(position + j + 8)), load8(segment + j + 8))});
  }
  combine_row(out + j, token + j, position + j, segment + j, scale, dim - j);
}

template <bool kStream, typename scalar_t>
EMBEDFAST_AVX2 void scale_or_accumulate_rows(scalar_t* out, float* acc, const scalar_t* grad, float scale, int64_t dim) {
  const __m256 factor = _mm256_set1_ps(canonical(scale));
  int64_t j = 0;
  for (; j + kBlock <= dim; j += kBlock) {
    const Block g = load(grad + j);
    if (out != nullptr) store<kStream>(out + j, {_mm256_mul_ps(g.lo, factor), _mm256_mul_ps(g.hi, factor)});
    if (acc != nullptr) {
      add_to(acc + j, g.lo);
      add_to(acc + j + 8, g.hi);
    }
  }
  scale_or_accumulate_row(out == nullptr ? nullptr : out + j, acc == nullptr ? nullptr : acc + j, grad + j, scale, dim - j);
}

// whole blocks only: dim is a multiple of kBlock
EMBEDFAST_AVX2 void widen_blocks(float* out, const c10::BFloat16* row, int64_t dim) {
  for (int64_t j = 0; j < dim; j += kBlock) store<false>(out + j, load(row + j));
}
#undef EMBEDFAST_AVX2
}  // namespace avx2

// Streamed stores need 16- or 32-byte alignment; every block of a row keeps its start's alignment.
template <typename scalar_t>
bool can_stream(const scalar_t* row, bool stream) {
  return stream && reinterpret_cast<uintptr_t>(row) % 32 == 0;
}
#else
bool has_avx2() { return false; }
#endif

}  // namespace

SideRowLayout::SideRowLayout(at::ScalarType storage, int64_t dim)
    : columns_(dim), natural_(!(storage == at::kBFloat16 && has_avx2())) {
  for (int64_t j = 0; j < dim; ++j) columns_[j] = j;
  if (!natural_) {
    for (int64_t block = 0; block + kBlock <= dim; block += kBlock) {
      std::swap_ranges(columns_.begin() + block + 4, columns_.begin() + block + 8, columns_.begin() + block + 8);
    }
  }
}

at::Tensor SideRowLayout::side_rows(const at::Tensor& table, at::ScalarType math_dtype) const {
  if (natural_) return table.to(math_dtype).contiguous();
  const at::Tensor source = table.contiguous();
  at::Tensor rows = at::empty(source.sizes(), source.options().dtype(at::kFloat));
  const int64_t width = dim();
  const auto* in = source.data_ptr<c10::BFloat16>();
  float* out = rows.data_ptr<float>();
  at::parallel_for(0, source.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t whole = width - width % kBlock;  // the lane order covers whole blocks; the tail is natural
#ifdef EMBEDFAST_AVX2_LOOPS
      avx2::widen_blocks(out + r * width, in + r * width, whole);
#endif
      for (int64_t j = whole; j < width; ++j) out[r * width + j] = static_cast<float>(in[r * width + j]);
    }
  });
  return rows;
}

bool stream_output(int64_t bytes) { return bytes >= kStreamMinBytes; }

void end_streaming() {
#ifdef EMBEDFAST_AVX2_LOOPS
  _mm_sfence();
#endif
}

// float64 rows (gradcheck): the portable loops only
EMBEDFAST_ROW_KERNEL void combine_rows(double* out, const double* token, const double* position, const double* segment,
                                       double scale, int64_t dim, bool) {
  combine_row(out, token, position, segment, scale, dim);
}

EMBEDFAST_ROW_KERNEL void scale_or_accumulate_rows(double* out, double* acc, const double* grad, double scale,
                                                   int64_t dim, bool) {
  scale_or_accumulate_row(out, acc, grad, scale, dim);
}

// float32, float16 and bfloat16 rows: the AVX2 loops where the machine has them
#ifdef EMBEDFAST_AVX2_LOOPS
#define EMBEDFAST_AVX2_OR_PORTABLE(loop, out, ...)                                   \
  if (has_avx2()) {                                                                   \
    if (can_stream(out, stream)) return avx2::loop<true>(out, __VA_ARGS__);           \
    return avx2::loop<false>(out, __VA_ARGS__);                                       \
  }
#else
#define EMBEDFAST_AVX2_OR_PORTABLE(loop, out, ...)
#endif

#define EMBEDFAST_AVX2_ROW_LOOPS(scalar_t)                                                                            \
  void combine_rows(scalar_t* out, const scalar_t* token, const float* position, const float* segment, float scale,   \
                    int64_t dim, bool stream) {                                                                       \
    EMBEDFAST_AVX2_OR_PORTABLE(combine_rows, out, token, position, segment, scale, dim)                               \
    combine_row(out, token, position, segment, scale, dim);                                                            \
  }                                                                                                                    \
  void scale_or_accumulate_rows(scalar_t* out, float* acc, const scalar_t* grad, float scale, int64_t dim,             \
                                bool stream) {                                                                        \
    EMBEDFAST_AVX2_OR_PORTABLE(scale_or_accumulate_rows, out, acc, grad, scale, dim)                                  \
    scale_or_accumulate_row(out, acc, grad, scale, dim);                                                               \
  }

EMBEDFAST_AVX2_ROW_LOOPS(float)
EMBEDFAST_AVX2_ROW_LOOPS(c10::Half)
EMBEDFAST_AVX2_ROW_LOOPS(c10::BFloat16)
#undef EMBEDFAST_AVX2_ROW_LOOPS
#undef EMBEDFAST_AVX2_OR_PORTABLE

EMBEDFAST_ROW_KERNEL void rotate_row(float* row, double* sine, double* cosine, const double* step_sin,
                                     const double* step_cos, int64_t dim) {
  rotate_row_impl(row, sine, cosine, step_sin, step_cos, dim);
}

EMBEDFAST_ROW_KERNEL void rotate_row(double* row, double* sine, double* cosine, const double* step_sin,
                                     const double* step_cos, int64_t dim) {
  rotate_row_impl(row, sine, cosine, step_sin, step_cos, dim);
}

}  // namespace embedfast
