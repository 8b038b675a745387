// The row loops for AVX2 + FMA + F16C (CpuIsa::kAvx2): 16 columns per block, as two float32 vectors.
//
// bfloat16 rows are widened by unpacking with zeros, which puts each value in the high half of a float32 lane
// (exact, no arithmetic) and leaves, per block, columns 0-3, 8-11 in the first vector and 4-7, 12-15 in the
// second; packing undoes that order with no permute. Side rows are kept in the same lane order (row_loops.h).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

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
  static Block fmadd(Block a, __m256 b, Block c) { return {_mm256_fmadd_ps(a.lo, b, c.lo), _mm256_fmadd_ps(a.hi, b, c.hi)}; }
  static Block add(Block a, Block b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  static Block mul(Block a, __m256 b) { return {_mm256_mul_ps(a.lo, b), _mm256_mul_ps(a.hi, b)}; }

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
