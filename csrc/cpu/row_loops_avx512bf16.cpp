// The row loops for AVX-512 F/BW/VL/DQ and AVX512-BF16 (CpuIsa::kAvx512Bf16): the primitives of
// simd_avx512.h in the loops of simd_row_loops.h, compiled for that instruction set in this file alone.
#include <ATen/ATen.h>

#include "row_loops.h"
#include "row_loops_portable.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")

#define EMBEDFAST_SIMD_NAMESPACE avx512bf16
#define EMBEDFAST_AVX512_BF16 1
#include "simd_avx512.h"
#include "simd_row_loops.h"
#undef EMBEDFAST_AVX512_BF16
#undef EMBEDFAST_SIMD_NAMESPACE

#pragma GCC pop_options
#endif
