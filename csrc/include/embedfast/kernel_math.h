// Per-element math of the fused embedding, shared by the CPU and the CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace embedfast {

enum class PositionMode : int { kNone, kLearned, kInterleaved, kConcat };

// Column `col` of the sinusoid table: P[pos, col] = keep * sin(pos * freq + phase); phase pi/2 gives cos.
struct SinusoidColumn {
  double freq;
  double phase;
  float keep;
};

// ln(1 / frequency) grows by this much per frequency index i (computed once on the host: no division on the device).
C10_HOST_DEVICE inline double sinusoid_log_step(int64_t dim, PositionMode layout, double log_base) {
  if (layout == PositionMode::kInterleaved) {
    return 2.0 * log_base / static_cast<double>(dim);  // Vaswani et al.: w_i = base^(-2i/d)
  }
  const int64_t half = dim / 2;  // tensor2tensor / fairseq: w_i = exp(-i ln(base) / (h - 1))
  return log_base / static_cast<double>(half > 1 ? half - 1 : 1);
}

C10_HOST_DEVICE inline SinusoidColumn sinusoid_column(int64_t col, int64_t dim, PositionMode layout, double log_step) {
  constexpr double kHalfPi = 1.57079632679489661923;
  if (layout == PositionMode::kInterleaved) {  // even columns sin, odd columns cos
    return {::exp(-static_cast<double>(col >> 1) * log_step), (col & 1) ? kHalfPi : 0.0, 1.0f};
  }
  const int64_t half = dim / 2;  // [sin | cos | 0 when d is odd]
  if (col >= 2 * half) {
    return {0.0, 0.0, 0.0f};
  }
  const int64_t i = col < half ? col : col - half;
  return {::exp(-static_cast<double>(i) * log_step), col < half ? 0.0 : kHalfPi, 1.0f};
}

// pos * freq + phase reduced to [-pi, pi] in double: the float sine of it stays accurate to fp32 for large
// positions (a float product pos * freq would already be off by ~1e-3 rad at pos 16384).
C10_HOST_DEVICE inline double sinusoid_angle(int64_t pos, const SinusoidColumn& column) {
  constexpr double kTwoPi = 6.28318530717958647692;
  constexpr double kInvTwoPi = 0.15915494309189533577;
  const double angle = static_cast<double>(pos) * column.freq + column.phase;
  return angle - kTwoPi * ::rint(angle * kInvTwoPi);
}

// The fused value, in the order of the unfused reference: (w * scale + p) + s, in the math type (fp32, or fp64
// for fp64 tables). Compilers may fuse w * scale + p into one multiply-add (nvcc does; the CPU's AVX2 loops
// do it explicitly): one rounding fewer, same order.
template <typename T>
C10_HOST_DEVICE inline T combine(T token, T scale, T position, T segment) {
  return token * scale + position + segment;
}

// Position of token n: position_ids[n], or past_length + n % seq_len for a flattened (..., seq_len) batch.
template <typename index_t>
C10_HOST_DEVICE inline int64_t position_of(const index_t* position_ids, int64_t n, int64_t past_length, int64_t seq_len) {
  return position_ids != nullptr ? static_cast<int64_t>(position_ids[n]) : past_length + n % seq_len;
}

}  // namespace embedfast
