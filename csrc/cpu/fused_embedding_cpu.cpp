// CPU kernels of embedfast::forward_extension and embedfast::backward_extension.
//
// Forward: one parallel pass over tokens; each output row is written once from the token row, a float32
// position row and a float32 segment row (tables in cache). Sinusoid rows come from a float64 rotation
// (exact seeds every kRotationSteps rows): for a batch of kTableMinSequences sequences or more, into a
// per-call table of the positions in use (~1/batch of the main pass); for fewer, each thread rotates the
// row along its own tokens and no table is built. No state is kept between calls.
// Backward: one pass over grad_out writes the sparse values and reduces the segment gradient per
// fixed block of tokens; dense token and learned-position gradients are summed per row after a stable
// counting sort. Every reduction order depends only on the inputs, never on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "embedfast/checks.h"
#include "embedfast/kernel_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// the row loops are compiled for AVX2+FMA+F16C and for the baseline; the loader picks one per machine
#define EMBEDFAST_ROW_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EMBEDFAST_ROW_KERNEL
#endif

namespace embedfast {
namespace {

constexpr int64_t kRotationSteps = 256;    // sinusoid rows between exact seeds
// Default sinusoid positions: a (seq_len, dim) table per call pays off from this many sequences on (measured:
// BERT-base 32 x 512 fp32 9.4 ms with the table, 13.5 ms rotating per token; one 8192-token sequence 8.7 ms
// with the table, 5.1 ms rotating).
constexpr int64_t kTableMinSequences = 4;
constexpr int64_t kMinTokensPerBlock = 256;  // backward reduction blocks
constexpr int64_t kMaxBlocks = 256;

// ---- row loops: the only code that touches every element ----

// float64 tables (gradcheck) keep float64 math; every other storage type computes in float32.
template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void combine_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ token, const acc_t* __restrict__ position,
                        const acc_t* __restrict__ segment, acc_t scale, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    out[j] = static_cast<scalar_t>(combine(static_cast<acc_t>(token[j]), scale, position[j], segment[j]));
  }
}

template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void scale_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ grad, acc_t scale, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    out[j] = static_cast<scalar_t>(static_cast<acc_t>(grad[j]) * scale);
  }
}

// scale_row and accumulate_row in one read of the row
template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void scale_and_accumulate_row(scalar_t* __restrict__ out, acc_t* __restrict__ acc, const scalar_t* __restrict__ grad,
                                     acc_t scale, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    const acc_t value = static_cast<acc_t>(grad[j]);
    out[j] = static_cast<scalar_t>(value * scale);
    acc[j] += value;
  }
}

template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void accumulate_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ grad, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    acc[j] += static_cast<acc_t>(grad[j]);
  }
}

#define EMBEDFAST_ROW_KERNELS(scalar_t)                                                                                   \
  EMBEDFAST_ROW_KERNEL void combine_rows(scalar_t* out, const scalar_t* token, const math_t<scalar_t>* position,          \
                                         const math_t<scalar_t>* segment, math_t<scalar_t> scale, int64_t dim) {         \
    combine_row(out, token, position, segment, scale, dim);                                                                \
  }                                                                                                                        \
  EMBEDFAST_ROW_KERNEL void scale_rows(scalar_t* out, const scalar_t* grad, math_t<scalar_t> scale, int64_t dim) {       \
    scale_row(out, grad, scale, dim);                                                                                      \
  }                                                                                                                        \
  EMBEDFAST_ROW_KERNEL void accumulate_rows(math_t<scalar_t>* acc, const scalar_t* grad, int64_t dim) {                  \
    accumulate_row(acc, grad, dim);                                                                                        \
  }                                                                                                                        \
  EMBEDFAST_ROW_KERNEL void scale_and_accumulate_rows(scalar_t* out, math_t<scalar_t>* acc, const scalar_t* grad,        \
                                                      math_t<scalar_t> scale, int64_t dim) {                             \
    scale_and_accumulate_row(out, acc, grad, scale, dim);                                                                  \
  }

EMBEDFAST_ROW_KERNELS(float)
EMBEDFAST_ROW_KERNELS(double)
EMBEDFAST_ROW_KERNELS(c10::Half)
EMBEDFAST_ROW_KERNELS(c10::BFloat16)
#undef EMBEDFAST_ROW_KERNELS

// row = sin(theta); theta += step, as a float64 rotation of (sin, cos) per column.
template <typename out_t>
inline void rotate_row_impl(out_t* __restrict__ row, double* __restrict__ sine, double* __restrict__ cosine,
                            const double* __restrict__ step_sin, const double* __restrict__ step_cos, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    row[j] = static_cast<out_t>(sine[j]);
    const double next_sine = sine[j] * step_cos[j] + cosine[j] * step_sin[j];
    cosine[j] = cosine[j] * step_cos[j] - sine[j] * step_sin[j];
    sine[j] = next_sine;
  }
}

EMBEDFAST_ROW_KERNEL void rotate_row(float* row, double* sine, double* cosine, const double* step_sin,
                                     const double* step_cos, int64_t dim) {
  rotate_row_impl(row, sine, cosine, step_sin, step_cos, dim);
}

EMBEDFAST_ROW_KERNEL void rotate_row(double* row, double* sine, double* cosine, const double* step_sin,
                                     const double* step_cos, int64_t dim) {
  rotate_row_impl(row, sine, cosine, step_sin, step_cos, dim);
}

// ---- positions ----

std::vector<SinusoidColumn> sinusoid_columns(int64_t dim, PositionMode layout, double log_base) {
  std::vector<SinusoidColumn> columns(dim);
  const double log_step = sinusoid_log_step(dim, layout, log_base);
  for (int64_t j = 0; j < dim; ++j) columns[j] = sinusoid_column(j, dim, layout, log_step);
  return columns;
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
at::Tensor sinusoid_range(int64_t first, int64_t rows, int64_t dim, PositionMode layout, double log_base,
                          at::ScalarType dtype) {
  at::Tensor table = at::empty({rows, dim}, at::TensorOptions().dtype(dtype));
  const auto columns = sinusoid_columns(dim, layout, log_base);
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
at::Tensor sinusoid_per_token(const index_t* position_ids, int64_t tokens, int64_t dim, PositionMode layout,
                              double log_base, at::ScalarType dtype) {
  at::Tensor table = at::empty({tokens, dim}, at::TensorOptions().dtype(at::kDouble));
  const auto columns = sinusoid_columns(dim, layout, log_base);
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

// The position term as math-dtype rows, and how a token finds its row.
struct PositionRows {
  at::Tensor table;            // keeps the rows alive
  int64_t first = 0;           // row r holds position first + r
  bool per_token = false;      // row n holds token n's position
  bool constant_row = false;   // one zero row for every token
  bool rotate = false;         // no table: each thread rotates the sinusoid row along its tokens (forward_cpu)
};

template <typename index_t>
PositionRows position_rows(PositionMode mode, const std::optional<at::Tensor>& position_ids,
                           const std::optional<at::Tensor>& position_weight, int64_t tokens, int64_t dim,
                           double sinusoid_base, int64_t past_length, int64_t seq_len, at::ScalarType math_dtype) {
  PositionRows rows;
  if (mode == PositionMode::kNone) {
    rows.table = at::zeros({1, dim}, at::TensorOptions().dtype(math_dtype));
    rows.constant_row = true;
    return rows;
  }
  if (mode == PositionMode::kLearned) {
    rows.table = position_weight->to(math_dtype).contiguous();
    return rows;
  }
  if (!position_ids.has_value() && tokens < kTableMinSequences * seq_len) {
    rows.rotate = true;  // too few sequences to share a table's cost
    return rows;
  }
  int64_t low = past_length, high = past_length + std::min(seq_len, tokens) - 1;
  if (position_ids.has_value()) {
    const auto [lo, hi] = at::aminmax(*position_ids);
    low = lo.item<int64_t>();
    high = hi.item<int64_t>();
  }
  if (high - low + 1 <= tokens) {
    rows.table = sinusoid_range(low, high - low + 1, dim, mode, std::log(sinusoid_base), math_dtype);
    rows.first = low;
  } else {
    rows.table = sinusoid_per_token(position_ids->data_ptr<index_t>(), tokens, dim, mode, std::log(sinusoid_base),
                                    math_dtype);
    rows.per_token = true;
  }
  return rows;
}

template <typename index_t>
inline int64_t position_row(const PositionRows& rows, const index_t* position_ids, int64_t token, int64_t past_length,
                            int64_t seq_len) {
  if (rows.constant_row) return 0;
  if (rows.per_token) return token;
  return position_of(position_ids, token, past_length, seq_len) - rows.first;
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

  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "embedfast_forward_cpu", [&] {
    const PositionRows positions = position_rows<index_t>(mode, position_ids, position_weight, tokens, dim,
                                                          sinusoid_base, past_length, seq_len, math_dtype);
    const at::Tensor segments = segment_weight.has_value() ? segment_weight->to(math_dtype).contiguous()
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
      const auto columns = positions.rotate ? sinusoid_columns(dim, mode, std::log(sinusoid_base))
                                            : std::vector<SinusoidColumn>();
      const auto seeds = positions.rotate ? rotation_seeds(columns, past_length, std::min(seq_len, tokens))
                                          : std::vector<double>();
      at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / dim), [&](int64_t begin, int64_t end) {
        std::optional<SinusoidRotation> rotation;
        std::vector<acc_t> rotated_row;
        if (positions.rotate) {
          rotation.emplace(columns);
          rotated_row.resize(dim);
        }
        for (int64_t n = begin; n < end; ++n) {
          const acc_t* position_row_data;
          if (positions.rotate) {  // an exact seed at every sequence start and every kRotationSteps positions
            const int64_t offset = n % seq_len;
            if (offset % kRotationSteps == 0) {
              const int64_t k = offset / kRotationSteps;
              rotation->restore(seeds.data() + 2 * k * dim, seeds.data() + (2 * k + 1) * dim);
            } else if (n == begin) {
              rotation->seek(past_length + offset);
            }
            rotation->emit_and_advance(rotated_row.data());
            position_row_data = rotated_row.data();
          } else {
            position_row_data = position_table + position_row(positions, pos_ids, n, past_length, seq_len) * dim;
          }
          const int64_t segment = seg_ids != nullptr ? static_cast<int64_t>(seg_ids[n]) : 0;
          combine_rows(output + n * dim, table + static_cast<int64_t>(ids[n]) * dim, position_row_data,
                       segment_table + segment * dim, static_cast<acc_t>(scale), dim);
        }
      });
    });
  });
  return out;
}

// ---- backward ----

// out[r] = scale * sum of grad rows n with key(n) == r, summed in token order; rows with no token are zero.
template <typename scalar_t, typename Key>
void sum_rows_by_key(const scalar_t* grad, int64_t tokens, int64_t dim, int64_t rows, Key key, double scale,
                     scalar_t* out) {
  using acc_t = math_t<scalar_t>;
  std::vector<int64_t> start(rows + 1, 0);
  for (int64_t n = 0; n < tokens; ++n) {
    const int64_t r = key(n);
    if (r >= 0) ++start[r + 1];
  }
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  std::vector<int64_t> order(start[rows]);
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < tokens; ++n) {
    const int64_t r = key(n);
    if (r >= 0) order[cursor[r]++] = n;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = start[r]; i < start[r + 1]; ++i) accumulate_rows(acc.data(), grad + order[i] * dim, dim);
      for (int64_t j = 0; j < dim; ++j) out[r * dim + j] = static_cast<scalar_t>(acc[j] * static_cast<acc_t>(scale));
    }
  });
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
  at::Tensor weight_grad = at::empty({sparse ? tokens : (dense ? num_embeddings : 0), dim}, grad_out.options());
  at::Tensor position_grad = at::empty({num_positions, dim}, grad_out.options());
  at::Tensor segment_grad = at::empty({num_segments, dim}, grad_out.options());

  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "embedfast_backward_cpu", [&] {
    const index_t* ids = input_ids.data_ptr<index_t>();
    const index_t* pos_ids = data_or_null<index_t>(position_ids);
    const index_t* seg_ids = data_or_null<index_t>(token_type_ids);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "embedfast_backward_cpu", [&] {
      using acc_t = math_t<scalar_t>;
      const scalar_t* grad = grad_out.data_ptr<scalar_t>();

      // one pass: sparse values, and per-block segment sums (blocks fixed by the token count alone)
      const int64_t block = std::max(kMinTokensPerBlock, (tokens + kMaxBlocks - 1) / kMaxBlocks);
      const int64_t blocks = (tokens + block - 1) / block;
      std::vector<acc_t> partial(num_segments > 0 ? blocks * num_segments * dim : 0, acc_t(0));
      if (sparse || num_segments > 0) {
        scalar_t* values = sparse ? weight_grad.data_ptr<scalar_t>() : nullptr;
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            for (int64_t n = b * block; n < std::min(tokens, (b + 1) * block); ++n) {
              const scalar_t* row = grad + n * dim;
              const int64_t segment = seg_ids != nullptr ? static_cast<int64_t>(seg_ids[n]) : 0;
              acc_t* segment_sum = num_segments > 0 ? partial.data() + (b * num_segments + segment) * dim : nullptr;
              if (values != nullptr && segment_sum != nullptr) {
                scale_and_accumulate_rows(values + n * dim, segment_sum, row, static_cast<acc_t>(scale), dim);
              } else if (values != nullptr) {
                scale_rows(values + n * dim, row, static_cast<acc_t>(scale), dim);
              } else {
                accumulate_rows(segment_sum, row, dim);
              }
            }
          }
        });
      }
      if (num_segments > 0) {
        scalar_t* out = segment_grad.data_ptr<scalar_t>();
        at::parallel_for(0, num_segments * dim, 1024, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            acc_t sum = 0;
            for (int64_t b = 0; b < blocks; ++b) sum += partial[b * num_segments * dim + i];
            out[i] = static_cast<scalar_t>(sum);
          }
        });
      }
      if (dense) {
        sum_rows_by_key(grad, tokens, dim, num_embeddings,
                        [&](int64_t n) { return ids[n] == padding_idx ? int64_t(-1) : static_cast<int64_t>(ids[n]); },
                        scale, weight_grad.data_ptr<scalar_t>());
      }
      if (num_positions > 0) {
        sum_rows_by_key(grad, tokens, dim, num_positions,
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
