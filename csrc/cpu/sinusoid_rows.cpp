#include "sinusoid_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "table_cache.h"

namespace embedfast {

constexpr int64_t kSinusoidCacheBytes = int64_t{32} << 20;  // sinusoid tables kept between calls, in all

std::vector<SinusoidColumn> sinusoid_columns(const SideRowLayout& layout, PositionMode mode, double base) {
  const int64_t dim = layout.dim();
  std::vector<SinusoidColumn> columns(dim);
  const double log_step = sinusoid_log_step(dim, mode, std::log(base));
  for (int64_t j = 0; j < dim; ++j) columns[j] = sinusoid_column(layout.column(j), dim, mode, log_step);
  return columns;
}

SinusoidRotation::SinusoidRotation(const std::vector<SinusoidColumn>& columns)
    : columns_(columns), sine_(columns.size()), cosine_(columns.size()), step_sin_(columns.size()),
      step_cos_(columns.size()) {
  for (size_t j = 0; j < columns.size(); ++j) {
    step_sin_[j] = std::sin(columns[j].freq);
    step_cos_[j] = std::cos(columns[j].freq);
  }
}

void SinusoidRotation::seek(int64_t position) {
  for (size_t j = 0; j < columns_.size(); ++j) {
    const double angle = sinusoid_angle(position, columns_[j]);
    sine_[j] = std::sin(angle);
    cosine_[j] = std::cos(angle);
  }
}

void SinusoidRotation::save(double* sine, double* cosine) const {
  std::copy(sine_.begin(), sine_.end(), sine);
  std::copy(cosine_.begin(), cosine_.end(), cosine);
}

void SinusoidRotation::restore(const double* sine, const double* cosine) {
  std::copy(sine, sine + sine_.size(), sine_.begin());
  std::copy(cosine, cosine + cosine_.size(), cosine_.begin());
}

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

template at::Tensor sinusoid_per_token<int32_t>(const int32_t*, int64_t, const std::vector<SinusoidColumn>&, at::ScalarType);
template at::Tensor sinusoid_per_token<int64_t>(const int64_t*, int64_t, const std::vector<SinusoidColumn>&, at::ScalarType);

at::Tensor cached_sinusoid(const SideRowLayout& layout, PositionMode mode, double base, int64_t rows,
                           at::ScalarType dtype) {
  static TableCache& cache = *new TableCache(kSinusoidCacheBytes);  // never destroyed: outlives exit-time teardown
  const std::string key = c10::str(layout.dim(), '/', static_cast<int64_t>(mode), '/', c10::bit_cast<uint64_t>(base), '/',
                                   layout.natural(), '/', dtype);
  return cache.get(key, rows, layout.dim() * static_cast<int64_t>(at::elementSize(dtype)), [&](int64_t n) {
    return sinusoid_range(0, n, sinusoid_columns(layout, mode, base), dtype);
  });
}

std::vector<double> rotation_seeds(const std::vector<SinusoidColumn>& columns, int64_t first, int64_t count) {
  const int64_t dim = static_cast<int64_t>(columns.size());
  const int64_t seeds = (count + kRotationSteps - 1) / kRotationSteps;
  std::vector<double> rows(seeds * 2 * dim);
  at::parallel_for(0, seeds, 1, [&](int64_t begin, int64_t end) {
    SinusoidRotation rotation(columns);
    for (int64_t k = begin; k < end; ++k) {
      rotation.seek(first + k * kRotationSteps);
      rotation.save(rows.data() + 2 * k * dim, rows.data() + (2 * k + 1) * dim);
    }
  });
  return rows;
}

}  // namespace embedfast
