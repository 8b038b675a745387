// The row loops for AVX2 + FMA + F16C (CpuIsa::kAvx2): 16 columns per block, as two float32 vectors.
//
// bfloat16 rows are widened by unpacking with zeros, which puts each value in the high half of a float32 lane
// (exact, no arithmetic) and leaves, per block, columns 0-3, 8-11 in the first vector and 4-7, 12-15 in the
// second; packing undoes that order with no permute. Side rows are kept in the same lane order (row_loops.h).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "row_loops.h"
#include "row_loops_portable.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace embedfast {
namespace avx2 {
namespace {

// Round to nearest even, as c10::BFloat16 does, without its NaN test: every NaN these loops can produce has zero
// low 16 bits (it comes from a bfloat16 input, from a canonical NaN scale, or is the default NaN of an invalid
// operation), so the increment (at most 0x8000) cannot carry out of them and a NaN stays a NaN.
inline __m256i rounded_high_halves(__m256 values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
}

struct Simd {
  static constexpr int64_t kBlock = 16;
  static constexpr uintptr_t kStreamAlignment = 32;
  struct Block {
    __m256 lo, hi;
  };

  static __m256 broadcast(float value) { return _mm256_set1_ps(value); }
  static Block zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Block fmadd(Block a, __m256 b, Block c) { return {_mm256_fmadd_ps(a.lo, b, c.lo), _mm256_fmadd_ps(a.hi, b, c.hi)}; }
  static Block fmadd(Block a, Block b, Block c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static Block fnmadd(Block a, __m256 b, Block c) { return {_mm256_fnmadd_ps(a.lo, b, c.lo), _mm256_fnmadd_ps(a.hi, b, c.hi)}; }
  static Block add(Block a, Block b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  static Block sub(Block a, __m256 b) { return {_mm256_sub_ps(a.lo, b), _mm256_sub_ps(a.hi, b)}; }
  static Block mul(Block a, __m256 b) { return {_mm256_mul_ps(a.lo, b), _mm256_mul_ps(a.hi, b)}; }
  static Block mul(Block a, Block b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  // the sum of the lanes, in a fixed order
  static float sum(Block a) {
    const __m256 eight = _mm256_add_ps(a.lo, a.hi);
    __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    four = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(four, _mm_movehdup_ps(four)));
  }

  // The dropout (kernel_math.h) of a block of columns from `first` of the row whose key is `key`, lane l holding
  // the column of scalar_t's lane order (for bfloat16 columns 0-3, 8-11, then 4-7, 12-15).
  struct Dropout {
    __m256i threshold;
    __m256 keep_scale;
  };
  struct Kept {
    __m256i lo, hi;
  };
  static Dropout dropout(uint32_t threshold, float keep_scale) {
    return {_mm256_set1_epi32(static_cast<int>(threshold)), _mm256_set1_ps(keep_scale)};
  }
  template <typename scalar_t>
  EMBEDFAST_INLINE static Kept kept(const Dropout& dropout, uint32_t key, uint32_t first) {
    const __m256i start = _mm256_set1_epi32(static_cast<int>(first)), keys = _mm256_set1_epi32(static_cast<int>(key));
    const bool unpacked = std::is_same_v<scalar_t, c10::BFloat16>;
    const __m256i lo = unpacked ? _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11) : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i hi = unpacked ? _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15)
                                : _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    return {kept(_mm256_add_epi32(start, lo), keys, dropout), kept(_mm256_add_epi32(start, hi), keys, dropout)};
  }
  static Block keep_scaled(Block values, Kept kept, const Dropout& dropout) {
    return {_mm256_and_ps(_mm256_castsi256_ps(kept.lo), _mm256_mul_ps(values.lo, dropout.keep_scale)),
            _mm256_and_ps(_mm256_castsi256_ps(kept.hi), _mm256_mul_ps(values.hi, dropout.keep_scale))};
  }

  static Block load(const float* row) { return {_mm256_loadu_ps(row), _mm256_loadu_ps(row + 8)}; }
  static Block load(const c10::Half* row) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8)))};
  }
  static Block load(const c10::BFloat16* row) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    const __m256i zero = _mm256_setzero_si256();
    return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits))};
  }

  template <bool kStream>
  static void store(float* row, Block block) {
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
  static void store(c10::Half* row, Block block) {
    constexpr int kRounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    store_halves<kStream>(row, _mm256_cvtps_ph(block.lo, kRounding), _mm256_cvtps_ph(block.hi, kRounding));
  }
  template <bool kStream>
  static void store(c10::BFloat16* row, Block block) {
    const __m256i packed = _mm256_packus_epi32(rounded_high_halves(block.lo), rounded_high_halves(block.hi));
    if (kStream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(row), packed);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), packed);
    }
  }

 private:
  EMBEDFAST_INLINE static __m256i fmix32(__m256i h) {
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  }
  // all ones where kept: bits >= threshold, unsigned (max(bits, threshold) == bits)
  EMBEDFAST_INLINE static __m256i kept(__m256i columns, __m256i keys, const Dropout& dropout) {
    const __m256i bits = fmix32(_mm256_xor_si256(columns, keys));
    return _mm256_cmpeq_epi32(_mm256_max_epu32(bits, dropout.threshold), bits);
  }
  template <bool kStream, typename T>
  static void store_halves(T* row, __m128i lo, __m128i hi) {
    if (kStream) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(row), lo);
      _mm_stream_si128(reinterpret_cast<__m128i*>(row + 8), hi);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row), lo);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 8), hi);
    }
  }
};

}  // namespace
}  // namespace avx2
}  // namespace embedfast

#define EMBEDFAST_SIMD_NAMESPACE avx2
#include "simd_row_loops.h"
#undef EMBEDFAST_SIMD_NAMESPACE

#pragma GCC pop_options
#endif
