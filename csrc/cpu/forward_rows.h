// The per-token rows of the CPU forward, shared by forward_cpu.cpp and norm_cpu.cpp: for every token, its token row
// (scaled by the caller), position row and segment row, visited in the walk's order (token_walk.h).
//
// The token rows (prefetched a few rows ahead), the rows of the learned position and segment tables are read in the
// storage dtype, as they are: a call converts nothing and its cost does not grow with a table. Sinusoid position
// rows are math-dtype side rows (sinusoid_rows.h) in the caller's layout, cached between calls for default and
// packed positions or made per call for explicit position_ids, or, for default positions past the cache, rows each
// thread rotates along its tiles.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"
#include "row_loops.h"
#include "sinusoid_rows.h"
#include "token_walk.h"

namespace embedfast {
namespace forward_rows {

constexpr int64_t kPrefetchRows = 2;  // token rows asked for ahead of use

// Sinusoid position rows, and how a token finds its row.
struct SinusoidRows {
  at::Tensor table;        // keeps the rows alive
  int64_t first = 0;       // row r holds position first + r
  bool per_token = false;  // row n holds token n's position
  bool rotate = false;     // default positions past the cache: each thread rotates rows along its tiles

  int64_t row(int64_t token, int64_t position) const { return per_token ? token : position - first; }
};

template <typename index_t>
int64_t longest_document(const PositionSource<index_t>& source) {
  int64_t longest = 0;
  for (int64_t i = 0; i < source.num_documents; ++i) {
    longest = std::max<int64_t>(longest, source.cu_seqlens[i + 1] - source.cu_seqlens[i]);
  }
  return longest;
}

// Sinusoid rows of positions [first, first + rows): from the cached table of [0, first + rows) when it fits, else made.
inline SinusoidRows sinusoid_span(const SideRowLayout& layout, const ForwardArgs& args, int64_t first, int64_t rows,
                           at::ScalarType math_dtype) {
  SinusoidRows span;
  span.table = cached_sinusoid(layout, args.position_mode, args.sinusoid_base, first + rows, math_dtype);
  if (!span.table.defined()) {
    span.table = sinusoid_range(first, rows, sinusoid_columns(layout, args.position_mode, args.sinusoid_base), math_dtype);
    span.first = first;
  }
  return span;
}

template <typename index_t>
SinusoidRows sinusoid_rows(const ForwardArgs& args, const PositionSource<index_t>& source, const SideRowLayout& layout,
                           const Walk& walk, at::ScalarType math_dtype) {
  if (source.packed()) return sinusoid_span(layout, args, source.offset, longest_document(source), math_dtype);
  SinusoidRows rows;
  if (source.position_ids == nullptr) {
    rows.table = cached_sinusoid(layout, args.position_mode, args.sinusoid_base, source.offset + walk.period, math_dtype);
    rows.rotate = !rows.table.defined();
    return rows;
  }
  const auto [lo, hi] = at::aminmax(*args.position_ids);
  const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
  if (high - low + 1 <= walk.tokens) return sinusoid_span(layout, args, low, high - low + 1, math_dtype);
  rows.table = sinusoid_per_token(source.position_ids, walk.tokens,
                                  sinusoid_columns(layout, args.position_mode, args.sinusoid_base), math_dtype);
  rows.per_token = true;
  return rows;
}

// The walk of a forward's tokens (token_walk.h): tile by tile for default positions, else in token order.
inline Walk walk_of(const ForwardArgs& args) {
  const bool default_positions = !args.position_ids.has_value() && !args.cu_seqlens.has_value();
  return Walk::over(args.input_ids.numel(), std::max<int64_t>(args.seq_len, 1), default_positions);
}

// How walk_tasks splits the walk: at least `grain` units per parallel task, each task a whole number of `align`
// units (the last one perhaps fewer); `prefetch_tokens`: whether the rows read the token rows (else no prefetch).
struct WalkSplit {
  int64_t grain;
  int64_t align = 1;
  bool prefetch_tokens = true;
};

// Visits every token of a forward's arguments (checked) once, in parallel over the units of walk_of(args): each
// parallel task makes its own `auto task = make_task()`, calls task(unit, n, token_row, position_row, segment_row)
// for its units' tokens, in order, then task.finish(). token_row: a storage-dtype row of weight (a zero row for an
// id of another shard; the caller scales it); position_row: the learned table's row (scalar_t) or a math-dtype side
// row in `layout` (sinusoids, zeros); segment_row: a storage-dtype row (zeros without a segment table or out of the
// chunk).
template <typename scalar_t, typename index_t, typename MakeTask>
void walk_tasks(const ForwardArgs& args, const SideRowLayout& layout, const WalkSplit& split, const MakeTask& make_task) {
  using acc_t = math_t<scalar_t>;
  const int64_t dim = args.weight.size(1);
  const at::ScalarType math_dtype = compute_dtype(args.weight.scalar_type());
  const PositionSource<index_t> source = position_source<index_t>(args);
  const bool default_positions = source.position_ids == nullptr && !source.packed();
  const Walk walk = walk_of(args);
  const bool sinusoid = args.position_mode == PositionMode::kInterleaved || args.position_mode == PositionMode::kConcat;
  const SinusoidRows sinusoids = sinusoid ? sinusoid_rows(args, source, layout, walk, math_dtype) : SinusoidRows();
  const std::vector<SinusoidColumn> columns =
      sinusoids.rotate ? sinusoid_columns(layout, args.position_mode, args.sinusoid_base) : std::vector<SinusoidColumn>();
  const index_t* ids = args.input_ids.data_ptr<index_t>();
  const index_t* seg_ids = data_or_null<index_t>(args.token_type_ids);
  const Shard shard = shard_of(args, args.weight.size(0));
  const Chunk chunk = chunk_of(args);
  const scalar_t* table = args.weight.data_ptr<scalar_t>();
  // the row of every token without a segment table, of tokens of another shard, and the side rows of tokens
  // out of the chunk or without a position term
  const std::vector<scalar_t> zero_row(dim, scalar_t(0));
  const std::vector<acc_t> zero_side_row(dim, acc_t(0));
  const scalar_t* segment_table = args.segment_weight.has_value() ? args.segment_weight->data_ptr<scalar_t>()
                                                                  : zero_row.data();
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  const auto seeds = sinusoids.rotate ? rotation_seeds(columns, source.offset, walk.period) : std::vector<double>();
  // position_row(n, position, tile_row): token n's position row, the learned table's own (scalar_t) or a
  // sinusoid or zero side row (acc_t); tile_row: its row among the rotated rows of the tile
  const auto walk_tokens = [&](auto position_row_of) {
    using position_t = std::remove_cv_t<std::remove_pointer_t<decltype(position_row_of(0, 0, nullptr))>>;
    const position_t* zero_position_row;
    if constexpr (std::is_same_v<position_t, acc_t>) {
      zero_position_row = zero_side_row.data();
    } else {
      zero_position_row = zero_row.data();
    }
    const int64_t align = std::max<int64_t>(split.align, 1);
    at::parallel_for(0, (walk.units() + align - 1) / align, std::max<int64_t>(split.grain / align, 1),
                     [&](int64_t first_part, int64_t end_part) {
      const int64_t begin = first_part * align, end = std::min(end_part * align, walk.units());
      auto task = make_task();
      std::optional<SinusoidRotation> rotation;
      std::vector<acc_t> tile_rows;  // sinusoid rows of the current tile's offsets
      int64_t tile_first = -1, rotation_at = -1;
      if (sinusoids.rotate) {
        rotation.emplace(columns);
        tile_rows.resize(kTilePositions * dim);
      }
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t first = walk.first_offset(unit), n0 = walk.first_token(unit), length = walk.length(unit);
        if (sinusoids.rotate && first != tile_first) {  // exact seeds every kRotationSteps offsets and after jumps
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
          if (split.prefetch_tokens && (ahead < length || ahead - length < next_length)) {
            const int64_t m = ahead < length ? n0 + ahead : next_n0 + ahead - length;
            const int64_t token_row = shard.row(static_cast<int64_t>(ids[m]));
            if (token_row >= 0) prefetch_row(table + token_row * dim, row_bytes);
          }
          const int64_t token_row = shard.row(static_cast<int64_t>(ids[n]));
          const position_t* position_row = zero_position_row;
          const scalar_t* segment_row = zero_row.data();
          if (chunk.contains(n)) {
            const int64_t position = default_positions ? source.offset + first + i : source(n);
            position_row = position_row_of(n, position, sinusoids.rotate ? tile_rows.data() + i * dim : nullptr);
            segment_row = segment_table + (seg_ids != nullptr ? static_cast<int64_t>(seg_ids[n]) : 0) * dim;
          }
          task(unit, n, token_row >= 0 ? table + token_row * dim : zero_row.data(), position_row, segment_row);
        }
      }
      task.finish();
    });
  };
  if (args.position_mode == PositionMode::kLearned) {
    const scalar_t* position_table = args.position_weight->data_ptr<scalar_t>();
    walk_tokens([&](int64_t, int64_t position, const acc_t*) { return position_table + position * dim; });
  } else if (sinusoids.rotate) {
    walk_tokens([](int64_t, int64_t, const acc_t* tile_row) { return tile_row; });
  } else if (sinusoid) {
    const acc_t* position_table = sinusoids.table.data_ptr<acc_t>();
    walk_tokens([&](int64_t n, int64_t position, const acc_t*) { return position_table + sinusoids.row(n, position) * dim; });
  } else {
    walk_tokens([&](int64_t, int64_t, const acc_t*) { return zero_side_row.data(); });
  }
}

// A task of walk_tasks without state of its own: row(unit, n, token_row, position_row, segment_row), then done().
template <typename Row, typename Done>
struct RowTask {
  const Row& row;
  const Done& done;

  template <typename... Rows>
  void operator()(Rows... rows) const {
    row(rows...);
  }
  void finish() const { done(); }
};

// walk_tasks with every task calling `row` for its tokens, then `done()`; `grain`: units per parallel task.
template <typename scalar_t, typename index_t, typename Row, typename Done>
void walk_rows(const ForwardArgs& args, const SideRowLayout& layout, int64_t grain, const Row& row, const Done& done) {
  walk_tasks<scalar_t, index_t>(args, layout, WalkSplit{grain}, [&] { return RowTask<Row, Done>{row, done}; });
}

}  // namespace forward_rows
}  // namespace embedfast
