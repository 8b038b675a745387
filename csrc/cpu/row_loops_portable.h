// The row loops in plain C++: the portable path, and the tails of the vector paths (row_loops.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"

namespace embedfast {
namespace portable {

// position: a math-dtype side row or a table row in the storage dtype
template <typename scalar_t, typename position_t, typename acc_t = math_t<scalar_t>>
inline void combine_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ token,
                        const position_t* __restrict__ position, const scalar_t* __restrict__ segment, acc_t scale,
                        int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    out[j] = static_cast<scalar_t>(
        combine(static_cast<acc_t>(token[j]), scale, static_cast<acc_t>(position[j]), static_cast<acc_t>(segment[j])));
  }
}

// out = grad * scale and/or acc += grad (either pointer may be null)
template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void scale_or_accumulate_row(scalar_t* __restrict__ out, acc_t* __restrict__ acc, const scalar_t* __restrict__ grad,
                                    acc_t scale, int64_t dim) {
  if (out != nullptr && acc != nullptr) {
    for (int64_t j = 0; j < dim; ++j) {
      const acc_t value = static_cast<acc_t>(grad[j]);
      out[j] = static_cast<scalar_t>(value * scale);
      acc[j] += value;
    }
  } else if (out != nullptr) {
    for (int64_t j = 0; j < dim; ++j) out[j] = static_cast<scalar_t>(static_cast<acc_t>(grad[j]) * scale);
  } else {
    for (int64_t j = 0; j < dim; ++j) acc[j] += static_cast<acc_t>(grad[j]);
  }
}

template <typename scalar_t, typename acc_t = math_t<scalar_t>>
inline void store_side_row(scalar_t* __restrict__ out, const acc_t* __restrict__ side, acc_t scale, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) out[j] = static_cast<scalar_t>(side[j] * scale);
}

// A NaN scale as the canonical quiet NaN: the vector loops' bfloat16 rounding relies on NaNs with zero low bits.
inline float canonical(float scale) { return std::isnan(scale) ? std::numeric_limits<float>::quiet_NaN() : scale; }

}  // namespace portable
}  // namespace embedfast
