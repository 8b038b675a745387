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
// The per-row work is the norm row loops of row_loops.h, on the instruction-set path of the machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "embedfast/checks.h"
#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"
#include "forward_rows.h"
#include "row_loops.h"

namespace embedfast {

namespace {

// A per-thread buffer of `size` values (the rows a thread works on: they stay in L1).
template <typename T>
T* scratch(int64_t size) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// A (D,) vector as a math-dtype side row in `layout`.
at::Tensor side_row(const at::Tensor& vector, const SideRowLayout& layout, at::ScalarType math_dtype) {
  at::Tensor row = vector.to(math_dtype).contiguous();
  if (layout.natural()) return row;
  std::vector<int64_t> columns(layout.dim());
  for (int64_t slot = 0; slot < layout.dim(); ++slot) columns[slot] = layout.column(slot);
  return row.index_select(0, at::tensor(columns));
}

// The norm epilogue of a call: its constants, and the math-dtype side rows they point to.
template <typename acc_t, typename Args>
struct NormCall {
  at::Tensor weight, bias;
  NormRow<acc_t> row;

  NormCall(const Args& args, const SideRowLayout& layout) {
    const int64_t dim = args.weight.size(1);
    const at::ScalarType math_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto options = args.weight.options().dtype(math_dtype);
    weight = args.norm_weight.has_value() ? side_row(*args.norm_weight, layout, math_dtype) : at::ones({dim}, options);
    bias = args.norm_bias.has_value() ? side_row(*args.norm_bias, layout, math_dtype) : at::zeros({dim}, options);
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
  const SideRowLayout layout(args.weight.scalar_type(), dim);
  const bool stream = stream_output(out.nbytes());
  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_norm_forward_cpu", [&] {
    EMBEDFAST_DISPATCH_TABLE_TYPES(args.weight.scalar_type(), "embedfast_norm_forward_cpu", [&] {
      using acc_t = math_t<scalar_t>;
      const NormCall<acc_t, NormForwardArgs> call(args, layout);
      scalar_t* output = out.data_ptr<scalar_t>();
      acc_t* stats_out = stats.data_ptr<acc_t>();
      const acc_t scale = static_cast<acc_t>(args.scale);
      forward_rows::walk_rows<scalar_t, index_t>(
          forward, layout, walk_grain(dim),
          [&](int64_t, int64_t n, const scalar_t* token_row, const auto* position_row, const scalar_t* segment_row) {
            norm_forward_rows(output + n * dim, stats_out + 2 * n, scratch<acc_t>(dim), token_row, position_row,
                              segment_row, scale, call.row, static_cast<uint64_t>(n * dim), stream);
          },
          [stream] {
            if (stream) end_streaming();
          });
    });
  });
  return {out, stats};
}

// The (D,) gradient from the walk's per-unit partial sums (side rows), added in unit order, in the storage dtype.
at::Tensor sum_unit_partials(const at::Tensor& partials, const SideRowLayout& layout, at::ScalarType dtype) {
  at::Tensor out = at::empty({partials.size(1)}, partials.options().dtype(dtype));
  EMBEDFAST_DISPATCH_TABLE_TYPES(dtype, "embedfast_norm_sum_partials", [&] {
    sum_partials(partials.data_ptr<math_t<scalar_t>>(), partials.size(0), 1, layout, out.data_ptr<scalar_t>());
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
  const SideRowLayout layout(dtype, dim);
  if (tokens > 0) {
    AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_norm_backward_cpu", [&] {
      EMBEDFAST_DISPATCH_TABLE_TYPES(dtype, "embedfast_norm_backward_cpu", [&] {
        using acc_t = math_t<scalar_t>;
        const NormCall<acc_t, NormBackwardArgs> call(args, layout);
        const scalar_t* grad = args.grad_out.data_ptr<scalar_t>();
        scalar_t* output = grad_sum.data_ptr<scalar_t>();
        if (!norm) {  // grad_sum is grad_out, masked: the sum is not needed
          if (!call.row.epilogue.dropout) {
            grad_sum.copy_(args.grad_out);
            return;
          }
          at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
            for (int64_t n = begin; n < end; ++n) {
              norm_masked_rows(output + n * dim, scratch<acc_t>(dim), grad + n * dim, call.row,
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
            forward, layout, walk_grain(dim),
            [&](int64_t unit, int64_t n, const scalar_t* token_row, const auto* position_row, const scalar_t* segment_row) {
              acc_t* rows = scratch<acc_t>(2 * dim);
              norm_backward_rows(output + n * dim, weight_rows ? weight_rows + unit * dim : nullptr,
                                 bias_rows ? bias_rows + unit * dim : nullptr, rows, rows + dim, grad + n * dim,
                                 stats + 2 * n, token_row, position_row, segment_row, scale, call.row,
                                 static_cast<uint64_t>(n * dim));
            },
            [] {});
      });
    });
  }
  const auto none = [&] { return at::empty({0}, args.weight.options()); };  // one each: outputs never alias
  return {grad_sum, weight_grad ? sum_unit_partials(weight_partials, layout, dtype) : none(),
          bias_grad ? sum_unit_partials(bias_partials, layout, dtype) : none()};
}

// The dropout row loop alone, for tests of element indices no test can allocate: row n of `values` (N, D) with the
// mask of elements first_element + n * D + d, as norm_backward applies it without a norm.
at::Tensor dropout_rows_cpu(const at::Tensor& values, const at::Tensor& seed, int64_t first_element, double p) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu(),
              "dropout_rows_cpu: values must be a contiguous 2-D CPU tensor, got shape ", values.sizes());
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "dropout_rows_cpu: seed must be a 1-element int64 CPU tensor");
  TORCH_CHECK(first_element >= 0, "dropout_rows_cpu: first_element must be >= 0, got ", first_element);
  TORCH_CHECK(p > 0 && p < 1, "dropout_rows_cpu: p must be in (0, 1), got ", p);
  const int64_t rows = values.size(0), dim = values.size(1);
  at::Tensor out = at::empty_like(values);
  EMBEDFAST_DISPATCH_TABLE_TYPES(values.scalar_type(), "embedfast_dropout_rows_cpu", [&] {
    using acc_t = math_t<scalar_t>;
    const NormEpilogue<acc_t> epilogue{NormMode::kNone, acc_t(0), static_cast<uint64_t>(seed.item<int64_t>()),
                                       dropout_threshold(p), dropout_scale<acc_t>(p), true};
    const NormRow<acc_t> row{nullptr, nullptr, epilogue, dim};
    for (int64_t n = 0; n < rows; ++n) {
      norm_masked_rows(out.data_ptr<scalar_t>() + n * dim, scratch<acc_t>(dim), values.data_ptr<scalar_t>() + n * dim,
                       row, static_cast<uint64_t>(first_element + n * dim));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(embedfast, m) {
  m.def("dropout_rows_cpu(Tensor values, Tensor seed, int first_element, float p) -> Tensor", &dropout_rows_cpu);
}

TORCH_LIBRARY_IMPL(embedfast, CPU, m) {
  m.impl("norm_forward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormForwardArgs, &norm_forward_cpu>>());
  m.impl("norm_backward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormBackwardArgs, &norm_backward_cpu>>());
}

}  // namespace embedfast
