// CPU kernels of embedfast::norm_forward_extension and embedfast::norm_backward_extension (spec.py).
//
// norm_forward: one parallel pass over tokens (forward_rows.h, the plain forward's walk). Per token the sum row is
// built in the math dtype in a small per-thread buffer (it stays in L1), its (mean, rstd) taken from the buffer (two
// passes for the LAYERNORM variance), and the normalized, weighted, dropped-out row stored once in the storage
// dtype: one read of each table row, one write of each output row.
// norm_backward: the same walk recomputes each token's sum row (NONE needs none: grad_sum is the masked grad_out);
// the norm_weight / norm_bias gradients are summed per unit of the walk (at most kTilePositions tokens, the same
// units for any number of threads), and the units' partial sums then added in unit order: bitwise reproducible.
//
// The row loops are plain loops the compiler vectorizes, compiled for AVX2 and the baseline (EMBEDFAST_ROW_KERNEL);
// the sums over a row run in kLanes lanes combined in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "embedfast/checks.h"
#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"
#include "forward_rows.h"
#include "row_loops.h"

namespace embedfast {

// The per-call constants of the norm epilogue, in the math dtype.
template <typename acc_t>
struct NormRow {
  const acc_t* weight;  // norm_weight, or ones
  const acc_t* bias;    // norm_bias, or zeros
  NormEpilogue<acc_t> epilogue;
  int64_t dim;
};

namespace norm_rows {

constexpr int64_t kLanes = 16;

// Into the row kernels (EMBEDFAST_ROW_KERNEL): compiled for each of their instruction sets.
#if defined(__GNUC__)
#define EMBEDFAST_INLINE inline __attribute__((always_inline))
#else
#define EMBEDFAST_INLINE inline
#endif

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

// The dropout of the elements first, first + 1, ... of one row, on 32-bit lanes (kernel_math.h), and a call of
// body(kept) with it: the row's elements share their high 32 bits unless the row crosses a multiple of 2^32.
struct RowMask {
  uint32_t seed_low, key, first, threshold;
  EMBEDFAST_INLINE bool operator()(int64_t j) const {
    return dropout_bits(seed_low, key, first + static_cast<uint32_t>(j)) >= threshold;
  }
};

template <typename acc_t, typename Body>
EMBEDFAST_INLINE void with_row_mask(const NormEpilogue<acc_t>& epilogue, uint64_t first, int64_t dim, const Body& body) {
  const auto low = static_cast<uint32_t>(first);
  if (static_cast<uint64_t>(low) + static_cast<uint64_t>(dim) <= (uint64_t{1} << 32)) {
    body(RowMask{static_cast<uint32_t>(epilogue.seed), dropout_key(epilogue.seed, static_cast<uint32_t>(first >> 32)),
                 low, epilogue.threshold});
  } else {
    body([&](int64_t j) { return epilogue.kept(first + j); });
  }
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

// The dropout in place: dropped values 0, kept ones scaled (separate from the rounding: both loops vectorize).
template <typename acc_t>
EMBEDFAST_INLINE void drop(acc_t* __restrict__ values, const NormRow<acc_t>& row, uint64_t first_element) {
  const acc_t keep_scale = row.epilogue.keep_scale;
  const int64_t dim = row.dim;
  with_row_mask(row.epilogue, first_element, dim, [values, keep_scale, dim](const auto kept) {
    for (int64_t j = 0; j < dim; ++j) values[j] = keep_or_zero(values[j] * keep_scale, kept(j));
  });
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
EMBEDFAST_INLINE void forward_row(scalar_t* __restrict__ out, acc_t* __restrict__ stats, acc_t* __restrict__ x,
                        const scalar_t* token, const position_t* position, const scalar_t* segment, acc_t scale,
                        const NormRow<acc_t>& row, uint64_t first_element) {
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
  if (row.epilogue.dropout) drop(x, row, first_element);
  for (int64_t j = 0; j < dim; ++j) out[j] = static_cast<scalar_t>(x[j]);
}

// dy = grad in the math dtype, with the forward's mask
template <typename scalar_t, typename acc_t>
EMBEDFAST_INLINE void masked_row(acc_t* __restrict__ dy, const scalar_t* __restrict__ grad, const NormRow<acc_t>& row,
                                 uint64_t first_element) {
  for (int64_t j = 0; j < row.dim; ++j) dy[j] = static_cast<acc_t>(grad[j]);
  if (row.epilogue.dropout) drop(dy, row, first_element);
}

// dy = grad_out with the forward's mask; x_hat = (x - mean) * rstd; g = dy * w;
// grad_sum = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) (RMSNORM: without mean(g)); partial sums
// weight_partial += dy * x_hat, bias_partial += dy (either may be null).
template <typename scalar_t, typename position_t, typename acc_t = math_t<scalar_t>>
EMBEDFAST_INLINE void backward_row(scalar_t* __restrict__ out, acc_t* __restrict__ weight_partial, acc_t* __restrict__ bias_partial,
                         acc_t* __restrict__ x, acc_t* __restrict__ dy, const scalar_t* __restrict__ grad,
                         const acc_t* stats, const scalar_t* token, const position_t* position, const scalar_t* segment,
                         acc_t scale, const NormRow<acc_t>& row, uint64_t first_element) {
  const int64_t dim = row.dim;
  const NormEpilogue<acc_t>& epilogue = row.epilogue;
  masked_row(dy, grad, row, first_element);
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


// The row functions, one compiled (twice: EMBEDFAST_ROW_KERNEL) per storage dtype and position row type.
#define EMBEDFAST_NORM_ROW_KERNELS(scalar_t, position_t)                                                            \
  EMBEDFAST_ROW_KERNEL void norm_forward_row(scalar_t* out, math_t<scalar_t>* stats, math_t<scalar_t>* x,          \
                                             const scalar_t* token, const position_t* position,                     \
                                             const scalar_t* segment, math_t<scalar_t> scale,                       \
                                             const NormRow<math_t<scalar_t>>& row, uint64_t first_element) {        \
    forward_row(out, stats, x, token, position, segment, scale, row, first_element);                                \
  }                                                                                                                  \
  EMBEDFAST_ROW_KERNEL void norm_backward_row(                                                                       \
      scalar_t* out, math_t<scalar_t>* weight_partial, math_t<scalar_t>* bias_partial, math_t<scalar_t>* x,         \
      math_t<scalar_t>* dy, const scalar_t* grad, const math_t<scalar_t>* stats, const scalar_t* token,             \
      const position_t* position, const scalar_t* segment, math_t<scalar_t> scale,                                   \
      const NormRow<math_t<scalar_t>>& row, uint64_t first_element) {                                                \
    backward_row(out, weight_partial, bias_partial, x, dy, grad, stats, token, position, segment, scale, row,      \
                 first_element);                                                                                     \
  }
#define EMBEDFAST_MASKED_ROW_KERNEL(scalar_t)                                                                         \
  EMBEDFAST_ROW_KERNEL void norm_masked_row(scalar_t* out, math_t<scalar_t>* dy, const scalar_t* grad,                \
                                            const NormRow<math_t<scalar_t>>& row, uint64_t first_element) {          \
    masked_row(dy, grad, row, first_element);                                                                         \
    for (int64_t j = 0; j < row.dim; ++j) out[j] = static_cast<scalar_t>(dy[j]);                                      \
  }

EMBEDFAST_NORM_ROW_KERNELS(float, float)
EMBEDFAST_NORM_ROW_KERNELS(double, double)
EMBEDFAST_NORM_ROW_KERNELS(c10::Half, float)
EMBEDFAST_NORM_ROW_KERNELS(c10::Half, c10::Half)
EMBEDFAST_NORM_ROW_KERNELS(c10::BFloat16, float)
EMBEDFAST_NORM_ROW_KERNELS(c10::BFloat16, c10::BFloat16)
EMBEDFAST_MASKED_ROW_KERNEL(float)
EMBEDFAST_MASKED_ROW_KERNEL(double)
EMBEDFAST_MASKED_ROW_KERNEL(c10::Half)
EMBEDFAST_MASKED_ROW_KERNEL(c10::BFloat16)
#undef EMBEDFAST_MASKED_ROW_KERNEL
#undef EMBEDFAST_NORM_ROW_KERNELS

#undef EMBEDFAST_INLINE
}  // namespace norm_rows

namespace {

// A per-thread buffer of `size` values (the rows a thread works on: they stay in L1).
template <typename T>
T* scratch(int64_t size) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// The norm epilogue of a call: its constants, and the math-dtype vectors they point to.
template <typename acc_t, typename Args>
struct NormCall {
  at::Tensor weight, bias;
  NormRow<acc_t> row;

  explicit NormCall(const Args& args) {
    const int64_t dim = args.weight.size(1);
    const auto options = args.weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    weight = args.norm_weight.has_value() ? args.norm_weight->to(options.dtype()) : at::ones({dim}, options);
    bias = args.norm_bias.has_value() ? args.norm_bias->to(options.dtype()) : at::zeros({dim}, options);
    NormEpilogue<acc_t> epilogue = norm_epilogue<acc_t>(args);
    if (epilogue.dropout) epilogue.seed = static_cast<uint64_t>(args.dropout_seed->template data_ptr<int64_t>()[0]);
    row = {weight.template data_ptr<acc_t>(), bias.template data_ptr<acc_t>(), epilogue, dim};
  }
};

// Units of the walk per parallel task: about 16K elements.
int64_t walk_grain(int64_t dim) { return std::max<int64_t>(1, 16384 / (std::max<int64_t>(dim, 1) * kTilePositions)); }

std::tuple<at::Tensor, at::Tensor> norm_forward_cpu(const NormForwardArgs& args) {
  const ForwardArgs forward = check_norm_forward_args(args, /*exact=*/true);
  const int64_t tokens = args.input_ids.numel(), dim = args.weight.size(1);
  const at::ScalarType math_dtype = compute_dtype(args.weight.scalar_type());
  at::Tensor out = at::empty({tokens, dim}, args.weight.options());
  at::Tensor stats = at::empty({tokens, 2}, args.weight.options().dtype(math_dtype));
  if (tokens == 0) return {out, stats};
  const SideRowLayout layout(math_dtype, dim);  // natural order: the sum row is built by the loops here
  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_norm_forward_cpu", [&] {
    EMBEDFAST_DISPATCH_TABLE_TYPES(args.weight.scalar_type(), "embedfast_norm_forward_cpu", [&] {
      using acc_t = math_t<scalar_t>;
      const NormCall<acc_t, NormForwardArgs> call(args);
      scalar_t* output = out.data_ptr<scalar_t>();
      acc_t* stats_out = stats.data_ptr<acc_t>();
      const acc_t scale = static_cast<acc_t>(args.scale);
      forward_rows::walk_rows<scalar_t, index_t>(
          forward, layout, walk_grain(dim),
          [&](int64_t, int64_t n, const scalar_t* token_row, const auto* position_row, const scalar_t* segment_row) {
            norm_rows::norm_forward_row(output + n * dim, stats_out + 2 * n, scratch<acc_t>(dim), token_row, position_row,
                                        segment_row, scale, call.row, static_cast<uint64_t>(n * dim));
          },
          [] {});
    });
  });
  return {out, stats};
}

// The (D,) gradient from the walk's per-unit partial sums, added in unit order, in the storage dtype.
at::Tensor sum_partials(const at::Tensor& partials, at::ScalarType dtype) {
  const int64_t units = partials.size(0), dim = partials.size(1);
  at::Tensor out = at::empty({dim}, partials.options().dtype(dtype));
  EMBEDFAST_DISPATCH_TABLE_TYPES(dtype, "embedfast_norm_sum_partials", [&] {
    using acc_t = math_t<scalar_t>;
    const acc_t* rows = partials.data_ptr<acc_t>();
    scalar_t* result = out.data_ptr<scalar_t>();
    at::parallel_for(0, dim, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> total(end - begin, acc_t(0));
      for (int64_t u = 0; u < units; ++u) {
        const acc_t* row = rows + u * dim + begin;
        for (int64_t j = 0; j < end - begin; ++j) total[j] += row[j];
      }
      for (int64_t j = 0; j < end - begin; ++j) result[begin + j] = static_cast<scalar_t>(total[j]);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cpu(const NormBackwardArgs& args) {
  const ForwardArgs forward = check_norm_backward_args(args, /*exact=*/true);
  const int64_t tokens = args.input_ids.numel(), dim = args.weight.size(1);
  const at::ScalarType dtype = args.weight.scalar_type(), math_dtype = compute_dtype(dtype);
  at::Tensor grad_sum = at::empty({tokens, dim}, args.weight.options());
  const bool norm = args.norm_mode != NormMode::kNone;
  const bool weight_grad = norm && args.norm_grads && args.norm_weight.has_value();
  const bool bias_grad = norm && args.norm_grads && args.norm_bias.has_value();
  const int64_t units = tokens > 0 ? forward_rows::walk_of(forward).units() : 0;
  const auto partial_options = args.weight.options().dtype(math_dtype);
  at::Tensor weight_partials = weight_grad ? at::zeros({units, dim}, partial_options) : at::Tensor();
  at::Tensor bias_partials = bias_grad ? at::zeros({units, dim}, partial_options) : at::Tensor();
  if (tokens > 0) {
    AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_norm_backward_cpu", [&] {
      EMBEDFAST_DISPATCH_TABLE_TYPES(dtype, "embedfast_norm_backward_cpu", [&] {
        using acc_t = math_t<scalar_t>;
        const NormCall<acc_t, NormBackwardArgs> call(args);
        const scalar_t* grad = args.grad_out.data_ptr<scalar_t>();
        scalar_t* output = grad_sum.data_ptr<scalar_t>();
        if (!norm) {  // grad_sum is grad_out, masked: the sum is not needed
          if (!call.row.epilogue.dropout) {
            grad_sum.copy_(args.grad_out);
            return;
          }
          at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
            for (int64_t n = begin; n < end; ++n) {
              norm_rows::norm_masked_row(output + n * dim, scratch<acc_t>(dim), grad + n * dim, call.row,
                                         static_cast<uint64_t>(n * dim));
            }
          });
          return;
        }
        const acc_t* stats = args.stats.data_ptr<acc_t>();
        acc_t* weight_rows = weight_grad ? weight_partials.data_ptr<acc_t>() : nullptr;
        acc_t* bias_rows = bias_grad ? bias_partials.data_ptr<acc_t>() : nullptr;
        const acc_t scale = static_cast<acc_t>(args.scale);
        forward_rows::walk_rows<scalar_t, index_t>(
            forward, SideRowLayout(math_dtype, dim), walk_grain(dim),
            [&](int64_t unit, int64_t n, const scalar_t* token_row, const auto* position_row, const scalar_t* segment_row) {
              acc_t* rows = scratch<acc_t>(2 * dim);
              norm_rows::norm_backward_row(output + n * dim, weight_rows ? weight_rows + unit * dim : nullptr,
                                           bias_rows ? bias_rows + unit * dim : nullptr, rows, rows + dim, grad + n * dim,
                                           stats + 2 * n, token_row, position_row, segment_row, scale, call.row,
                                           static_cast<uint64_t>(n * dim));
            },
            [] {});
      });
    });
  }
  const auto none = [&] { return at::empty({0}, args.weight.options()); };  // one each: outputs never alias
  return {grad_sum, weight_grad ? sum_partials(weight_partials, dtype) : none(),
          bias_grad ? sum_partials(bias_partials, dtype) : none()};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedfast, CPU, m) {
  m.impl("norm_forward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormForwardArgs, &norm_forward_cpu>>());
  m.impl("norm_backward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormBackwardArgs, &norm_backward_cpu>>());
}

}  // namespace embedfast
