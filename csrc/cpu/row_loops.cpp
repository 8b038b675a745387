// The row loops' dispatch to the instruction-set path cpu_isa() chose, and the side-row layout it implies.
#include "row_loops.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "cpu_machine.h"
#include "row_loops_portable.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EMBEDFAST_X86_LOOPS 1
#endif

namespace embedfast {
namespace {

// the columns of one block of the AVX2 and AVX-512 bfloat16 lane orders (row_loops_avx2.cpp, simd_avx512.h)
constexpr int64_t kAvx2Block = 16;
constexpr int64_t kAvx512Block = 32;

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

}  // namespace

SideRowLayout::SideRowLayout(at::ScalarType storage, int64_t dim) : columns_(dim), natural_(true) {
  for (int64_t j = 0; j < dim; ++j) columns_[j] = j;
  if (storage != at::kBFloat16) return;
  if (cpu_isa() == CpuIsa::kAvx2) {
    natural_ = false;
    for (int64_t block = 0; block + kAvx2Block <= dim; block += kAvx2Block) {
      std::swap_ranges(columns_.begin() + block + 4, columns_.begin() + block + 8, columns_.begin() + block + 8);
    }
  } else if (cpu_isa() == CpuIsa::kAvx512 || cpu_isa() == CpuIsa::kAvx512Bf16) {
    natural_ = false;
    for (int64_t block = 0; block + kAvx512Block <= dim; block += kAvx512Block) {
      for (int64_t slot = 0; slot < kAvx512Block; ++slot) {
        columns_[block + slot] = block + (slot < kAvx512Block / 2 ? 2 * slot : 2 * (slot - kAvx512Block / 2) + 1);
      }
    }
  }
}

bool stream_output(int64_t bytes) { return bytes >= stream_min_bytes(); }

void end_streaming() {
#ifdef EMBEDFAST_X86_LOOPS
  _mm_sfence();
#endif
}

// float64 rows (gradcheck): the portable loops only
EMBEDFAST_ROW_KERNEL void combine_rows(double* out, const double* token, const double* position, const double* segment,
                                       double scale, int64_t dim, bool) {
  portable::combine_row(out, token, position, segment, scale, dim);
}

EMBEDFAST_ROW_KERNEL void scale_or_accumulate_rows(double* out, double* acc, const double* grad, double scale,
                                                   int64_t dim, bool) {
  portable::scale_or_accumulate_row(out, acc, grad, scale, dim);
}

void store_side_rows(double* out, const double* side, double scale, int64_t dim) {
  portable::store_side_row(out, side, scale, dim);
}

EMBEDFAST_ROW_KERNEL void norm_forward_rows(double* out, double* stats, double* x, const double* token,
                                            const double* position, const double* segment, double scale,
                                            const NormRow<double>& row, uint64_t token_index, bool) {
  portable::norm_forward_row(out, stats, x, token, position, segment, scale, row, token_index);
}

EMBEDFAST_ROW_KERNEL void norm_backward_rows(double* out, double* weight_partial, double* bias_partial, double* x,
                                             double* dy, const double* grad, const double* stats, const double* token,
                                             const double* position, const double* segment, double scale,
                                             const NormRow<double>& row, uint64_t token_index) {
  portable::norm_backward_row(out, weight_partial, bias_partial, x, dy, grad, stats, token, position, segment, scale,
                              row, token_index);
}

EMBEDFAST_ROW_KERNEL void norm_masked_rows(double* out, double* dy, const double* grad, const NormRow<double>& row,
                                           uint64_t token_index) {
  portable::norm_masked_row(out, dy, grad, row, token_index);
}

// float32, float16 and bfloat16 rows: the path of cpu_isa()
#ifdef EMBEDFAST_X86_LOOPS
#define EMBEDFAST_SIMD_OR_PORTABLE(loop, ...)                     \
  switch (cpu_isa()) {                                            \
    case CpuIsa::kAvx512Bf16:                                     \
      return avx512bf16::loop(__VA_ARGS__);                       \
    case CpuIsa::kAvx512:                                         \
      return avx512::loop(__VA_ARGS__);                           \
    case CpuIsa::kAvx2:                                           \
      return avx2::loop(__VA_ARGS__);                             \
    case CpuIsa::kPortable:                                       \
      break;                                                      \
  }
#else
#define EMBEDFAST_SIMD_OR_PORTABLE(loop, ...)
#endif

#define EMBEDFAST_DISPATCHED_COMBINE_ROWS(scalar_t, position_t)                                              \
  void combine_rows(scalar_t* out, const scalar_t* token, const position_t* position, const scalar_t* segment, \
                    float scale, int64_t dim, bool stream) {                                                  \
    EMBEDFAST_SIMD_OR_PORTABLE(combine_rows, out, token, position, segment, scale, dim, stream)               \
    portable::combine_row(out, token, position, segment, scale, dim);                                         \
  }
#define EMBEDFAST_DISPATCHED_ROW_LOOPS(scalar_t)                                                                       \
  EMBEDFAST_DISPATCHED_COMBINE_ROWS(scalar_t, float)                                                                   \
  void scale_or_accumulate_rows(scalar_t* out, float* acc, const scalar_t* grad, float scale, int64_t dim,             \
                                bool stream) {                                                                        \
    EMBEDFAST_SIMD_OR_PORTABLE(scale_or_accumulate_rows, out, acc, grad, scale, dim, stream)                          \
    portable::scale_or_accumulate_row(out, acc, grad, scale, dim);                                                    \
  }                                                                                                                    \
  void store_side_rows(scalar_t* out, const float* side, float scale, int64_t dim) {                                  \
    EMBEDFAST_SIMD_OR_PORTABLE(store_side_rows, out, side, scale, dim)                                                \
    portable::store_side_row(out, side, scale, dim);                                                                  \
  }

#define EMBEDFAST_DISPATCHED_NORM_ROW_LOOPS(scalar_t, position_t)                                                      \
  void norm_forward_rows(scalar_t* out, float* stats, float* x, const scalar_t* token, const position_t* position,      \
                         const scalar_t* segment, float scale, const NormRow<float>& row, uint64_t token_index,      \
                         bool stream) {                                                                                \
    EMBEDFAST_SIMD_OR_PORTABLE(norm_forward_rows, out, stats, x, token, position, segment, scale, row, token_index,  \
                               stream)                                                                                 \
    portable::norm_forward_row(out, stats, x, token, position, segment, scale, row, token_index);                    \
  }                                                                                                                    \
  void norm_backward_rows(scalar_t* out, float* weight_partial, float* bias_partial, float* x, float* dy,               \
                          const scalar_t* grad, const float* stats, const scalar_t* token, const position_t* position, \
                          const scalar_t* segment, float scale, const NormRow<float>& row, uint64_t token_index) {   \
    EMBEDFAST_SIMD_OR_PORTABLE(norm_backward_rows, out, weight_partial, bias_partial, x, dy, grad, stats, token,       \
                               position, segment, scale, row, token_index)                                           \
    portable::norm_backward_row(out, weight_partial, bias_partial, x, dy, grad, stats, token, position, segment, scale, \
                                row, token_index);                                                                   \
  }
#define EMBEDFAST_DISPATCHED_MASKED_ROW_LOOP(scalar_t)                                                                   \
  void norm_masked_rows(scalar_t* out, float* dy, const scalar_t* grad, const NormRow<float>& row,                     \
                        uint64_t token_index) {                                                                      \
    EMBEDFAST_SIMD_OR_PORTABLE(norm_masked_rows, out, dy, grad, row, token_index)                                    \
    portable::norm_masked_row(out, dy, grad, row, token_index);                                                      \
  }
#define EMBEDFAST_DISPATCHED_ALL_ROW_LOOPS(scalar_t)     \
  EMBEDFAST_DISPATCHED_ROW_LOOPS(scalar_t)               \
  EMBEDFAST_DISPATCHED_NORM_ROW_LOOPS(scalar_t, float)   \
  EMBEDFAST_DISPATCHED_MASKED_ROW_LOOP(scalar_t)
#define EMBEDFAST_DISPATCHED_STORAGE_POSITION_LOOPS(scalar_t) \
  EMBEDFAST_DISPATCHED_COMBINE_ROWS(scalar_t, scalar_t)       \
  EMBEDFAST_DISPATCHED_NORM_ROW_LOOPS(scalar_t, scalar_t)

EMBEDFAST_DISPATCHED_ALL_ROW_LOOPS(float)
EMBEDFAST_DISPATCHED_ALL_ROW_LOOPS(c10::Half)
EMBEDFAST_DISPATCHED_ALL_ROW_LOOPS(c10::BFloat16)
EMBEDFAST_DISPATCHED_STORAGE_POSITION_LOOPS(c10::Half)
EMBEDFAST_DISPATCHED_STORAGE_POSITION_LOOPS(c10::BFloat16)
#undef EMBEDFAST_DISPATCHED_STORAGE_POSITION_LOOPS
#undef EMBEDFAST_DISPATCHED_ALL_ROW_LOOPS
#undef EMBEDFAST_DISPATCHED_MASKED_ROW_LOOP
#undef EMBEDFAST_DISPATCHED_NORM_ROW_LOOPS
#undef EMBEDFAST_DISPATCHED_ROW_LOOPS
#undef EMBEDFAST_DISPATCHED_COMBINE_ROWS
#undef EMBEDFAST_SIMD_OR_PORTABLE

EMBEDFAST_ROW_KERNEL void rotate_row(float* row, double* sine, double* cosine, const double* step_sin,
                                     const double* step_cos, int64_t dim) {
  rotate_row_impl(row, sine, cosine, step_sin, step_cos, dim);
}

EMBEDFAST_ROW_KERNEL void rotate_row(double* row, double* sine, double* cosine, const double* step_sin,
                                     const double* step_cos, int64_t dim) {
  rotate_row_impl(row, sine, cosine, step_sin, step_cos, dim);
}

}  // namespace embedfast
