// CPU kernels of embedfast::norm_forward_extension and embedfast::norm_backward_extension (spec.py).
//
// norm_forward: one parallel pass over tokens (forward_rows.h, the plain forward's walk). Per token the sum row is
// built in the math dtype in a small per-thread buffer (it stays in L1), its (mean, rstd) taken from the buffer (two
// passes for the LAYERNORM variance), and the normalized, weighted, dropped-out row stored once in the storage
// dtype: one read of each table row, one write of each output row.
// norm_backward: one pass over grad_out, on the same walk. Per token it recomputes the sum row (NONE needs none: the
// sum's gradient is grad_out, masked), makes the sum's gradient row in the storage dtype, and at once writes it as
// the sparse values (times scale) and adds it to the tile's (offset, segment) sums, whence the position rows and the
// segment sums (table_sums.h, as the plain backward does). The norm_weight / norm_bias and segment sums are per block
// of the walk (whole tiles, the same blocks for any number of threads), the blocks' partial sums then added in block
// order: bitwise reproducible. Dense token gradients, and position gradients of explicit or packed positions, are
// summed by key afterwards from an (N, D) grad_sum that the pass writes for them.
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
#include "table_sums.h"

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
                              segment_row, scale, call.row, static_cast<uint64_t>(n), stream);
          },
          [stream] {
            if (stream) end_streaming();
          });
    });
  });
  return {out, stats};
}

// The (D,) gradient from the walk's per-block partial sums (side rows), added in block order, in the storage dtype.
at::Tensor sum_unit_partials(const at::Tensor& partials, const SideRowLayout& layout, at::ScalarType dtype) {
  at::Tensor out = at::empty({partials.size(1)}, partials.options().dtype(dtype));
  EMBEDFAST_DISPATCH_TABLE_TYPES(dtype, "embedfast_norm_sum_partials", [&] {
    sum_partials(partials.data_ptr<math_t<scalar_t>>(), partials.size(0), 1, layout, out.data_ptr<scalar_t>());
  });
  return out;
}

// What every task of a norm backward reads and writes: the call's rows, where each gradient goes, and how the walk's
// units group into blocks (units_per_block, a whole number of tiles) for the partial sums.
template <typename scalar_t, typename index_t>
struct NormBackwardPass {
  using acc_t = math_t<scalar_t>;
  const NormRow<acc_t>& row;
  const Walk& walk;
  int64_t units_per_block;
  const scalar_t* grad;
  const acc_t* stats;
  acc_t scale;
  const index_t* seg_ids;  // null: segment 0 (no segment gradient)
  Chunk chunk;
  scalar_t* values;        // the sparse values (N, D), or null
  scalar_t* grad_sum;      // (N, D) rows of the sum's gradient for the sums by key, or null
  bool stream;
  acc_t* weight_partials;  // (blocks, D) side rows, or null
  acc_t* bias_partials;
  acc_t* segment_partials;  // (blocks, num_segments, D) side rows, or null
  int64_t num_segments;
  scalar_t* position_rows;  // tile sums: the rows of positions offset + [0, period), or null
};

// One parallel task of a norm backward: per token, the sum's gradient row (in a row of its own, or of grad_sum),
// then that row into the sparse values, the tile's (offset, segment) sums or the block's segment sums.
template <typename scalar_t, typename index_t>
class NormBackwardTask {
 public:
  using acc_t = math_t<scalar_t>;

  explicit NormBackwardTask(const NormBackwardPass<scalar_t, index_t>& pass)
      : pass_(pass), dim_(pass.row.dim), row_(dim_), math_rows_(2 * dim_),
        tile_sums_(std::max<int64_t>(pass.num_segments, 1), pass.position_rows != nullptr ? dim_ : 0) {}

  template <typename position_t>
  void operator()(int64_t unit, int64_t n, const scalar_t* token, const position_t* position, const scalar_t* segment) {
    const NormBackwardPass<scalar_t, index_t>& pass = pass_;
    const int64_t dim = dim_, block = unit / pass.units_per_block, tile = unit / pass.walk.sequences;
    if (pass.position_rows != nullptr && tile != tile_) {
      flush();
      tile_ = tile;
      tile_sums_.clear();
    }
    const scalar_t* grad = pass.grad + n * dim;
    scalar_t* gradient = pass.grad_sum != nullptr ? pass.grad_sum + n * dim : row_.data();
    const auto token_index = static_cast<uint64_t>(n);
    if (pass.row.epilogue.mode != NormMode::kNone) {
      norm_backward_rows(gradient, pass.weight_partials ? pass.weight_partials + block * dim : nullptr,
                         pass.bias_partials ? pass.bias_partials + block * dim : nullptr, math_rows_.data(),
                         math_rows_.data() + dim, grad, pass.stats + 2 * n, token, position, segment, pass.scale,
                         pass.row, token_index);
    } else if (pass.row.epilogue.dropout) {
      norm_masked_rows(gradient, math_rows_.data(), grad, pass.row, token_index);
    } else {
      gradient = const_cast<scalar_t*>(grad);  // read only: the sum's gradient is grad_out
    }
    acc_t* sum = nullptr;
    if (pass.chunk.contains(n)) {
      const int64_t seg = pass.seg_ids != nullptr ? static_cast<int64_t>(pass.seg_ids[n]) : 0;
      if (pass.position_rows != nullptr) {
        sum = tile_sums_.row(n - pass.walk.first_token(unit), seg);
      } else if (pass.segment_partials != nullptr) {
        sum = pass.segment_partials + (block * pass.num_segments + seg) * dim;
      }
    }
    if (pass.values != nullptr || sum != nullptr) {
      scale_or_accumulate_rows(pass.values != nullptr ? pass.values + n * dim : nullptr, sum, gradient, pass.scale, dim,
                               pass.stream);
    }
  }

  void finish() {
    flush();
    if (pass_.stream) end_streaming();
  }

 private:
  void flush() {
    if (tile_ < 0) return;
    const int64_t first = tile_ * kTilePositions, block = tile_ * pass_.walk.sequences / pass_.units_per_block;
    tile_sums_.flush(std::min(kTilePositions, pass_.walk.period - first), pass_.position_rows + first * dim_,
                     pass_.segment_partials ? pass_.segment_partials + block * pass_.num_segments * dim_ : nullptr,
                     pass_.segment_partials ? pass_.num_segments : 0);
    tile_ = -1;
  }

  const NormBackwardPass<scalar_t, index_t>& pass_;
  int64_t dim_;
  std::vector<scalar_t> row_;
  std::vector<acc_t> math_rows_;  // x and dy
  TileSums<acc_t> tile_sums_;
  int64_t tile_ = -1;
};

// One pass over grad_out (norm_cpu.cpp's header): the walk recomputes each token's sum and makes its gradient row,
// which goes at once into the sparse values and the position / segment sums; the norm weight / bias sums are per
// block of the walk. Dense token gradients and position gradients of explicit or packed positions are then summed by
// key from an (N, D) grad_sum (grad_out itself without a norm or dropout).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_backward_cpu(const NormBackwardArgs& args) {
  const ForwardArgs forward = check_norm_backward_args(args, /*exact=*/true);
  const int64_t tokens = args.input_ids.numel(), dim = args.weight.size(1);
  const at::ScalarType dtype = args.weight.scalar_type(), math_dtype = compute_dtype(dtype);
  const auto options = args.weight.options(), math_options = options.dtype(math_dtype);
  const bool norm = args.norm_mode != NormMode::kNone;
  const bool sparse = args.token_grad == TokenGrad::kSparse, dense = args.token_grad == TokenGrad::kDense;
  const bool weight_grad = norm && args.norm_grads && args.norm_weight.has_value();
  const bool bias_grad = norm && args.norm_grads && args.norm_bias.has_value();
  const BackwardArgs tables = backward_part(args, at::Tensor());
  const int64_t num_positions = tables.num_positions, num_segments = tables.num_segments;
  const bool default_positions = !args.position_ids.has_value() && !args.cu_seqlens.has_value();
  const bool tile_sums = num_positions > 0 && default_positions && num_segments <= kMaxTileSegments;
  const bool sums_by_key = dense || (num_positions > 0 && !tile_sums);
  const bool masked = norm || args.dropout_p > 0;  // else the sum's gradient is grad_out

  const Walk walk = tokens > 0 ? forward_rows::walk_of(forward) : Walk{0, 0, 1};
  const int64_t tokens_per_tile = kTilePositions * std::max<int64_t>(walk.sequences, 1);
  const int64_t tiles_per_block = std::max((kMinTokensPerBlock + tokens_per_tile - 1) / tokens_per_tile,
                                           (walk.tiles() + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t blocks = (walk.tiles() + tiles_per_block - 1) / tiles_per_block;
  at::Tensor token_out = at::empty({sparse ? tokens : (dense ? args.weight.size(0) : 0), dim}, options);
  at::Tensor position_out = tile_sums ? at::zeros({num_positions, dim}, options) : at::empty({num_positions, dim}, options);
  at::Tensor segment_out = at::empty({num_segments, dim}, options);
  at::Tensor grad_sum = sums_by_key && masked ? at::empty({tokens, dim}, options) : at::Tensor();
  at::Tensor weight_partials = at::zeros({weight_grad ? blocks : 0, dim}, math_options);
  at::Tensor bias_partials = at::zeros({bias_grad ? blocks : 0, dim}, math_options);
  at::Tensor segment_partials = at::zeros({num_segments > 0 ? blocks : 0, num_segments, dim}, math_options);
  const SideRowLayout layout(dtype, dim);
  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_norm_backward_cpu", [&] {
    EMBEDFAST_DISPATCH_TABLE_TYPES(dtype, "embedfast_norm_backward_cpu", [&] {
      using acc_t = math_t<scalar_t>;
      const NormCall<acc_t, NormBackwardArgs> call(args, layout);
      const scalar_t* grad = args.grad_out.data_ptr<scalar_t>();
      if (tokens > 0) {
        const NormBackwardPass<scalar_t, index_t> pass{
            call.row, walk, tiles_per_block * walk.sequences, grad,
            norm ? args.stats.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(args.scale),
            num_segments > 0 ? data_or_null<index_t>(args.token_type_ids) : nullptr, chunk_of(args),
            sparse ? token_out.data_ptr<scalar_t>() : nullptr,
            grad_sum.defined() ? grad_sum.data_ptr<scalar_t>() : nullptr, sparse && stream_output(token_out.nbytes()),
            weight_grad ? weight_partials.data_ptr<acc_t>() : nullptr,
            bias_grad ? bias_partials.data_ptr<acc_t>() : nullptr,
            num_segments > 0 ? segment_partials.data_ptr<acc_t>() : nullptr, num_segments,
            tile_sums ? position_out.data_ptr<scalar_t>() + args.position_offset * dim : nullptr};
        forward_rows::walk_tasks<scalar_t, index_t>(
            forward, layout, forward_rows::WalkSplit{walk_grain(dim), tiles_per_block * walk.sequences, norm},
            [&] { return NormBackwardTask<scalar_t, index_t>(pass); });
      }
      sum_partials(segment_partials.data_ptr<acc_t>(), blocks, num_segments, layout, segment_out.data_ptr<scalar_t>());
      const scalar_t* keyed = grad_sum.defined() ? grad_sum.data_ptr<scalar_t>() : grad;
      if (dense) {
        const index_t* ids = args.input_ids.data_ptr<index_t>();
        const Shard shard = shard_of(args, args.weight.size(0));
        const int64_t padding_idx = args.padding_idx;
        sum_rows_by_key(keyed, tokens, layout, args.weight.size(0),
                        [&](int64_t n) {
                          const int64_t id = static_cast<int64_t>(ids[n]);
                          return id == padding_idx ? int64_t(-1) : shard.row(id);
                        },
                        args.scale, token_out.data_ptr<scalar_t>());
      }
      if (num_positions > 0 && !tile_sums) {
        const PositionSource<index_t> source = position_source<index_t>(args);
        const Chunk chunk = chunk_of(args);
        sum_rows_by_key(keyed, tokens, layout, num_positions,
                        [&](int64_t n) { return chunk.contains(n) ? source(n) : int64_t(-1); }, 1.0,
                        position_out.data_ptr<scalar_t>());
      }
    });
  });
  const auto none = [&] { return at::empty({0}, options); };  // one each: outputs never alias
  return {token_out, position_out, segment_out, weight_grad ? sum_unit_partials(weight_partials, layout, dtype) : none(),
          bias_grad ? sum_unit_partials(bias_partials, layout, dtype) : none()};
}

// The dropout row loop alone, for tests of row indices no test can allocate: row n of `values` (N, D) with the mask of
// output row first_row + n, as norm_backward applies it without a norm.
at::Tensor dropout_rows_cpu(const at::Tensor& values, const at::Tensor& seed, int64_t first_row, double p) {
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous() && values.device().is_cpu(),
              "dropout_rows_cpu: values must be a contiguous 2-D CPU tensor, got shape ", values.sizes());
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "dropout_rows_cpu: seed must be a 1-element int64 CPU tensor");
  TORCH_CHECK(first_row >= 0, "dropout_rows_cpu: first_row must be >= 0, got ", first_row);
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
                       row, static_cast<uint64_t>(first_row + n));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(embedfast, m) {
  m.def("dropout_rows_cpu(Tensor values, Tensor seed, int first_row, float p) -> Tensor", &dropout_rows_cpu);
}

TORCH_LIBRARY_IMPL(embedfast, CPU, m) {
  m.impl("norm_forward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormForwardArgs, &norm_forward_cpu>>());
  m.impl("norm_backward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormBackwardArgs, &norm_backward_cpu>>());
}

}  // namespace embedfast
