// The norm epilogue's rows in plain C++: the portable path (and float64) of the norm kernels (norm_cpu.cpp), the
// reference the vector paths (simd_row_loops.h) follow. Per token: the sum row built in the math dtype in a
// per-thread buffer, its (mean, rstd) (two passes for the LAYERNORM variance), and the normalized, weighted,
// dropped-out row stored once; the backward recomputes the sum row. Sums over a row run in kLanes lanes combined
// in a fixed order.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"

// Into the functions that call them, which may be compiled for another instruction set (EMBEDFAST_ROW_KERNEL).
#if defined(__GNUC__)
#define EMBEDFAST_INLINE inline __attribute__((always_inline))
#else
#define EMBEDFAST_INLINE inline
#endif

namespace embedfast {

// The per-call constants of the norm epilogue, in the math dtype.
template <typename acc_t>
struct NormRow {
  const acc_t* weight;  // norm_weight, or ones (a side row: in the lane order of the row loops, row_loops.h)
  const acc_t* bias;    // norm_bias, or zeros (a side row)
  NormEpilogue<acc_t> epilogue;
  int64_t dim;
};

namespace portable {


constexpr int64_t kLanes = 16;


// sum of value(j) over j < dim in a fixed order: kLanes running sums, combined pairwise, then the tail.
template <typename acc_t, typename Value>
EMBEDFAST_INLINE acc_t lane_sum(int64_t dim, const Value& value) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= dim; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += value(j + k);
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  acc_t tail = 0;
  for (; j < dim; ++j) tail += value(j);
  return lanes[0] + tail;
}

// value, or +0 when not kept: by a mask of its bits, which the compiler vectorizes (a select of value * scale it does
// not: the multiply might trap).
template <typename acc_t>
EMBEDFAST_INLINE acc_t keep_or_zero(acc_t value, bool keep) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(bits_t) == sizeof(acc_t));
  bits_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= keep ? ~bits_t(0) : bits_t(0);
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}

// The dropout of a token's row (token_index: its row n of the output) in place: dropped values 0, kept ones scaled
// (separate from the rounding: both loops vectorize).
template <typename acc_t>
EMBEDFAST_INLINE void drop(acc_t* __restrict__ values, const NormRow<acc_t>& row, uint64_t token_index) {
  const acc_t keep_scale = row.epilogue.keep_scale;
  const uint32_t key = row.epilogue.row_key(token_index), threshold = row.epilogue.threshold;
  for (int64_t j = 0; j < row.dim; ++j) {
    values[j] = keep_or_zero(values[j] * keep_scale, dropout_bits(key, static_cast<uint32_t>(j)) >= threshold);
  }
}

// x = the forward's sum of one token, in the math dtype, never rounded
template <typename scalar_t, typename position_t, typename acc_t>
EMBEDFAST_INLINE void sum_row(acc_t* __restrict__ x, const scalar_t* __restrict__ token, const position_t* __restrict__ position,
                    const scalar_t* __restrict__ segment, acc_t scale, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    x[j] = combine(static_cast<acc_t>(token[j]), scale, static_cast<acc_t>(position[j]), static_cast<acc_t>(segment[j]));
  }
}

template <typename scalar_t, typename position_t, typename acc_t = math_t<scalar_t>>
EMBEDFAST_INLINE void norm_forward_row(scalar_t* __restrict__ out, acc_t* __restrict__ stats, acc_t* __restrict__ x,
                        const scalar_t* token, const position_t* position, const scalar_t* segment, acc_t scale,
                        const NormRow<acc_t>& row, uint64_t token_index) {
  const int64_t dim = row.dim;
  sum_row(x, token, position, segment, scale, dim);
  acc_t mean = 0, rstd = 1;
  if (row.epilogue.mode == NormMode::kLayernorm) {
    mean = lane_sum<acc_t>(dim, [&](int64_t j) { return x[j]; }) / static_cast<acc_t>(dim);
    rstd = norm_rstd(lane_sum<acc_t>(dim, [&](int64_t j) { return (x[j] - mean) * (x[j] - mean); }), dim,
                     row.epilogue.eps);
  } else if (row.epilogue.mode == NormMode::kRmsnorm) {
    rstd = norm_rstd(lane_sum<acc_t>(dim, [&](int64_t j) { return x[j] * x[j]; }), dim, row.epilogue.eps);
  }
  stats[0] = mean;
  stats[1] = rstd;
  const acc_t* __restrict__ weight = row.weight;
  const acc_t* __restrict__ bias = row.bias;
  for (int64_t j = 0; j < dim; ++j) x[j] = (x[j] - mean) * rstd * weight[j] + bias[j];
  if (row.epilogue.dropout) drop(x, row, token_index);
  for (int64_t j = 0; j < dim; ++j) out[j] = static_cast<scalar_t>(x[j]);
}

// dy = grad in the math dtype, with the forward's mask
template <typename scalar_t, typename acc_t>
EMBEDFAST_INLINE void masked_grad_row(acc_t* __restrict__ dy, const scalar_t* __restrict__ grad, const NormRow<acc_t>& row,
                                 uint64_t token_index) {
  for (int64_t j = 0; j < row.dim; ++j) dy[j] = static_cast<acc_t>(grad[j]);
  if (row.epilogue.dropout) drop(dy, row, token_index);
}

// dy = grad_out with the forward's mask; x_hat = (x - mean) * rstd; g = dy * w;
// grad_sum = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) (RMSNORM: without mean(g)); partial sums
// weight_partial += dy * x_hat, bias_partial += dy (either may be null).
template <typename scalar_t, typename position_t, typename acc_t = math_t<scalar_t>>
EMBEDFAST_INLINE void norm_backward_row(scalar_t* __restrict__ out, acc_t* __restrict__ weight_partial, acc_t* __restrict__ bias_partial,
                         acc_t* __restrict__ x, acc_t* __restrict__ dy, const scalar_t* __restrict__ grad,
                         const acc_t* stats, const scalar_t* token, const position_t* position, const scalar_t* segment,
                         acc_t scale, const NormRow<acc_t>& row, uint64_t token_index) {
  const int64_t dim = row.dim;
  const NormEpilogue<acc_t>& epilogue = row.epilogue;
  masked_grad_row(dy, grad, row, token_index);
  sum_row(x, token, position, segment, scale, dim);
  const acc_t mean = stats[0], rstd = stats[1];
  for (int64_t j = 0; j < dim; ++j) x[j] = (x[j] - mean) * rstd;
  if (weight_partial != nullptr) {
    for (int64_t j = 0; j < dim; ++j) weight_partial[j] += dy[j] * x[j];
  }
  if (bias_partial != nullptr) {
    for (int64_t j = 0; j < dim; ++j) bias_partial[j] += dy[j];
  }
  // g in a loop of its own: g - mean(g) is then not fused into one multiply-add, whose unrounded product would
  // leave a residue where the reference cancels exactly (dim 1)
  const acc_t* __restrict__ weight = row.weight;
  acc_t* __restrict__ g = dy;
  for (int64_t j = 0; j < dim; ++j) g[j] = dy[j] * weight[j];
  const acc_t mean_g = epilogue.mode == NormMode::kLayernorm
                           ? lane_sum<acc_t>(dim, [&](int64_t j) { return g[j]; }) / static_cast<acc_t>(dim)
                           : acc_t(0);
  const acc_t mean_gx = lane_sum<acc_t>(dim, [&](int64_t j) { return g[j] * x[j]; }) / static_cast<acc_t>(dim);
  for (int64_t j = 0; j < dim; ++j) out[j] = static_cast<scalar_t>(rstd * (g[j] - mean_g - x[j] * mean_gx));
}

// out = grad with the forward's mask, dy a scratch row
template <typename scalar_t, typename acc_t>
EMBEDFAST_INLINE void norm_masked_row(scalar_t* __restrict__ out, acc_t* __restrict__ dy, const scalar_t* __restrict__ grad,
                                      const NormRow<acc_t>& row, uint64_t token_index) {
  masked_grad_row(dy, grad, row, token_index);
  for (int64_t j = 0; j < row.dim; ++j) out[j] = static_cast<scalar_t>(dy[j]);
}

}  // namespace portable
}  // namespace embedfast
