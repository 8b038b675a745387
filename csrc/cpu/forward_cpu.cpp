// CPU kernel of embedfast::forward_extension.
//
// One parallel pass over tokens (token_walk.h); each output row is written once from the token row (prefetched a
// few rows ahead), a math-dtype position row and a math-dtype segment row, around the caches when the output is
// big (row_loops.h). Where the position rows come from is PositionRows' choice: the learned table, sinusoid rows
// (sinusoid_rows.h) cached between calls for default and packed positions or made per call for explicit
// position_ids, or, for default positions past the cache, rows each thread rotates along its tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "embedfast/checks.h"
#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"
#include "row_loops.h"
#include "sinusoid_rows.h"
#include "token_walk.h"

namespace embedfast {
namespace {

constexpr int64_t kPrefetchRows = 2;  // token rows asked for ahead of use

// The position term as side rows, and how a token finds its row.
struct PositionRows {
  at::Tensor table;           // keeps the rows alive
  int64_t first = 0;          // row r holds position first + r
  bool per_token = false;     // row n holds token n's position
  bool constant_row = false;  // one zero row for every token
  bool rotate = false;        // default sinusoid positions past the cache: each thread rotates rows along its tiles

  int64_t row(int64_t token, int64_t position) const {
    if (constant_row) return 0;
    if (per_token) return token;
    return position - first;
  }
};

template <typename index_t>
int64_t longest_document(const PositionSource<index_t>& source) {
  int64_t longest = 0;
  for (int64_t i = 0; i < source.num_documents; ++i) {
    longest = std::max<int64_t>(longest, source.cu_seqlens[i + 1] - source.cu_seqlens[i]);
  }
  return longest;
}

// Position rows [first, first + rows): the rows of the learned table (only those: a call's cost does not grow
// with the table), or sinusoid rows, from the cached table of [0, first + rows) when it fits, else made.
PositionRows position_span(const SideRowLayout& layout, const ForwardArgs& args, int64_t first, int64_t rows,
                           at::ScalarType math_dtype) {
  PositionRows span;
  if (args.position_mode == PositionMode::kLearned) {
    span.table = layout.side_rows(args.position_weight->narrow(0, first, rows), math_dtype);
    span.first = first;
    return span;
  }
  span.table = cached_sinusoid(layout, args.position_mode, args.sinusoid_base, first + rows, math_dtype);
  if (!span.table.defined()) {
    span.table = sinusoid_range(first, rows, sinusoid_columns(layout, args.position_mode, args.sinusoid_base), math_dtype);
    span.first = first;
  }
  return span;
}

template <typename index_t>
PositionRows position_rows(const ForwardArgs& args, const PositionSource<index_t>& source, const SideRowLayout& layout,
                           const Walk& walk, at::ScalarType math_dtype) {
  PositionRows rows;
  const bool learned = args.position_mode == PositionMode::kLearned;
  if (args.position_mode == PositionMode::kNone) {
    rows.table = at::zeros({1, layout.dim()}, at::TensorOptions().dtype(math_dtype));
    rows.constant_row = true;
  } else if (source.packed()) {
    rows = position_span(layout, args, source.offset, longest_document(source), math_dtype);
  } else if (source.position_ids == nullptr) {
    if (learned) return position_span(layout, args, source.offset, walk.period, math_dtype);
    rows.table = cached_sinusoid(layout, args.position_mode, args.sinusoid_base, source.offset + walk.period, math_dtype);
    rows.rotate = !rows.table.defined();
  } else {
    const auto [lo, hi] = at::aminmax(*args.position_ids);
    const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
    if (high - low + 1 <= walk.tokens) return position_span(layout, args, low, high - low + 1, math_dtype);
    rows.table = learned ? layout.side_rows(args.position_weight->index_select(0, *args.position_ids), math_dtype)
                         : sinusoid_per_token(source.position_ids, walk.tokens,
                                              sinusoid_columns(layout, args.position_mode, args.sinusoid_base), math_dtype);
    rows.per_token = true;
  }
  return rows;
}

at::Tensor forward_cpu(const ForwardArgs& args) {
  check_forward_args(args, /*exact=*/true);  // on CPU the exact check is cheap: always made
  const int64_t tokens = args.input_ids.numel(), dim = args.weight.size(1);
  at::Tensor out = at::empty({tokens, dim}, args.weight.options());
  if (tokens == 0 || dim == 0) return out;
  const at::ScalarType math_dtype = compute_dtype(args.weight.scalar_type());
  const SideRowLayout layout(args.weight.scalar_type(), dim);

  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_forward_cpu", [&] {
    const PositionSource<index_t> source = position_source<index_t>(args);
    const bool default_positions = source.position_ids == nullptr && !source.packed();
    const Walk walk = Walk::over(tokens, source.seq_len, default_positions);
    const PositionRows positions = position_rows(args, source, layout, walk, math_dtype);
    const at::Tensor segments = args.segment_weight.has_value() ? layout.side_rows(*args.segment_weight, math_dtype)
                                                                : at::zeros({1, dim}, args.weight.options().dtype(math_dtype));
    const std::vector<SinusoidColumn> columns =
        positions.rotate ? sinusoid_columns(layout, args.position_mode, args.sinusoid_base) : std::vector<SinusoidColumn>();
    const index_t* ids = args.input_ids.data_ptr<index_t>();
    const index_t* seg_ids = data_or_null<index_t>(args.token_type_ids);
    const Shard shard = shard_of(args, args.weight.size(0));
    const Chunk chunk = chunk_of(args);
    EMBEDFAST_DISPATCH_TABLE_TYPES(args.weight.scalar_type(), "embedfast_forward_cpu", [&] {
      using acc_t = math_t<scalar_t>;
      const scalar_t* table = args.weight.data_ptr<scalar_t>();
      const acc_t* position_table = positions.rotate ? nullptr : positions.table.data_ptr<acc_t>();
      const acc_t* segment_table = segments.data_ptr<acc_t>();
      // the rows of tokens of another shard, and the side rows of tokens out of the chunk
      const std::vector<scalar_t> zero_token_row(dim, scalar_t(0));
      const std::vector<acc_t> zero_side_row(chunk.whole() ? 0 : dim, acc_t(0));
      scalar_t* output = out.data_ptr<scalar_t>();
      const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
      const bool stream = stream_output(out.nbytes());
      const auto seeds = positions.rotate ? rotation_seeds(columns, source.offset, walk.period) : std::vector<double>();
      const int64_t grain = std::max<int64_t>(1, 16384 / (dim * kTilePositions));
      at::parallel_for(0, walk.units(), grain, [&](int64_t begin, int64_t end) {
        std::optional<SinusoidRotation> rotation;
        std::vector<acc_t> tile_rows;  // sinusoid rows of the current tile's offsets
        int64_t tile_first = -1, rotation_at = -1;
        if (positions.rotate) {
          rotation.emplace(columns);
          tile_rows.resize(kTilePositions * dim);
        }
        for (int64_t unit = begin; unit < end; ++unit) {
          const int64_t first = walk.first_offset(unit), n0 = walk.first_token(unit), length = walk.length(unit);
          if (positions.rotate && first != tile_first) {  // exact seeds every kRotationSteps offsets and after jumps
            for (int64_t k = first; k < std::min(walk.period, first + kTilePositions); ++k) {
              if (k % kRotationSteps == 0) {
                const int64_t seed = k / kRotationSteps;
                rotation->restore(seeds.data() + 2 * seed * dim, seeds.data() + (2 * seed + 1) * dim);
              } else if (k != rotation_at) {
                rotation->seek(source.offset + k);
              }
              rotation->emit_and_advance(tile_rows.data() + (k - first) * dim);
              rotation_at = k + 1;
            }
            tile_first = first;
          }
          // the token kPrefetchRows steps ahead may be in the next unit
          const int64_t next_n0 = unit + 1 < end ? walk.first_token(unit + 1) : 0;
          const int64_t next_length = unit + 1 < end ? walk.length(unit + 1) : 0;
          for (int64_t i = 0; i < length; ++i) {
            const int64_t n = n0 + i, ahead = i + kPrefetchRows;
            if (ahead < length || ahead - length < next_length) {
              const int64_t m = ahead < length ? n0 + ahead : next_n0 + ahead - length;
              const int64_t row = shard.row(static_cast<int64_t>(ids[m]));
              if (row >= 0) prefetch_row(table + row * dim, row_bytes);
            }
            const int64_t row = shard.row(static_cast<int64_t>(ids[n]));
            const scalar_t* token_row = row >= 0 ? table + row * dim : zero_token_row.data();
            const acc_t* position_row = zero_side_row.data();
            const acc_t* segment_row = zero_side_row.data();
            if (chunk.contains(n)) {
              const int64_t position = default_positions ? source.offset + first + i : source(n);
              position_row = positions.rotate ? tile_rows.data() + i * dim : position_table + positions.row(n, position) * dim;
              segment_row = segment_table + (seg_ids != nullptr ? static_cast<int64_t>(seg_ids[n]) : 0) * dim;
            }
            combine_rows(output + n * dim, token_row, position_row, segment_row, static_cast<acc_t>(args.scale), dim,
                         stream);
          }
        }
        if (stream) end_streaming();
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedfast, CPU, m) {
  m.impl("forward_extension", torch::CppFunction::makeFromBoxedFunction<&boxed<ForwardArgs, &forward_cpu>>());
}

}  // namespace embedfast
