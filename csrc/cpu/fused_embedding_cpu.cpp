// CPU kernels of embedfast::forward_extension and embedfast::backward_extension.
//
// Forward: one parallel pass over tokens; each output row is written once from the token row (prefetched a
// few rows ahead), a float32 position row and a float32 segment row, around the caches when the output is big
// (row_loops.h). With default positions the pass goes tile by tile of kTilePositions positions, every sequence's
// run of tokens in the tile before the next tile (Walk), so a tile's position rows are read into L2 once for the
// whole batch. Sinusoid rows are made by a float64 rotation (exact seeds every kRotationSteps rows): for default
// positions, once into a table of positions [0, past_length + seq_len) kept between calls (the only state, a
// bounded cache; past its budget each thread rotates its tiles' rows instead); for explicit position_ids, into
// a per-call table of the positions in use.
// Backward: one pass over grad_out writes the sparse values and reduces the segment gradient per fixed block
// of tokens; with a learned position table and default positions the pass goes tile by tile instead and sums
// the position rows too (backward_by_tiles). Dense token gradients, and position gradients of explicit
// position_ids, are summed per row after a stable counting sort. Every reduction order depends only on the
// inputs, never on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "embedfast/checks.h"
#include "embedfast/kernel_math.h"
#include "row_loops.h"
#include "table_cache.h"

namespace embedfast {
namespace {

constexpr int64_t kRotationSteps = 256;      // sinusoid rows between exact seeds
constexpr int64_t kTilePositions = 16;       // forward tile of default positions (Walk)
constexpr int64_t kPrefetchRows = 2;         // token rows asked for ahead of use (measured: 1 and 2 alike, 4 slower)
constexpr int64_t kMinTokensPerBlock = 256;  // backward reduction blocks
constexpr int64_t kMaxBlocks = 256;
constexpr int64_t kMaxTileSegments = 16;     // backward_by_tiles keeps kTilePositions x segments rows per thread
constexpr int64_t kSinusoidCacheBytes = int64_t{32} << 20;  // sinusoid tables kept between calls, in all

// ---- positions ----

// The sinusoid columns in the kernel column order of `storage` (row_loops.h): every table and rotated row built
// from them is then in that order too.
std::vector<SinusoidColumn> sinusoid_columns(at::ScalarType storage, int64_t dim, PositionMode layout, double base) {
  const std::vector<int64_t> order = column_order(storage, dim);
  std::vector<SinusoidColumn> columns(dim);
  const double log_step = sinusoid_log_step(dim, layout, std::log(base));
  for (int64_t j = 0; j < dim; ++j) columns[j] = sinusoid_column(order[j], dim, layout, log_step);
  return columns;
}

// A table's rows in the math dtype and the kernel column order (the table itself when that is what it holds).
at::Tensor side_rows(const at::Tensor& table, at::ScalarType math_dtype) {
  if (!lane_order(table.scalar_type())) return table.to(math_dtype).contiguous();
  const at::Tensor source = table.contiguous();
  at::Tensor rows = at::empty(source.sizes(), source.options().dtype(at::kFloat));
  const int64_t dim = source.size(1);
  at::parallel_for(0, source.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      widen_row(rows.data_ptr<float>() + r * dim, source.data_ptr<c10::BFloat16>() + r * dim, dim);
    }
  });
  return rows;
}

// The sinusoid row of one position, moved to the next position by a float64 rotation per column
// (theta += freq: error ~1e-16 per step, ~1e-13 after kRotationSteps steps, far below float32 rounding).
class SinusoidRotation {
 public:
  explicit SinusoidRotation(const std::vector<SinusoidColumn>& columns)
      : columns_(columns), sine_(columns.size()), cosine_(columns.size()), step_sin_(columns.size()),
        step_cos_(columns.size()) {
    for (size_t j = 0; j < columns.size(); ++j) {
      step_sin_[j] = std::sin(columns[j].freq);
      step_cos_[j] = std::cos(columns[j].freq);
    }
  }

  // The exact row of `position`.
  void seek(int64_t position) {
    for (size_t j = 0; j < columns_.size(); ++j) {
      const double angle = sinusoid_angle(position, columns_[j]);
      sine_[j] = std::sin(angle);
      cosine_[j] = std::cos(angle);
    }
  }

  void save(double* sine, double* cosine) const {
    std::copy(sine_.begin(), sine_.end(), sine);
    std::copy(cosine_.begin(), cosine_.end(), cosine);
  }

  void restore(const double* sine, const double* cosine) {
    std::copy(sine, sine + sine_.size(), sine_.begin());
    std::copy(cosine, cosine + cosine_.size(), cosine_.begin());
  }

  // Write the current row, then move to the next position. (The zero column of an odd "concat" has
  // frequency and phase 0: its sine starts at 0 and a rotation by 0 keeps it exactly 0.)
  template <typename out_t>
  void emit_and_advance(out_t* row) {
    rotate_row(row, sine_.data(), cosine_.data(), step_sin_.data(), step_cos_.data(), static_cast<int64_t>(sine_.size()));
  }

 private:
  const std::vector<SinusoidColumn>& columns_;
  std::vector<double> sine_, cosine_, step_sin_, step_cos_;
};

// Rows [first, first + rows) of the sinusoid table: an exact seed every kRotationSteps rows, rotations between.
at::Tensor sinusoid_range(int64_t first, int64_t rows, const std::vector<SinusoidColumn>& columns, at::ScalarType dtype) {
  const int64_t dim = static_cast<int64_t>(columns.size());
  at::Tensor table = at::empty({rows, dim}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "sinusoid_range", [&] {
    scalar_t* data = table.data_ptr<scalar_t>();
    const int64_t blocks = (rows + kRotationSteps - 1) / kRotationSteps;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      SinusoidRotation rotation(columns);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t row0 = block * kRotationSteps;
        rotation.seek(first + row0);
        for (int64_t row = row0; row < std::min(rows, row0 + kRotationSteps); ++row) {
          rotation.emit_and_advance(data + row * dim);
        }
      }
    });
  });
  return table;
}

// One exact row per token: for positions spread wider than the number of tokens.
template <typename index_t>
at::Tensor sinusoid_per_token(const index_t* position_ids, int64_t tokens, const std::vector<SinusoidColumn>& columns,
                              at::ScalarType dtype) {
  const int64_t dim = static_cast<int64_t>(columns.size());
  at::Tensor table = at::empty({tokens, dim}, at::TensorOptions().dtype(at::kDouble));
  double* data = table.data_ptr<double>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t j = 0; j < dim; ++j) {
        data[n * dim + j] = std::sin(sinusoid_angle(position_ids[n], columns[j])) * columns[j].keep;
      }
    }
  });
  return table.to(dtype);
}

// The position term as math-dtype rows in the kernel column order, and how a token finds its row.
struct PositionRows {
  at::Tensor table;            // keeps the rows alive
  int64_t first = 0;           // row r holds position first + r
  bool per_token = false;      // row n holds token n's position
  bool constant_row = false;   // one zero row for every token
  bool rotate = false;         // default sinusoid positions past the cache: each thread rotates rows along its tiles
};

// Sinusoid rows of positions [0, rows) (or more), in `dtype` and the kernel column order of `storage`, kept
// between calls; an undefined tensor past the cache's budget. (Making BERT-base's 512 rows takes ~0.2 ms of
// float64 rotations, ~5% of its forward; a decode step would otherwise pay ~30 us of sin/cos seeds.)
at::Tensor cached_sinusoid(int64_t dim, PositionMode layout, double sinusoid_base, at::ScalarType storage, int64_t rows,
                           at::ScalarType dtype) {
  static TableCache& cache = *new TableCache(kSinusoidCacheBytes);  // never destroyed: outlives exit-time teardown
  const std::string key = c10::str(dim, '/', static_cast<int>(layout), '/', c10::bit_cast<uint64_t>(sinusoid_base), '/',
                                   lane_order(storage), '/', dtype);
  return cache.get(key, rows, dim * static_cast<int64_t>(at::elementSize(dtype)), [&](int64_t n) {
    return sinusoid_range(0, n, sinusoid_columns(storage, dim, layout, sinusoid_base), dtype);
  });
}

template <typename index_t>
PositionRows position_rows(PositionMode mode, const std::optional<at::Tensor>& position_ids,
                           const std::optional<at::Tensor>& position_weight, int64_t tokens,
                           const std::vector<SinusoidColumn>& sinusoid, int64_t dim, at::ScalarType math_dtype,
                           const at::Tensor& cached_rows) {
  PositionRows rows;
  if (mode == PositionMode::kNone) {
    rows.table = at::zeros({1, dim}, at::TensorOptions().dtype(math_dtype));
    rows.constant_row = true;
    return rows;
  }
  if (mode == PositionMode::kLearned) {
    rows.table = side_rows(*position_weight, math_dtype);
    return rows;
  }
  if (!position_ids.has_value()) {
    rows.table = cached_rows;  // row r holds position r
    rows.rotate = !cached_rows.defined();
    return rows;
  }
  const auto [lo, hi] = at::aminmax(*position_ids);
  const int64_t low = lo.item<int64_t>(), high = hi.item<int64_t>();
  if (high - low + 1 <= tokens) {
    rows.table = sinusoid_range(low, high - low + 1, sinusoid, math_dtype);
    rows.first = low;
  } else {
    rows.table = sinusoid_per_token(position_ids->data_ptr<index_t>(), tokens, sinusoid, math_dtype);
    rows.per_token = true;
  }
  return rows;
}

inline int64_t position_row(const PositionRows& rows, int64_t token, int64_t position) {
  if (rows.constant_row) return 0;
  if (rows.per_token) return token;
  return position - rows.first;
}

// Exact sinusoid rows (sine, then cosine, float64) of positions past_length + k * kRotationSteps, for every
// k a sequence of seq_len tokens reaches.
std::vector<double> rotation_seeds(const std::vector<SinusoidColumn>& columns, int64_t past_length, int64_t seq_len) {
  const int64_t dim = static_cast<int64_t>(columns.size());
  const int64_t seeds = (seq_len + kRotationSteps - 1) / kRotationSteps;
  std::vector<double> rows(seeds * 2 * dim);
  at::parallel_for(0, seeds, 1, [&](int64_t begin, int64_t end) {
    SinusoidRotation rotation(columns);
    for (int64_t k = begin; k < end; ++k) {
      rotation.seek(past_length + k * kRotationSteps);
      rotation.save(rows.data() + 2 * k * dim, rows.data() + (2 * k + 1) * dim);
    }
  });
  return rows;
}

// The forward's walk over tokens, in units of up to kTilePositions consecutive tokens of one sequence, tile
// by tile: every sequence's tokens at offsets [first, first + kTilePositions), then the next tile. A thread
// then makes (or reads) a tile's position rows once for the whole batch, and still writes output rows in
// runs. Explicit position_ids: one sequence of all tokens, i.e. token order.
struct Walk {
  int64_t tokens;
  int64_t period;     // default positions are past_length + [0, period)
  int64_t sequences;  // ceil(tokens / period)

  static Walk over(int64_t tokens, int64_t seq_len, bool default_positions) {
    const int64_t period = default_positions ? std::min(seq_len, tokens) : tokens;
    return {tokens, period, (tokens + period - 1) / period};
  }
  int64_t units() const { return (period + kTilePositions - 1) / kTilePositions * sequences; }
  int64_t first_offset(int64_t unit) const { return unit / sequences * kTilePositions; }
  int64_t first_token(int64_t unit) const { return unit % sequences * period + first_offset(unit); }
  // tokens in a unit: fewer at the end of a sequence and in a ragged last sequence
  int64_t length(int64_t unit) const {
    return std::min({kTilePositions, period - first_offset(unit), tokens - first_token(unit)});
  }
};

template <typename index_t>
const index_t* data_or_null(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr<index_t>() : nullptr;
}

// ---- forward ----

at::Tensor forward_cpu(const at::Tensor& input_ids, const at::Tensor& weight, const std::optional<at::Tensor>& position_ids,
                       const std::optional<at::Tensor>& position_weight, const std::optional<at::Tensor>& token_type_ids,
                       const std::optional<at::Tensor>& segment_weight, double scale, c10::string_view position,
                       double sinusoid_base, int64_t max_positions, int64_t past_length, int64_t seq_len,
                       int64_t padding_idx, bool sparse, bool /*check_bounds: on CPU the check is cheap, always made*/) {
  const PositionMode mode = check_forward_args(input_ids, weight, position_ids, position_weight, token_type_ids,
                                               segment_weight, position, past_length, seq_len);
  check_forward_index_ranges(input_ids, weight, position_ids, position_weight, token_type_ids, segment_weight,
                             max_positions);

  const int64_t tokens = input_ids.numel(), dim = weight.size(1);
  at::Tensor out = at::empty({tokens, dim}, weight.options());
  if (tokens == 0 || dim == 0) return out;
  const at::ScalarType math_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool sinusoidal = mode == PositionMode::kInterleaved || mode == PositionMode::kConcat;
  const Walk walk = Walk::over(tokens, seq_len, !position_ids.has_value());
  const at::Tensor cached_rows = sinusoidal && !position_ids.has_value()
                                     ? cached_sinusoid(dim, mode, sinusoid_base, weight.scalar_type(),
                                                       past_length + walk.period, math_dtype)
                                     : at::Tensor();
  // sinusoid rows still to make (explicit position_ids, or default positions past the cache) need the columns
  const auto columns = sinusoidal && !cached_rows.defined()
                           ? sinusoid_columns(weight.scalar_type(), dim, mode, sinusoid_base)
                           : std::vector<SinusoidColumn>();

  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "embedfast_forward_cpu", [&] {
    const PositionRows positions = position_rows<index_t>(mode, position_ids, position_weight, tokens, columns, dim,
                                                          math_dtype, cached_rows);
    const at::Tensor segments = segment_weight.has_value() ? side_rows(*segment_weight, math_dtype)
                                                           : at::zeros({1, dim}, weight.options().dtype(math_dtype));
    const index_t* ids = input_ids.data_ptr<index_t>();
    const index_t* pos_ids = data_or_null<index_t>(position_ids);
    const index_t* seg_ids = data_or_null<index_t>(token_type_ids);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "embedfast_forward_cpu", [&] {
      using acc_t = math_t<scalar_t>;
      const scalar_t* table = weight.data_ptr<scalar_t>();
      const acc_t* position_table = positions.rotate ? nullptr : positions.table.data_ptr<acc_t>();
      const acc_t* segment_table = segments.data_ptr<acc_t>();
      scalar_t* output = out.data_ptr<scalar_t>();
      const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
      const bool stream = stream_output(out.nbytes());
      const auto seeds = positions.rotate ? rotation_seeds(columns, past_length, walk.period) : std::vector<double>();
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
                rotation->seek(past_length + k);
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
              prefetch_row(table + static_cast<int64_t>(ids[m]) * dim, row_bytes);
            }
            const int64_t position = pos_ids != nullptr ? static_cast<int64_t>(pos_ids[n]) : past_length + first + i;
            const acc_t* position_row_data = positions.rotate ? tile_rows.data() + i * dim
                                                              : position_table + position_row(positions, n, position) * dim;
            const int64_t segment = seg_ids != nullptr ? static_cast<int64_t>(seg_ids[n]) : 0;
            combine_rows(output + n * dim, table + static_cast<int64_t>(ids[n]) * dim, position_row_data,
                         segment_table + segment * dim, static_cast<acc_t>(scale), dim, stream);
          }
        }
        if (stream) end_streaming();
      });
    });
  });
  return out;
}

// ---- backward ----

// out[s] = sum over groups g of partial[g][s] (rows in the kernel column order `order`), summed in group order.
template <typename scalar_t, typename acc_t>
void sum_partials(const std::vector<acc_t>& partial, int64_t groups, int64_t rows, const std::vector<int64_t>& order,
                  scalar_t* out) {
  const int64_t dim = static_cast<int64_t>(order.size());
  at::parallel_for(0, rows * dim, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // slot i % dim of row i / dim
      acc_t sum = 0;
      for (int64_t g = 0; g < groups; ++g) sum += partial[g * rows * dim + i];
      out[i - i % dim + order[i % dim]] = static_cast<scalar_t>(sum);
    }
  });
}

// out[r] = scale * sum of grad rows n with key(n) == r, summed in token order; rows with no token are zero.
// `order` is the kernel column order of the float32 sums.
template <typename scalar_t, typename Key>
void sum_rows_by_key(const scalar_t* grad, int64_t tokens, const std::vector<int64_t>& order, int64_t rows, Key key,
                     double scale, scalar_t* out) {
  const int64_t dim = static_cast<int64_t>(order.size());
  using acc_t = math_t<scalar_t>;
  std::vector<int64_t> start(rows + 1, 0);
  for (int64_t n = 0; n < tokens; ++n) {
    const int64_t r = key(n);
    if (r >= 0) ++start[r + 1];
  }
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  std::vector<int64_t> sorted_tokens(start[rows]);
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < tokens; ++n) {
    const int64_t r = key(n);
    if (r >= 0) sorted_tokens[cursor[r]++] = n;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = start[r]; i < start[r + 1]; ++i) {
        scale_or_accumulate_rows(static_cast<scalar_t*>(nullptr), acc.data(), grad + sorted_tokens[i] * dim, acc_t(1), dim,
                                 false);
      }
      for (int64_t j = 0; j < dim; ++j) out[r * dim + order[j]] = static_cast<scalar_t>(acc[j] * static_cast<acc_t>(scale));
    }
  });
}

// Default positions with a position table: one pass over grad_out in the forward's tile order, one tile per
// task, writes the sparse values and sums each tile's rows by (offset, segment) in a thread's buffer, whence
// the tile's position rows and a per-tile segment partial; the partials are then summed in tile order. Every
// sum runs in an order fixed by the inputs alone (sequences in order within a tile).
template <typename scalar_t, typename index_t>
void backward_by_tiles(const scalar_t* grad, const index_t* seg_ids, const Walk& walk, int64_t dim,
                       const std::vector<int64_t>& order, double scale, int64_t past_length, int64_t num_segments,
                       scalar_t* values, bool stream, scalar_t* position_grad, int64_t num_positions, scalar_t* segment_grad) {
  using acc_t = math_t<scalar_t>;
  const int64_t tiles = (walk.period + kTilePositions - 1) / kTilePositions;
  const int64_t slots = std::max<int64_t>(num_segments, 1);  // sums of one offset: one per segment
  std::fill(position_grad, position_grad + num_positions * dim, scalar_t(0));
  std::vector<acc_t> partial(tiles * num_segments * dim, acc_t(0));
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(kTilePositions * slots * dim);
    for (int64_t tile = begin; tile < end; ++tile) {
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t unit = tile * walk.sequences; unit < (tile + 1) * walk.sequences; ++unit) {
        const int64_t n0 = walk.first_token(unit);
        for (int64_t k = 0; k < walk.length(unit); ++k) {
          const int64_t n = n0 + k, segment = seg_ids != nullptr ? static_cast<int64_t>(seg_ids[n]) : 0;
          scale_or_accumulate_rows(values != nullptr ? values + n * dim : nullptr, sums.data() + (k * slots + segment) * dim,
                                   grad + n * dim, static_cast<acc_t>(scale), dim, stream);
        }
      }
      const int64_t first = tile * kTilePositions;
      for (int64_t k = 0; k < std::min(kTilePositions, walk.period - first); ++k) {
        scalar_t* row = position_grad + (past_length + first + k) * dim;
        for (int64_t j = 0; j < dim; ++j) {
          acc_t sum = 0;
          for (int64_t segment = 0; segment < slots; ++segment) sum += sums[(k * slots + segment) * dim + j];
          row[order[j]] = static_cast<scalar_t>(sum);
        }
        for (int64_t segment = 0; segment < num_segments; ++segment) {
          acc_t* tile_partial = partial.data() + (tile * num_segments + segment) * dim;
          for (int64_t j = 0; j < dim; ++j) tile_partial[j] += sums[(k * slots + segment) * dim + j];
        }
      }
    }
    if (stream) end_streaming();
  });
  sum_partials(partial, tiles, num_segments, order, segment_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input_ids, const std::optional<at::Tensor>& position_ids,
    const std::optional<at::Tensor>& token_type_ids, c10::string_view token_grad, int64_t num_embeddings,
    int64_t padding_idx, double scale, int64_t num_positions, int64_t num_segments, int64_t past_length,
    int64_t seq_len, bool /*check_bounds: always checked on CPU*/) {
  check_backward_args(grad_out, input_ids, position_ids, token_type_ids, token_grad, num_embeddings, num_positions,
                      num_segments, past_length, seq_len);
  check_backward_index_ranges(input_ids, position_ids, token_type_ids, token_grad == "dense", num_embeddings,
                              num_positions, num_segments);
  const int64_t tokens = grad_out.size(0), dim = grad_out.size(1);
  const bool sparse = token_grad == "sparse", dense = token_grad == "dense";
  const std::vector<int64_t> order = column_order(grad_out.scalar_type(), dim);
  at::Tensor weight_grad = at::empty({sparse ? tokens : (dense ? num_embeddings : 0), dim}, grad_out.options());
  at::Tensor position_grad = at::empty({num_positions, dim}, grad_out.options());
  at::Tensor segment_grad = at::empty({num_segments, dim}, grad_out.options());

  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "embedfast_backward_cpu", [&] {
    const index_t* ids = input_ids.data_ptr<index_t>();
    const index_t* pos_ids = data_or_null<index_t>(position_ids);
    // token types are read only for a segment gradient: with a frozen segment table they index nothing
    const index_t* seg_ids = num_segments > 0 ? data_or_null<index_t>(token_type_ids) : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "embedfast_backward_cpu", [&] {
      using acc_t = math_t<scalar_t>;
      const scalar_t* grad = grad_out.data_ptr<scalar_t>();

      scalar_t* values = sparse ? weight_grad.data_ptr<scalar_t>() : nullptr;
      const bool stream = sparse && stream_output(weight_grad.nbytes());
      const bool by_tiles = num_positions > 0 && pos_ids == nullptr && tokens > 0 && num_segments <= kMaxTileSegments;
      if (by_tiles) {
        backward_by_tiles(grad, seg_ids, Walk::over(tokens, seq_len, true), dim, order, scale, past_length, num_segments,
                          values, stream, position_grad.data_ptr<scalar_t>(), num_positions,
                          segment_grad.data_ptr<scalar_t>());
      } else if (sparse || num_segments > 0) {
        // one pass: sparse values, and per-block segment sums (blocks fixed by the token count alone)
        const int64_t block = std::max(kMinTokensPerBlock, (tokens + kMaxBlocks - 1) / kMaxBlocks);
        const int64_t blocks = (tokens + block - 1) / block;
        std::vector<acc_t> partial(blocks * num_segments * dim, acc_t(0));
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            for (int64_t n = b * block; n < std::min(tokens, (b + 1) * block); ++n) {
              const int64_t segment = seg_ids != nullptr ? static_cast<int64_t>(seg_ids[n]) : 0;
              scale_or_accumulate_rows(values != nullptr ? values + n * dim : nullptr,
                                       num_segments > 0 ? partial.data() + (b * num_segments + segment) * dim : nullptr,
                                       grad + n * dim, static_cast<acc_t>(scale), dim, stream);
            }
          }
          if (stream) end_streaming();
        });
        sum_partials(partial, blocks, num_segments, order, segment_grad.data_ptr<scalar_t>());
      }
      if (dense) {
        sum_rows_by_key(grad, tokens, order, num_embeddings,
                        [&](int64_t n) { return ids[n] == padding_idx ? int64_t(-1) : static_cast<int64_t>(ids[n]); },
                        scale, weight_grad.data_ptr<scalar_t>());
      }
      if (num_positions > 0 && !by_tiles) {
        sum_rows_by_key(grad, tokens, order, num_positions,
                        [&](int64_t n) { return position_of(pos_ids, n, past_length, seq_len); }, 1.0,
                        position_grad.data_ptr<scalar_t>());
      }
    });
  });
  return {weight_grad, position_grad, segment_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedfast, CPU, m) {
  m.impl("forward_extension", &forward_cpu);
  m.impl("backward_extension", &backward_cpu);
}

}  // namespace embedfast
