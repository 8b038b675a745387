// The vector row loops, written once over a `Simd` of primitives. Each row_loops_<isa>.cpp defines its Simd
// after `#pragma GCC target(...)` and then includes this file, so that the loops are compiled for that
// instruction set in that file alone: the templates have internal linkage and the functions a namespace per
// instruction set, so no copy built for one can stand in for another's at link time.
//
// Simd::Block holds Simd::kBlock columns as float32 vectors: float32 and float16 rows in natural order, bfloat16
// rows in Simd's lane order, which SideRowLayout (row_loops.h) gives the side rows (a bfloat16 table row loads
// into the same order).
#include <cstdint>

#include "norm_rows.h"

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

// The norm epilogue (norm_rows.h has the same math in plain C++): sums over a row in Simd::Block lanes, reduced
// in a fixed order, then the row's tail columns in order; x, dy are rows in the lane order of scalar_t, like the
// weight and bias side rows.

// The dropout of the block of columns from `first`, in scalar_t's lane order, of the row whose key (kernel_math.h)
// is `key`: kept values scaled, dropped ones +0
template <typename scalar_t>
EMBEDFAST_INLINE typename Simd::Block drop_block(typename Simd::Block values, const typename Simd::Dropout& dropout,
                                                 uint32_t key, int64_t first) {
  return Simd::keep_scaled(values, Simd::template kept<scalar_t>(dropout, key, static_cast<uint32_t>(first)), dropout);
}

inline typename Simd::Dropout dropout_of(const NormEpilogue<float>& epilogue) {
  return Simd::dropout(epilogue.threshold, epilogue.keep_scale);
}

template <bool kStream, typename scalar_t, typename position_t>
void norm_forward_blocks(scalar_t* out, float* stats, float* x, const scalar_t* token, const position_t* position,
                         const scalar_t* segment, float scale, const NormRow<float>& row, uint64_t token_index) {
  const NormEpilogue<float>& epilogue = row.epilogue;
  const int64_t dim = row.dim, blocks_end = dim - dim % Simd::kBlock;
  const auto factor = Simd::broadcast(portable::canonical(scale));
  auto sums = Simd::zero();
  float tail = 0;
  for (int64_t j = 0; j < blocks_end; j += Simd::kBlock) {
    const auto value = Simd::add(Simd::fmadd(Simd::load(token + j), factor, Simd::load(position + j)), Simd::load(segment + j));
    Simd::template store<false>(x + j, value);
    sums = Simd::add(sums, value);
  }
  for (int64_t j = blocks_end; j < dim; ++j) {
    x[j] = combine(static_cast<float>(token[j]), scale, static_cast<float>(position[j]), static_cast<float>(segment[j]));
    tail += x[j];
  }
  float mean = 0, rstd = 1;
  if (epilogue.mode != NormMode::kNone) {
    if (epilogue.mode == NormMode::kLayernorm) mean = (Simd::sum(sums) + tail) / static_cast<float>(dim);
    const auto center = Simd::broadcast(mean);
    auto squares = Simd::zero();
    float tail_squares = 0;
    for (int64_t j = 0; j < blocks_end; j += Simd::kBlock) {
      const auto centered = Simd::sub(Simd::load(x + j), center);
      squares = Simd::fmadd(centered, centered, squares);
    }
    for (int64_t j = blocks_end; j < dim; ++j) tail_squares += (x[j] - mean) * (x[j] - mean);
    rstd = norm_rstd(Simd::sum(squares) + tail_squares, dim, epilogue.eps);
  }
  stats[0] = mean;
  stats[1] = rstd;
  const auto center = Simd::broadcast(mean), spread = Simd::broadcast(rstd);
  const auto dropout = dropout_of(epilogue);
  const uint32_t key = epilogue.dropout ? epilogue.row_key(token_index) : 0;
  for (int64_t j = 0; j < blocks_end; j += Simd::kBlock) {
    auto value = Simd::fmadd(Simd::mul(Simd::sub(Simd::load(x + j), center), spread), Simd::load(row.weight + j),
                             Simd::load(row.bias + j));
    if (epilogue.dropout) value = drop_block<scalar_t>(value, dropout, key, j);
    Simd::template store<kStream>(out + j, value);
  }
  for (int64_t j = blocks_end; j < dim; ++j) {
    out[j] = static_cast<scalar_t>(epilogue.drop((x[j] - mean) * rstd * row.weight[j] + row.bias[j], key, j));
  }
}

// dy = grad_out with the forward's mask; x_hat = (x - mean) * rstd; g = dy * w;
// out = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) (RMSNORM: without mean(g)); weight_partial += dy * x_hat,
// bias_partial += dy (either may be null)
template <typename scalar_t, typename position_t>
void norm_backward_blocks(scalar_t* out, float* weight_partial, float* bias_partial, float* x, float* dy,
                          const scalar_t* grad, const float* stats, const scalar_t* token, const position_t* position,
                          const scalar_t* segment, float scale, const NormRow<float>& row, uint64_t token_index) {
  const NormEpilogue<float>& epilogue = row.epilogue;
  const int64_t dim = row.dim, blocks_end = dim - dim % Simd::kBlock;
  const float mean = stats[0], rstd = stats[1];
  const auto factor = Simd::broadcast(portable::canonical(scale));
  const auto center = Simd::broadcast(mean), spread = Simd::broadcast(rstd);
  const auto dropout = dropout_of(epilogue);
  const uint32_t key = epilogue.dropout ? epilogue.row_key(token_index) : 0;
  auto g_sums = Simd::zero(), gx_sums = Simd::zero();
  for (int64_t j = 0; j < blocks_end; j += Simd::kBlock) {
    auto d = Simd::load(grad + j);
    if (epilogue.dropout) d = drop_block<scalar_t>(d, dropout, key, j);
    const auto sum = Simd::add(Simd::fmadd(Simd::load(token + j), factor, Simd::load(position + j)), Simd::load(segment + j));
    const auto x_hat = Simd::mul(Simd::sub(sum, center), spread);
    if (weight_partial != nullptr) Simd::template store<false>(weight_partial + j, Simd::fmadd(d, x_hat, Simd::load(weight_partial + j)));
    if (bias_partial != nullptr) Simd::template store<false>(bias_partial + j, Simd::add(Simd::load(bias_partial + j), d));
    const auto g = Simd::mul(d, Simd::load(row.weight + j));
    Simd::template store<false>(x + j, x_hat);
    Simd::template store<false>(dy + j, g);
    g_sums = Simd::add(g_sums, g);
    gx_sums = Simd::fmadd(g, x_hat, gx_sums);
  }
  float g_tail = 0, gx_tail = 0;
  for (int64_t j = blocks_end; j < dim; ++j) {
    const float d = epilogue.drop(static_cast<float>(grad[j]), key, j);
    x[j] = (combine(static_cast<float>(token[j]), scale, static_cast<float>(position[j]), static_cast<float>(segment[j])) - mean) * rstd;
    if (weight_partial != nullptr) weight_partial[j] += d * x[j];
    if (bias_partial != nullptr) bias_partial[j] += d;
    dy[j] = d * row.weight[j];
    g_tail += dy[j];
    gx_tail += dy[j] * x[j];
  }
  const float mean_g = epilogue.mode == NormMode::kLayernorm ? (Simd::sum(g_sums) + g_tail) / static_cast<float>(dim) : 0.0f;
  const float mean_gx = (Simd::sum(gx_sums) + gx_tail) / static_cast<float>(dim);
  const auto g_center = Simd::broadcast(mean_g), gx_factor = Simd::broadcast(mean_gx);
  for (int64_t j = 0; j < blocks_end; j += Simd::kBlock) {
    const auto centered = Simd::sub(Simd::load(dy + j), g_center);
    Simd::template store<false>(out + j, Simd::mul(Simd::fnmadd(Simd::load(x + j), gx_factor, centered), spread));
  }
  for (int64_t j = blocks_end; j < dim; ++j) out[j] = static_cast<scalar_t>(rstd * (dy[j] - mean_g - x[j] * mean_gx));
}

template <typename scalar_t>
void norm_masked_blocks(scalar_t* out, const scalar_t* grad, const NormRow<float>& row, uint64_t token_index) {
  const NormEpilogue<float>& epilogue = row.epilogue;
  const int64_t dim = row.dim, blocks_end = dim - dim % Simd::kBlock;
  const auto dropout = dropout_of(epilogue);
  const uint32_t key = epilogue.row_key(token_index);
  for (int64_t j = 0; j < blocks_end; j += Simd::kBlock) {
    Simd::template store<false>(out + j, drop_block<scalar_t>(Simd::load(grad + j), dropout, key, j));
  }
  for (int64_t j = blocks_end; j < dim; ++j) {
    out[j] = static_cast<scalar_t>(epilogue.drop(static_cast<float>(grad[j]), key, j));
  }
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

#define EMBEDFAST_SIMD_NORM_ROW_LOOPS(scalar_t, position_t)                                                         \
  void norm_forward_rows(scalar_t* out, float* stats, float* x, const scalar_t* token, const position_t* position,   \
                         const scalar_t* segment, float scale, const NormRow<float>& row, uint64_t token_index,   \
                         bool stream) {                                                                             \
    if (can_stream(out, stream)) {                                                                                  \
      return norm_forward_blocks<true>(out, stats, x, token, position, segment, scale, row, token_index);        \
    }                                                                                                               \
    norm_forward_blocks<false>(out, stats, x, token, position, segment, scale, row, token_index);                \
  }                                                                                                                 \
  void norm_backward_rows(scalar_t* out, float* weight_partial, float* bias_partial, float* x, float* dy,            \
                          const scalar_t* grad, const float* stats, const scalar_t* token, const position_t* position, \
                          const scalar_t* segment, float scale, const NormRow<float>& row, uint64_t token_index) { \
    norm_backward_blocks(out, weight_partial, bias_partial, x, dy, grad, stats, token, position, segment, scale, row, \
                         token_index);                                                                            \
  }
#define EMBEDFAST_SIMD_ALL_ROW_LOOPS(scalar_t)                                                          \
  EMBEDFAST_SIMD_ROW_LOOPS(scalar_t)                                                                    \
  EMBEDFAST_SIMD_NORM_ROW_LOOPS(scalar_t, float)                                                        \
  void norm_masked_rows(scalar_t* out, float*, const scalar_t* grad, const NormRow<float>& row,        \
                        uint64_t token_index) {                                                       \
    norm_masked_blocks(out, grad, row, token_index);                                                  \
  }
#define EMBEDFAST_SIMD_STORAGE_POSITION_LOOPS(scalar_t) \
  EMBEDFAST_SIMD_COMBINE_ROWS(scalar_t, scalar_t)       \
  EMBEDFAST_SIMD_NORM_ROW_LOOPS(scalar_t, scalar_t)

EMBEDFAST_SIMD_ALL_ROW_LOOPS(float)
EMBEDFAST_SIMD_ALL_ROW_LOOPS(c10::Half)
EMBEDFAST_SIMD_ALL_ROW_LOOPS(c10::BFloat16)
EMBEDFAST_SIMD_STORAGE_POSITION_LOOPS(c10::Half)
EMBEDFAST_SIMD_STORAGE_POSITION_LOOPS(c10::BFloat16)
#undef EMBEDFAST_SIMD_STORAGE_POSITION_LOOPS
#undef EMBEDFAST_SIMD_ALL_ROW_LOOPS
#undef EMBEDFAST_SIMD_NORM_ROW_LOOPS
#undef EMBEDFAST_SIMD_ROW_LOOPS
#undef EMBEDFAST_SIMD_COMBINE_ROWS

}  // namespace EMBEDFAST_SIMD_NAMESPACE
}  // namespace embedfast
