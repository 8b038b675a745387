// The AVX-512 primitives of the row loops (simd_row_loops.h), for row_loops_avx512.cpp (CpuIsa::kAvx512: F, BW,
// VL, DQ) and row_loops_avx512bf16.cpp (CpuIsa::kAvx512Bf16: the same and AVX512-BF16, which rounds bfloat16
// outputs in one instruction). The including file includes <immintrin.h>, sets its target and defines
// EMBEDFAST_SIMD_NAMESPACE and EMBEDFAST_AVX512_BF16 (0 or 1) first.
//
// 32 columns per block, as two float32 vectors. float32 and float16 rows are in natural column order. A bfloat16
// block is read as one 512-bit load whose even columns a shift, and whose odd columns a mask, put in the high
// halves of float32 lanes (exact, one operation per vector): the block's first vector holds columns 0, 2, ..., 30
// and its second 1, 3, ..., 31; packing interleaves them back. Side rows are kept in the same lane order
// (row_loops.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "row_loops.h"

#if !defined(EMBEDFAST_SIMD_NAMESPACE) || !defined(EMBEDFAST_AVX512_BF16)
#error "define EMBEDFAST_SIMD_NAMESPACE and EMBEDFAST_AVX512_BF16 before including simd_avx512.h"
#endif

namespace embedfast {
namespace EMBEDFAST_SIMD_NAMESPACE {
namespace {

// bfloat16 rounding as in row_loops_avx2.cpp (round to nearest even; every NaN here has zero low 16 bits): the
// rounded value in the high 16 bits of each lane, the low ones meaningless
inline __m512i rounded_bits(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
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

  // The dropout (kernel_math.h) of a block of columns from `first` of the row whose key is `key`, lane l holding
  // the column of scalar_t's lane order (for bfloat16 the even columns, then the odd ones).
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
  EMBEDFAST_INLINE static Kept kept(const Dropout& dropout, uint32_t key, uint32_t first) {
    const bool interleaved = std::is_same_v<scalar_t, c10::BFloat16>;
    const __m512i lo = _mm512_add_epi32(
        _mm512_set1_epi32(static_cast<int>(first)),
        interleaved ? _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
                    : _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(interleaved ? 1 : 16));
    const __m512i keys = _mm512_set1_epi32(static_cast<int>(key));
    return {kept(lo, keys, dropout), kept(hi, keys, dropout)};
  }
  static Block keep_scaled(Block values, Kept kept, const Dropout& dropout) {
    return {_mm512_maskz_mul_ps(kept.lo, values.lo, dropout.keep_scale),
            _mm512_maskz_mul_ps(kept.hi, values.hi, dropout.keep_scale)};
  }

  static Block load(const float* row) { return {_mm512_loadu_ps(row), _mm512_loadu_ps(row + 16)}; }
  static Block load(const c10::Half* row) { return {_mm512_cvtph_ps(load256(row)), _mm512_cvtph_ps(load256(row + 16))}; }
  static Block load(const c10::BFloat16* row) {
    const __m512i bits = _mm512_loadu_si512(row);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)), _mm512_castsi512_ps(_mm512_and_si512(bits, high_halves()))};
  }

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
    const __m512i packed = packed_bfloat16(block);
    if (kStream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(row), packed);
    } else {
      _mm512_storeu_si512(row, packed);
    }
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
  static __m512i high_halves() { return _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)); }
  // the 32 bfloat16 values of a block in natural column order, rounded to nearest even
  static __m512i packed_bfloat16(Block block) {
#if EMBEDFAST_AVX512_BF16
    // AVX512-BF16 rounds as c10::BFloat16 does, but reads denormal inputs as zero: a block with one (in practice
    // never) takes the integer rounding
    constexpr int kDenormal = 0x20;
    if ((_mm512_fpclass_ps_mask(block.lo, kDenormal) | _mm512_fpclass_ps_mask(block.hi, kDenormal)) == 0) {
      const __m512i even_then_odd = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(block.hi, block.lo));
      // word 2k of the result is word k (even column 2k), word 2k + 1 is word 16 + k (odd column 2k + 1)
      const __m512i interleave = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004,
                                                   0x00150005, 0x00160006, 0x00170007, 0x00180008, 0x00190009,
                                                   0x001A000A, 0x001B000B, 0x001C000C, 0x001D000D, 0x001E000E,
                                                   0x001F000F);
      return _mm512_permutexvar_epi16(interleave, even_then_odd);
    }
#endif
    const __m512i even = _mm512_srli_epi32(rounded_bits(block.lo), 16);
    return _mm512_mask_blend_epi16(0xAAAAAAAAu, even, rounded_bits(block.hi));  // odd words: the odd columns
  }
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
}  // namespace EMBEDFAST_SIMD_NAMESPACE
}  // namespace embedfast
