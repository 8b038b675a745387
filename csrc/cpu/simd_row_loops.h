// The vector row loops, written once over a `Simd` of primitives. Each row_loops_<isa>.cpp defines its Simd
// after `#pragma GCC target(...)` and then includes this file, so that the loops are compiled for that
// instruction set in that file alone: the templates have internal linkage and the functions a namespace per
// instruction set, so no copy built for one can stand in for another's at link time.
//
// Simd::Block holds Simd::kBlock columns as float32 vectors: float32 and float16 rows in natural order, bfloat16
// rows in Simd's lane order, which SideRowLayout (row_loops.h) gives the side rows (a bfloat16 table row loads
// into the same order).
#include <cstdint>

#ifndef EMBEDFAST_SIMD_NAMESPACE
#error "define EMBEDFAST_SIMD_NAMESPACE and a struct Simd before including simd_row_loops.h"
#endif

namespace embedfast {
namespace EMBEDFAST_SIMD_NAMESPACE {
namespace {

template <typename scalar_t>
bool can_stream(const scalar_t* row, bool stream) {
  return stream && reinterpret_cast<uintptr_t>(row) % Simd::kStreamAlignment == 0;
}

// combine(), with the multiply and the position add fused
template <bool kStream, typename scalar_t, typename position_t>
void combine_blocks(scalar_t* out, const scalar_t* token, const position_t* position, const scalar_t* segment,
                    float scale, int64_t dim) {
  const auto factor = Simd::broadcast(portable::canonical(scale));
  int64_t j = 0;
  for (; j + Simd::kBlock <= dim; j += Simd::kBlock) {
    Simd::store<kStream>(
        out + j, Simd::add(Simd::fmadd(Simd::load(token + j), factor, Simd::load(position + j)), Simd::load(segment + j)));
  }
  portable::combine_row(out + j, token + j, position + j, segment + j, scale, dim - j);
}

template <bool kStream, typename scalar_t>
void scale_or_accumulate_blocks(scalar_t* out, float* acc, const scalar_t* grad, float scale, int64_t dim) {
  const auto factor = Simd::broadcast(portable::canonical(scale));
  int64_t j = 0;
  for (; j + Simd::kBlock <= dim; j += Simd::kBlock) {
    const auto g = Simd::load(grad + j);
    if (out != nullptr) Simd::store<kStream>(out + j, Simd::mul(g, factor));
    if (acc != nullptr) Simd::store<false>(acc + j, Simd::add(Simd::load(acc + j), g));
  }
  portable::scale_or_accumulate_row(out == nullptr ? nullptr : out + j, acc == nullptr ? nullptr : acc + j, grad + j,
                                    scale, dim - j);
}

template <typename scalar_t>
void store_side_blocks(scalar_t* out, const float* side, float scale, int64_t dim) {
  const auto factor = Simd::broadcast(portable::canonical(scale));
  int64_t j = 0;
  for (; j + Simd::kBlock <= dim; j += Simd::kBlock) Simd::store<false>(out + j, Simd::mul(Simd::load(side + j), factor));
  portable::store_side_row(out + j, side + j, scale, dim - j);
}

}  // namespace

#define EMBEDFAST_SIMD_COMBINE_ROWS(scalar_t, position_t)                                                      \
  void combine_rows(scalar_t* out, const scalar_t* token, const position_t* position, const scalar_t* segment,  \
                    float scale, int64_t dim, bool stream) {                                                   \
    if (can_stream(out, stream)) return combine_blocks<true>(out, token, position, segment, scale, dim);      \
    combine_blocks<false>(out, token, position, segment, scale, dim);                                          \
  }
#define EMBEDFAST_SIMD_ROW_LOOPS(scalar_t)                                                                           \
  EMBEDFAST_SIMD_COMBINE_ROWS(scalar_t, float)                                                                       \
  void scale_or_accumulate_rows(scalar_t* out, float* acc, const scalar_t* grad, float scale, int64_t dim,            \
                                bool stream) {                                                                       \
    if (can_stream(out, stream)) return scale_or_accumulate_blocks<true>(out, acc, grad, scale, dim);               \
    scale_or_accumulate_blocks<false>(out, acc, grad, scale, dim);                                                   \
  }                                                                                                                   \
  void store_side_rows(scalar_t* out, const float* side, float scale, int64_t dim) {                                  \
    store_side_blocks(out, side, scale, dim);                                                                        \
  }

EMBEDFAST_SIMD_ROW_LOOPS(float)
EMBEDFAST_SIMD_ROW_LOOPS(c10::Half)
EMBEDFAST_SIMD_ROW_LOOPS(c10::BFloat16)
EMBEDFAST_SIMD_COMBINE_ROWS(c10::Half, c10::Half)
EMBEDFAST_SIMD_COMBINE_ROWS(c10::BFloat16, c10::BFloat16)
#undef EMBEDFAST_SIMD_ROW_LOOPS
#undef EMBEDFAST_SIMD_COMBINE_ROWS

}  // namespace EMBEDFAST_SIMD_NAMESPACE
}  // namespace embedfast
