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
  static Block zero() { return {_mm512_setzero_ps(), _mm512_setzero_ps()}; }
  static Block fmadd(Block a, __m512 b, Block c) { return {_mm512_fmadd_ps(a.lo, b, c.lo), _mm512_fmadd_ps(a.hi, b, c.hi)}; }
  static Block fmadd(Block a, Block b, Block c) { return {_mm512_fmadd_ps(a.lo, b.lo, c.lo), _mm512_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static Block fnmadd(Block a, __m512 b, Block c) { return {_mm512_fnmadd_ps(a.lo, b, c.lo), _mm512_fnmadd_ps(a.hi, b, c.hi)}; }
  static Block add(Block a, Block b) { return {_mm512_add_ps(a.lo, b.lo), _mm512_add_ps(a.hi, b.hi)}; }
  static Block sub(Block a, __m512 b) { return {_mm512_sub_ps(a.lo, b), _mm512_sub_ps(a.hi, b)}; }
  static Block mul(Block a, __m512 b) { return {_mm512_mul_ps(a.lo, b), _mm512_mul_ps(a.hi, b)}; }
  static Block mul(Block a, Block b) { return {_mm512_mul_ps(a.lo, b.lo), _mm512_mul_ps(a.hi, b.hi)}; }
  // the sum of the lanes, in a fixed order
  static float sum(Block a) { return _mm512_reduce_add_ps(_mm512_add_ps(a.lo, a.hi)); }

  // The dropout (kernel_math.h) of the columns first + lane_column(l) of a block of the row whose key is `key`: every
  // dtype in natural order.
  struct Dropout {
    __m512i threshold;
    __m512 keep_scale;
  };
  struct Kept {
    __mmask16 lo, hi;
  };
  static Dropout dropout(uint32_t threshold, float keep_scale) {
    return {_mm512_set1_epi32(static_cast<int>(threshold)), _mm512_set1_ps(keep_scale)};
  }
  template <typename scalar_t>
  static int64_t lane_column(int64_t lane) { return lane; }
  template <typename scalar_t>
  EMBEDFAST_INLINE static Kept kept(const Dropout& dropout, uint32_t key, uint32_t first) {
    const __m512i lo = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(16));
    const __m512i keys = _mm512_set1_epi32(static_cast<int>(key));
    return {kept(lo, keys, dropout), kept(hi, keys, dropout)};
  }
  static Block keep_scaled(Block values, Kept kept, const Dropout& dropout) {
    return {_mm512_maskz_mul_ps(kept.lo, values.lo, dropout.keep_scale),
            _mm512_maskz_mul_ps(kept.hi, values.hi, dropout.keep_scale)};
  }

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
  EMBEDFAST_INLINE static __m512i fmix32(__m512i h) {
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u)));
    return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  }
  EMBEDFAST_INLINE static __mmask16 kept(__m512i columns, __m512i keys, const Dropout& dropout) {
    return _mm512_cmpge_epu32_mask(fmix32(_mm512_xor_si512(columns, keys)), dropout.threshold);
  }
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
