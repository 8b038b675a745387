// The row loops for AVX-512 F/BW/VL/DQ (CpuIsa::kAvx512): 32 columns per block, as two float32 vectors, every
// dtype in natural column order (bfloat16 is widened by zero extension and a shift, and narrowed by a
// truncating move, neither of which reorders lanes), so side rows are natural too (row_loops.h).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "row_loops.h"
#include "row_loops_portable.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace embedfast {
namespace avx512 {
namespace {

// bfloat16 rounding as in row_loops_avx2.cpp (round to nearest even; every NaN here has zero low 16 bits)
inline __m512i rounded_high_halves(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
}

struct Simd {
  static constexpr int64_t kBlock = 32;
  static constexpr uintptr_t kStreamAlignment = 64;
  struct Block {
    __m512 lo, hi;
  };

  static __m512 broadcast(float value) { return _mm512_set1_ps(value); }
  static Block fmadd(Block a, __m512 b, Block c) { return {_mm512_fmadd_ps(a.lo, b, c.lo), _mm512_fmadd_ps(a.hi, b, c.hi)}; }
  static Block add(Block a, Block b) { return {_mm512_add_ps(a.lo, b.lo), _mm512_add_ps(a.hi, b.hi)}; }
  static Block mul(Block a, __m512 b) { return {_mm512_mul_ps(a.lo, b), _mm512_mul_ps(a.hi, b)}; }

  static Block load(const float* row) { return {_mm512_loadu_ps(row), _mm512_loadu_ps(row + 16)}; }
  static Block load(const c10::Half* row) { return {_mm512_cvtph_ps(load256(row)), _mm512_cvtph_ps(load256(row + 16))}; }
  static Block load(const c10::BFloat16* row) { return {widen(load256(row)), widen(load256(row + 16))}; }

  template <bool kStream>
  static void store(float* row, Block block) {
    if (kStream) {
      _mm512_stream_ps(row, block.lo);
      _mm512_stream_ps(row + 16, block.hi);
    } else {
      _mm512_storeu_ps(row, block.lo);
      _mm512_storeu_ps(row + 16, block.hi);
    }
  }
  // rounds to nearest even and keeps NaNs, as c10::Half does
  template <bool kStream>
  static void store(c10::Half* row, Block block) {
    constexpr int kRounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    store256<kStream>(row, _mm512_cvtps_ph(block.lo, kRounding), _mm512_cvtps_ph(block.hi, kRounding));
  }
  template <bool kStream>
  static void store(c10::BFloat16* row, Block block) {
    store256<kStream>(row, _mm512_cvtepi32_epi16(rounded_high_halves(block.lo)),
                      _mm512_cvtepi32_epi16(rounded_high_halves(block.hi)));
  }

 private:
  template <typename T>
  static __m256i load256(const T* row) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)); }
  static __m512 widen(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }
  template <bool kStream, typename T>
  static void store256(T* row, __m256i lo, __m256i hi) {
    if (kStream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(row), lo);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(row + 16), hi);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + 16), hi);
    }
  }
};

}  // namespace
}  // namespace avx512
}  // namespace embedfast

#define EMBEDFAST_SIMD_NAMESPACE avx512
#include "simd_row_loops.h"
#undef EMBEDFAST_SIMD_NAMESPACE

#pragma GCC pop_options
#endif
