// What the CUDA kernels of the plain operators (fused_embedding_cuda.cu) and of the norm operators (norm_cuda.cu)
// share: the sine of a reduced angle, a token's sequence column, the sum of per-block partial sums, the checks' mode,
// the device guard and the plain backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"

namespace embedfast {

// Sine of an angle already reduced to [-pi, pi] (sinusoid_angle): __sinf there is within 4e-7 of the true value and,
// unlike sinf, has no slow path for huge arguments (which needs a stack frame). float64 tables keep ::sin.
template <typename acc>
__device__ __forceinline__ acc sine(double reduced_angle) {
  if constexpr (std::is_same_v<acc, double>) {
    return ::sin(reduced_angle);
  } else {
    return __sinf(static_cast<float>(reduced_angle));
  }
}

// Token n's column n % seq_len and whether it is in the sequence chunk (Chunk::contains), for the kernels that walk
// tokens: a 64-bit division is a subroutine call, around which their registers spill. umulhi(n, inverse), with
// inverse = floor((2^64 - 1) / seq_len), is n / seq_len or one less (0 <= n < 2^63).
struct SequenceColumns {
  Chunk chunk;
  uint64_t inverse;

  explicit SequenceColumns(const Chunk& chunk)
      : chunk(chunk), inverse(UINT64_MAX / static_cast<uint64_t>(chunk.seq_len)) {}
  __device__ int64_t column(int64_t n) const {
    const uint64_t seq_len = chunk.seq_len;
    const uint64_t r = static_cast<uint64_t>(n) - __umul64hi(static_cast<uint64_t>(n), inverse) * seq_len;
    return static_cast<int64_t>(r >= seq_len ? r - seq_len : r);
  }
  __device__ int64_t next(int64_t column) const { return column + 1 == chunk.seq_len ? 0 : column + 1; }
  __device__ bool in_chunk(int64_t column) const { return column >= chunk.start && column < chunk.stop; }
};

// Exact index-range checks read ids back (a host synchronization): made unless the caller opted out
// (check_bounds=False) or a CUDA graph is being captured; then a device-side assertion checks instead.
inline bool exact_checks(bool check_bounds) {
  return check_bounds && at::cuda::currentStreamCaptureStatusMayInitCtx() == at::cuda::CaptureStatus::None;
}

// The device made current while an operator checks and launches: its table's, when that is a CUDA tensor (else
// the checks name the device mismatch).
inline std::optional<c10::Device> cuda_device_of(const at::Tensor& table) {
  return table.is_cuda() ? std::optional<c10::Device>(table.device()) : std::nullopt;
}

// The backward operator's CUDA kernels (fused_embedding_cuda.cu); the norm backward runs them on its grad_sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const BackwardArgs& args);

// out[i] = sum over blocks of partials[block][i], in block order.
template <typename scalar_t>
__global__ void sum_partials_kernel(const math_t<scalar_t>* __restrict__ partials, scalar_t* __restrict__ out,
                                    int64_t blocks, int64_t size) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= size) return;
  math_t<scalar_t> sum = 0;
  for (int64_t b = 0; b < blocks; ++b) sum += partials[b * size + i];
  out[i] = static_cast<scalar_t>(sum);
}

}  // namespace embedfast
