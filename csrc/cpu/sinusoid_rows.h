// Sinusoid position rows for the CPU forward, as side rows (row_loops.h): made by a float64 rotation per
// column between exact seeds, and for default positions kept between calls in a bounded cache.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "embedfast/kernel_math.h"
#include "row_loops.h"

namespace embedfast {

constexpr int64_t kRotationSteps = 256;  // sinusoid rows between exact seeds

// The sinusoid columns in the slot order of `layout`: every row built from them is in that order too.
std::vector<SinusoidColumn> sinusoid_columns(const SideRowLayout& layout, PositionMode mode, double base);

// The sinusoid row of one position, moved to the next position by a float64 rotation per column
// (theta += freq: error ~1e-16 per step, ~1e-13 after kRotationSteps steps, far below float32 rounding).
class SinusoidRotation {
 public:
  explicit SinusoidRotation(const std::vector<SinusoidColumn>& columns);

  void seek(int64_t position);  // the exact row of `position`
  void restore(const double* sine, const double* cosine);
  void save(double* sine, double* cosine) const;

  // Write the current row, then move to the next position. (The zero column of an odd "concat" has frequency
  // and phase 0: its sine starts at 0 and a rotation by 0 keeps it exactly 0.)
  template <typename out_t>
  void emit_and_advance(out_t* row) {
    rotate_row(row, sine_.data(), cosine_.data(), step_sin_.data(), step_cos_.data(), static_cast<int64_t>(sine_.size()));
  }

 private:
  const std::vector<SinusoidColumn>& columns_;
  std::vector<double> sine_, cosine_, step_sin_, step_cos_;
};

// Rows [first, first + rows) of the sinusoid table in `dtype`: an exact seed every kRotationSteps rows.
at::Tensor sinusoid_range(int64_t first, int64_t rows, const std::vector<SinusoidColumn>& columns, at::ScalarType dtype);

// One exact row per token, for positions spread wider than the number of tokens.
template <typename index_t>
at::Tensor sinusoid_per_token(const index_t* position_ids, int64_t tokens, const std::vector<SinusoidColumn>& columns,
                              at::ScalarType dtype);

// Rows of positions [0, rows) (or more) kept between calls, for this layout, mode and base; an undefined tensor
// past the cache's budget. (A decode step would otherwise pay ~30 us of sin/cos seeds per call.)
at::Tensor cached_sinusoid(const SideRowLayout& layout, PositionMode mode, double base, int64_t rows,
                           at::ScalarType dtype);

// Exact rows (sine, then cosine, float64) of positions first + k * kRotationSteps for k < ceil(count / steps).
std::vector<double> rotation_seeds(const std::vector<SinusoidColumn>& columns, int64_t first, int64_t count);

}  // namespace embedfast
