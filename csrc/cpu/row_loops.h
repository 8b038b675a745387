// Row loops of the CPU kernels: the only code that touches every element of a row.
//
// Each loop takes the instruction-set path cpu_isa() chose (cpu_machine.h): row_loops_avx512bf16.cpp,
// row_loops_avx512.cpp, row_loops_avx2.cpp, or the portable loops of row_loops_portable.h and norm_rows.h.
//
// Token rows, gradient rows, outputs and the rows of the learned position and segment tables are read in the
// storage dtype, in natural column order. The math-dtype "side rows" the loops read or write beside them
// (sinusoid position rows, partial sums) are in the loops' lane order for the storage dtype, which SideRowLayout
// owns: natural, except for bfloat16 on the vector paths, whose widening of a block into two float32 vectors
// leaves it in another order: on AVX2 every full block of 16 columns holds columns 0-3, 8-11, 4-7, 12-15
// (row_loops_avx2.cpp), on both AVX-512 paths every full block of 32 the even columns, then the odd ones
// (simd_avx512.h). A bfloat16 table row read by the same widening lands in the same order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "embedfast/spec.h"
#include "norm_rows.h"

// A row function compiled twice, for x86-64-v3 (AVX2, FMA) and the baseline, the loader picking one: for loops
// the compiler vectorizes on its own.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EMBEDFAST_ROW_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EMBEDFAST_ROW_KERNEL
#endif

namespace embedfast {

// Where each column of a side row lives, for one storage dtype and width.
class SideRowLayout {
 public:
  SideRowLayout(at::ScalarType storage, int64_t dim);

  int64_t dim() const { return static_cast<int64_t>(columns_.size()); }
  bool natural() const { return natural_; }
  // the column that slot `slot` of a side row holds
  int64_t column(int64_t slot) const { return columns_[slot]; }

 private:
  std::vector<int64_t> columns_;
  bool natural_;
};

// out (rows, dim) in the storage dtype, natural order = the sums over groups g, in group order, of the side rows
// partial[g] (rows * dim slots each): the fixed-order reduction of per-group partial sums.
template <typename scalar_t, typename acc_t>
void sum_partials(const acc_t* partial, int64_t groups, int64_t rows, const SideRowLayout& layout, scalar_t* out) {
  const int64_t dim = layout.dim();
  at::parallel_for(0, rows * dim, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // slot i % dim of row i / dim
      acc_t sum = 0;
      for (int64_t g = 0; g < groups; ++g) sum += partial[g * rows * dim + i];
      out[i - i % dim + layout.column(i % dim)] = static_cast<scalar_t>(sum);
    }
  });
}

// Whether a loop should write an output of this many bytes around the caches (non-temporal stores); a thread
// that wrote with `stream` calls end_streaming() after its last row.
bool stream_output(int64_t bytes);
void end_streaming();

// out = combine(token, scale, position, segment) per column; the position row is a math-dtype side row
// (sinusoids) or, for half-precision tables, also a table row in the storage dtype (learned positions). out = grad
// * scale and/or acc += grad (either pointer may be null). `stream`: see stream_output. store_side_rows: out =
// side * scale, a side row back in natural order in the storage dtype.
#define EMBEDFAST_DECLARE_ROW_LOOPS(scalar_t)                                                                   \
  void combine_rows(scalar_t* out, const scalar_t* token, const math_t<scalar_t>* position,                    \
                    const scalar_t* segment, math_t<scalar_t> scale, int64_t dim, bool stream);                \
  void scale_or_accumulate_rows(scalar_t* out, math_t<scalar_t>* acc, const scalar_t* grad, math_t<scalar_t> scale, \
                                int64_t dim, bool stream);                                                     \
  void store_side_rows(scalar_t* out, const math_t<scalar_t>* side, math_t<scalar_t> scale, int64_t dim);
#define EMBEDFAST_DECLARE_STORAGE_POSITION_LOOP(scalar_t)                                                       \
  void combine_rows(scalar_t* out, const scalar_t* token, const scalar_t* position, const scalar_t* segment,    \
                    float scale, int64_t dim, bool stream);
// The norm epilogue's rows (norm_rows.h), the weight and bias side rows: norm_forward_rows: out = the norm of the
// token's sum, dropped out, stats = its (mean, rstd); norm_backward_rows: out = the gradient of the sum, and the
// norm weight / bias gradients added to partial sums (side rows; either may be null); norm_masked_rows: out = grad
// with the mask. x, dy: scratch rows of dim; token_index: the row n of the output (the dropout's row, kernel_math.h).
#define EMBEDFAST_DECLARE_NORM_ROW_LOOPS(scalar_t, position_t)                                                  \
  void norm_forward_rows(scalar_t* out, math_t<scalar_t>* stats, math_t<scalar_t>* x, const scalar_t* token,  \
                         const position_t* position, const scalar_t* segment, math_t<scalar_t> scale,        \
                         const NormRow<math_t<scalar_t>>& row, uint64_t token_index, bool stream);        \
  void norm_backward_rows(scalar_t* out, math_t<scalar_t>* weight_partial, math_t<scalar_t>* bias_partial,    \
                          math_t<scalar_t>* x, math_t<scalar_t>* dy, const scalar_t* grad,                    \
                          const math_t<scalar_t>* stats, const scalar_t* token, const position_t* position,  \
                          const scalar_t* segment, math_t<scalar_t> scale, const NormRow<math_t<scalar_t>>& row, \
                          uint64_t token_index);
#define EMBEDFAST_DECLARE_MASKED_ROW_LOOP(scalar_t)                                                             \
  void norm_masked_rows(scalar_t* out, math_t<scalar_t>* dy, const scalar_t* grad,                           \
                        const NormRow<math_t<scalar_t>>& row, uint64_t token_index);
#define EMBEDFAST_DECLARE_ALL_NORM_ROW_LOOPS(scalar_t)     \
  EMBEDFAST_DECLARE_NORM_ROW_LOOPS(scalar_t, math_t<scalar_t>) \
  EMBEDFAST_DECLARE_MASKED_ROW_LOOP(scalar_t)

EMBEDFAST_DECLARE_ROW_LOOPS(float)
EMBEDFAST_DECLARE_ROW_LOOPS(double)
EMBEDFAST_DECLARE_ROW_LOOPS(c10::Half)
EMBEDFAST_DECLARE_ROW_LOOPS(c10::BFloat16)
EMBEDFAST_DECLARE_STORAGE_POSITION_LOOP(c10::Half)
EMBEDFAST_DECLARE_STORAGE_POSITION_LOOP(c10::BFloat16)
EMBEDFAST_DECLARE_ALL_NORM_ROW_LOOPS(float)
EMBEDFAST_DECLARE_ALL_NORM_ROW_LOOPS(double)
EMBEDFAST_DECLARE_ALL_NORM_ROW_LOOPS(c10::Half)
EMBEDFAST_DECLARE_ALL_NORM_ROW_LOOPS(c10::BFloat16)
EMBEDFAST_DECLARE_NORM_ROW_LOOPS(c10::Half, c10::Half)
EMBEDFAST_DECLARE_NORM_ROW_LOOPS(c10::BFloat16, c10::BFloat16)

// the same loops, per instruction set (row_loops_<isa>.cpp)
#define EMBEDFAST_DECLARE_SIMD_ROW_LOOPS(isa)           \
  namespace isa {                                       \
  EMBEDFAST_DECLARE_ROW_LOOPS(float)                    \
  EMBEDFAST_DECLARE_ROW_LOOPS(c10::Half)                \
  EMBEDFAST_DECLARE_ROW_LOOPS(c10::BFloat16)            \
  EMBEDFAST_DECLARE_STORAGE_POSITION_LOOP(c10::Half)    \
  EMBEDFAST_DECLARE_STORAGE_POSITION_LOOP(c10::BFloat16) \
  EMBEDFAST_DECLARE_ALL_NORM_ROW_LOOPS(float)            \
  EMBEDFAST_DECLARE_ALL_NORM_ROW_LOOPS(c10::Half)        \
  EMBEDFAST_DECLARE_ALL_NORM_ROW_LOOPS(c10::BFloat16)    \
  EMBEDFAST_DECLARE_NORM_ROW_LOOPS(c10::Half, c10::Half) \
  EMBEDFAST_DECLARE_NORM_ROW_LOOPS(c10::BFloat16, c10::BFloat16) \
  }
EMBEDFAST_DECLARE_SIMD_ROW_LOOPS(avx2)
EMBEDFAST_DECLARE_SIMD_ROW_LOOPS(avx512)
EMBEDFAST_DECLARE_SIMD_ROW_LOOPS(avx512bf16)
#undef EMBEDFAST_DECLARE_SIMD_ROW_LOOPS
#undef EMBEDFAST_DECLARE_STORAGE_POSITION_LOOP
#undef EMBEDFAST_DECLARE_ROW_LOOPS
#undef EMBEDFAST_DECLARE_ALL_NORM_ROW_LOOPS
#undef EMBEDFAST_DECLARE_MASKED_ROW_LOOP
#undef EMBEDFAST_DECLARE_NORM_ROW_LOOPS

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
