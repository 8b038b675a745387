// Row loops of the CPU kernels: the only code that touches every element of a row.
//
// The float32 side rows these loops read or write (position and segment rows, partial sums) are in the
// "kernel column order" of the storage type: natural order, except for bfloat16 on a machine with AVX2, FMA and
// F16C (what the hand-written loops need), where every full block of 16 columns holds columns 0-3, 8-11, 4-7,
// 12-15 (the order in which unpacking 16 bfloat16 values into two float32 vectors leaves them; see
// row_loops.cpp). Token rows, gradient rows and outputs are always in natural order. column_order() is the one
// place the callers learn the order from.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace embedfast {

// float64 tables (gradcheck) keep float64 math; every other storage type computes in float32.
template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Whether float32 side rows for storage type `dtype` are in the lane order (else natural order).
bool lane_order(at::ScalarType dtype);

// The column held by each slot of a float32 side row for storage type `dtype`.
std::vector<int64_t> column_order(at::ScalarType dtype, int64_t dim);

// Whether a loop should write an output of this many bytes around the caches (non-temporal stores); a thread
// that wrote with `stream` calls end_streaming() after its last row.
bool stream_output(int64_t bytes);
void end_streaming();

// out = combine(token, scale, position, segment) per column. out = grad * scale and/or acc += grad (either
// pointer may be null). `stream`: see stream_output.
#define EMBEDFAST_DECLARE_ROW_LOOPS(scalar_t)                                                                   \
  void combine_rows(scalar_t* out, const scalar_t* token, const math_t<scalar_t>* position,                    \
                    const math_t<scalar_t>* segment, math_t<scalar_t> scale, int64_t dim, bool stream);        \
  void scale_or_accumulate_rows(scalar_t* out, math_t<scalar_t>* acc, const scalar_t* grad, math_t<scalar_t> scale, \
                                int64_t dim, bool stream);

EMBEDFAST_DECLARE_ROW_LOOPS(float)
EMBEDFAST_DECLARE_ROW_LOOPS(double)
EMBEDFAST_DECLARE_ROW_LOOPS(c10::Half)
EMBEDFAST_DECLARE_ROW_LOOPS(c10::BFloat16)
#undef EMBEDFAST_DECLARE_ROW_LOOPS

// out = row as float32, in the kernel column order
void widen_row(float* out, const c10::BFloat16* row, int64_t dim);

// row = sin(theta); theta += step, as a float64 rotation of (sin, cos) per column.
void rotate_row(float* row, double* sine, double* cosine, const double* step_sin, const double* step_cos, int64_t dim);
void rotate_row(double* row, double* sine, double* cosine, const double* step_sin, const double* step_cos, int64_t dim);

// Ask for the cache lines of a row that a loop will read soon, and once: random token rows defeat the hardware
// prefetcher, and a non-temporal hint keeps them from evicting the tables that are reused.
inline void prefetch_row(const void* row, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(static_cast<const char*>(row) + offset, 0, 0);
#endif
}

}  // namespace embedfast
