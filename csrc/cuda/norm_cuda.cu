// CUDA kernels of embedfast::norm_forward_extension and embedfast::norm_backward_extension (spec.py).
//
// One block per token row (grid-strided): its threads walk the row's columns, recomputing the forward's sum of each
// element from the tables (kernel_math.h, as the plain forward does) on every pass rather than keeping the row: the
// row is in L1 after the first pass, and no dim is too large. The row's sums (mean, variance, the backward's two
// means) are block reductions in a fixed order: warp shuffles, then the warps' sums in warp order. Math in float32
// (float64 for float64 tables). The dropout mask is regenerated from the seed, which the kernels read from device
// memory: no host synchronization, CUDA-graph safe. The norm_weight / norm_bias gradients: per block of
// kNormTokensPerBlock tokens, each thread sums its column over the block's tokens in order; a second kernel adds the
// blocks' sums in block order. The tables' gradients are then the plain backward's (backward_cuda) of the sum's
// gradient, grad_sum. No float atomics: every result is bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "cuda_common.cuh"
#include "embedfast/checks.h"
#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"

namespace embedfast {
namespace {

constexpr int kNormThreads = 256;
constexpr int64_t kNormTokensPerBlock = 64;  // the norm parameter gradients' partial sums: fixed, as on the CPU
constexpr int64_t kMaxNormBlocks = int64_t{1} << 20;

// The forward's sum of any element of any token, from the tables.
template <typename scalar_t, typename index_t>
struct SumSource {
  using acc = math_t<scalar_t>;

  struct Token {
    const scalar_t* token_row;     // null: an id of another shard
    const scalar_t* position_row;  // learned positions
    const scalar_t* segment_row;   // null: no segment table
    int64_t position;
    bool side;  // the token is in the chunk: it takes the position and segment terms
  };

  const index_t* ids;
  const scalar_t* weight;
  Shard shard;
  const index_t* position_ids;
  const index_t* cu_seqlens;
  int64_t num_documents;
  int64_t offset;
  SequenceColumns sequence;
  const scalar_t* position_weight;
  const index_t* segment_ids;
  const scalar_t* segment_weight;
  int64_t dim;
  acc scale;
  PositionMode mode;
  double log_step;

  __device__ Token token(int64_t n) const {
    Token t{nullptr, nullptr, nullptr, 0, false};
    const int64_t row = shard.row(static_cast<int64_t>(ids[n]));
    if (row >= 0) t.token_row = weight + row * dim;
    const int64_t column = sequence.column(n);
    t.side = sequence.in_chunk(column);
    if (!t.side) return t;
    if (mode != PositionMode::kNone) {
      t.position = position_ids != nullptr ? static_cast<int64_t>(position_ids[n])
                   : cu_seqlens != nullptr ? offset + n - document_start(cu_seqlens, num_documents, n)
                                           : offset + column;
    }
    if (mode == PositionMode::kLearned) t.position_row = position_weight + t.position * dim;
    if (segment_weight != nullptr) {
      t.segment_row = segment_weight + (segment_ids != nullptr ? static_cast<int64_t>(segment_ids[n]) : 0) * dim;
    }
    return t;
  }

  __device__ acc value(const Token& t, int64_t j) const {
    const acc token = t.token_row != nullptr ? static_cast<acc>(t.token_row[j]) : acc(0);
    acc position = 0, segment = 0;
    if (t.side) {
      if (mode == PositionMode::kLearned) {
        position = static_cast<acc>(t.position_row[j]);
      } else if (mode != PositionMode::kNone) {
        const SinusoidColumn column = sinusoid_column(j, dim, mode, log_step);
        position = sine<acc>(sinusoid_angle(t.position, column)) * column.keep;
      }
      if (t.segment_row != nullptr) segment = static_cast<acc>(t.segment_row[j]);
    }
    return combine(token, scale, position, segment);
  }
};

template <typename scalar_t, typename index_t>
SumSource<scalar_t, index_t> sum_source(const ForwardArgs& args) {
  const PositionSource<index_t> positions = position_source<index_t>(args);
  return {args.input_ids.data_ptr<index_t>(),
          args.weight.data_ptr<scalar_t>(),
          shard_of(args, args.weight.size(0)),
          positions.position_ids,
          positions.cu_seqlens,
          positions.num_documents,
          positions.offset,
          SequenceColumns(chunk_of(args)),
          args.position_weight.has_value() ? args.position_weight->data_ptr<scalar_t>() : nullptr,
          data_or_null<index_t>(args.token_type_ids),
          args.segment_weight.has_value() ? args.segment_weight->data_ptr<scalar_t>() : nullptr,
          args.weight.size(1),
          static_cast<math_t<scalar_t>>(args.scale),
          args.position_mode,
          sinusoid_log_step(args.weight.size(1), args.position_mode, std::log(args.sinusoid_base))};
}

// The sum of every thread's value over the block (blockDim.x a multiple of 32), in a fixed order; every thread
// gets it. `shared`: 32 values.
template <typename acc>
__device__ acc block_sum(acc value, acc* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous reduction's readers are done with `shared`
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  acc total = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : acc(0);
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
  return total;
}

// a * b rounded, never fused into a multiply-add with what follows (g - mean(g) must cancel as the reference's does)
__device__ __forceinline__ float rounded_product(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double rounded_product(double a, double b) { return __dmul_rn(a, b); }

template <typename scalar_t>
__device__ math_t<scalar_t> parameter(const scalar_t* vector, int64_t j, math_t<scalar_t> missing) {
  return vector != nullptr ? static_cast<math_t<scalar_t>>(vector[j]) : missing;
}

// The epilogue with the seed read from device memory (when there is a dropout).
template <typename acc>
__device__ NormEpilogue<acc> with_seed(NormEpilogue<acc> epilogue, const int64_t* seed) {
  if (epilogue.dropout) epilogue.seed = static_cast<uint64_t>(*seed);
  return epilogue;
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kNormThreads) norm_forward_kernel(
    SumSource<scalar_t, index_t> source, NormEpilogue<math_t<scalar_t>> epilogue_in, const int64_t* __restrict__ seed,
    const scalar_t* __restrict__ norm_weight, const scalar_t* __restrict__ norm_bias, scalar_t* __restrict__ out,
    math_t<scalar_t>* __restrict__ stats, int64_t tokens) {
  using acc = math_t<scalar_t>;
  __shared__ acc shared[32];
  const NormEpilogue<acc> epilogue = with_seed(epilogue_in, seed);
  const int64_t dim = source.dim;
  for (int64_t n = blockIdx.x; n < tokens; n += gridDim.x) {
    const auto token = source.token(n);
    acc mean = 0, rstd = 1;
    if (epilogue.mode == NormMode::kLayernorm) {
      acc sum = 0;
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) sum += source.value(token, j);
      mean = block_sum(sum, shared) / static_cast<acc>(dim);
      acc squares = 0;
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
        const acc centred = source.value(token, j) - mean;
        squares += centred * centred;
      }
      rstd = norm_rstd(block_sum(squares, shared), dim, epilogue.eps);
    } else if (epilogue.mode == NormMode::kRmsnorm) {
      acc squares = 0;
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
        const acc x = source.value(token, j);
        squares += x * x;
      }
      rstd = norm_rstd(block_sum(squares, shared), dim, epilogue.eps);
    }
    if (threadIdx.x == 0) {
      stats[2 * n] = mean;
      stats[2 * n + 1] = rstd;
    }
    const uint32_t key = epilogue.row_key(n);
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const acc y = (source.value(token, j) - mean) * rstd * parameter(norm_weight, j, acc(1)) +
                    parameter(norm_bias, j, acc(0));
      out[n * dim + j] = static_cast<scalar_t>(epilogue.drop(y, key, j));
    }
  }
}

// grad_sum: NONE, the masked grad_out; else rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * w (RMSNORM
// without mean(g)).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kNormThreads) norm_backward_kernel(
    SumSource<scalar_t, index_t> source, NormEpilogue<math_t<scalar_t>> epilogue_in, const int64_t* __restrict__ seed,
    const scalar_t* __restrict__ norm_weight, const scalar_t* __restrict__ grad, const math_t<scalar_t>* __restrict__ stats,
    scalar_t* __restrict__ out, int64_t tokens) {
  using acc = math_t<scalar_t>;
  __shared__ acc shared[32];
  const NormEpilogue<acc> epilogue = with_seed(epilogue_in, seed);
  const int64_t dim = source.dim;
  for (int64_t n = blockIdx.x; n < tokens; n += gridDim.x) {
    const uint32_t key = epilogue.row_key(n);
    const auto dy = [&](int64_t j) { return epilogue.drop(static_cast<acc>(grad[n * dim + j]), key, j); };
    if (epilogue.mode == NormMode::kNone) {
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) out[n * dim + j] = static_cast<scalar_t>(dy(j));
      continue;
    }
    const auto token = source.token(n);
    const acc mean = stats[2 * n], rstd = stats[2 * n + 1];
    acc sum_g = 0, sum_gx = 0;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const acc g = rounded_product(dy(j), parameter(norm_weight, j, acc(1)));
      sum_g += g;
      sum_gx += g * ((source.value(token, j) - mean) * rstd);
    }
    const acc mean_g =
        epilogue.mode == NormMode::kLayernorm ? block_sum(sum_g, shared) / static_cast<acc>(dim) : acc(0);
    const acc mean_gx = block_sum(sum_gx, shared) / static_cast<acc>(dim);
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const acc g = rounded_product(dy(j), parameter(norm_weight, j, acc(1)));
      const acc x_hat = (source.value(token, j) - mean) * rstd;
      out[n * dim + j] = static_cast<scalar_t>(rstd * (g - mean_g - x_hat * mean_gx));
    }
  }
}

// Per block of kNormTokensPerBlock tokens (along y, grid-strided) and column (x): sum of dy * x_hat and of dy over the block's
// tokens, in token order (either output may be null).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kNormThreads) norm_parameter_partials_kernel(
    SumSource<scalar_t, index_t> source, NormEpilogue<math_t<scalar_t>> epilogue_in, const int64_t* __restrict__ seed,
    const scalar_t* __restrict__ grad, const math_t<scalar_t>* __restrict__ stats, math_t<scalar_t>* __restrict__ weight_partials,
    math_t<scalar_t>* __restrict__ bias_partials, int64_t tokens) {
  using acc = math_t<scalar_t>;
  const NormEpilogue<acc> epilogue = with_seed(epilogue_in, seed);
  const int64_t dim = source.dim;
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= dim) return;
  for (int64_t block = blockIdx.y; block * kNormTokensPerBlock < tokens; block += gridDim.y) {
    const int64_t first = block * kNormTokensPerBlock;
    const int64_t last = tokens - first < kNormTokensPerBlock ? tokens : first + kNormTokensPerBlock;
    acc weight_sum = 0, bias_sum = 0;
    for (int64_t n = first; n < last; ++n) {
      const acc dy = epilogue.drop(static_cast<acc>(grad[n * dim + j]), epilogue.row_key(n), j);
      weight_sum += dy * ((source.value(source.token(n), j) - stats[2 * n]) * stats[2 * n + 1]);
      bias_sum += dy;
    }
    if (weight_partials != nullptr) weight_partials[block * dim + j] = weight_sum;
    if (bias_partials != nullptr) bias_partials[block * dim + j] = bias_sum;
  }
}

unsigned norm_grid(int64_t tokens) { return static_cast<unsigned>(std::min(tokens, kMaxNormBlocks)); }

std::tuple<at::Tensor, at::Tensor> norm_forward_cuda(const NormForwardArgs& args) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(args.weight));
  const ForwardArgs forward = check_norm_forward_args(args, exact_checks(args.check_bounds));
  const int64_t tokens = args.input_ids.numel(), dim = args.weight.size(1);
  const at::ScalarType math_dtype = compute_dtype(args.weight.scalar_type());
  at::Tensor out = at::empty({tokens, dim}, args.weight.options());
  at::Tensor stats = at::empty({tokens, 2}, args.weight.options().dtype(math_dtype));
  if (tokens == 0) return {out, stats};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_norm_forward_cuda", [&] {
    EMBEDFAST_DISPATCH_TABLE_TYPES(args.weight.scalar_type(), "embedfast_norm_forward_cuda", [&] {
      using acc = math_t<scalar_t>;
      norm_forward_kernel<scalar_t, index_t><<<norm_grid(tokens), kNormThreads, 0, stream>>>(
          sum_source<scalar_t, index_t>(forward), norm_epilogue<acc>(args), data_or_null<int64_t>(args.dropout_seed),
          data_or_null<scalar_t>(args.norm_weight), data_or_null<scalar_t>(args.norm_bias),
          out.data_ptr<scalar_t>(), stats.data_ptr<acc>(), tokens);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_backward_cuda(const NormBackwardArgs& args) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(args.weight));
  const ForwardArgs forward = check_norm_backward_args(args, exact_checks(args.check_bounds));
  const int64_t tokens = args.input_ids.numel(), dim = args.weight.size(1);
  const at::ScalarType dtype = args.weight.scalar_type(), math_dtype = compute_dtype(dtype);
  const bool norm = args.norm_mode != NormMode::kNone;
  const bool weight_grad = norm && args.norm_grads && args.norm_weight.has_value();
  const bool bias_grad = norm && args.norm_grads && args.norm_bias.has_value();
  at::Tensor grad_sum = at::empty({tokens, dim}, args.weight.options());
  // (0,) when not wanted, each its own tensor: outputs never alias
  at::Tensor weight_out = at::empty({weight_grad ? dim : 0}, args.weight.options());
  at::Tensor bias_out = at::empty({bias_grad ? dim : 0}, args.weight.options());
  const int64_t blocks = (tokens + kNormTokensPerBlock - 1) / kNormTokensPerBlock;
  const auto partial_options = args.weight.options().dtype(math_dtype);
  at::Tensor weight_partials = weight_grad ? at::empty({blocks, dim}, partial_options) : at::Tensor();
  at::Tensor bias_partials = bias_grad ? at::empty({blocks, dim}, partial_options) : at::Tensor();
  // the tables' gradients from grad_sum: a second pass, over grad_sum (the CPU kernel fuses it, spec.py)
  const auto with_table_grads = [&] {
    auto [token_grad, position_grad, segment_grad] = backward_cuda(backward_part(args, grad_sum));
    return std::tuple{token_grad, position_grad, segment_grad, weight_out, bias_out};
  };
  if (dim == 0) return with_table_grads();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_norm_backward_cuda", [&] {
    EMBEDFAST_DISPATCH_TABLE_TYPES(dtype, "embedfast_norm_backward_cuda", [&] {
      using acc = math_t<scalar_t>;
      const auto source = sum_source<scalar_t, index_t>(forward);
      const auto epilogue = norm_epilogue<acc>(args);
      const int64_t* seed = data_or_null<int64_t>(args.dropout_seed);
      const scalar_t* grad = args.grad_out.data_ptr<scalar_t>();
      const acc* stats = args.stats.data_ptr<acc>();
      if (tokens > 0) {
        norm_backward_kernel<scalar_t, index_t><<<norm_grid(tokens), kNormThreads, 0, stream>>>(
            source, epilogue, seed, data_or_null<scalar_t>(args.norm_weight), grad, stats,
            grad_sum.data_ptr<scalar_t>(), tokens);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (!weight_grad && !bias_grad) return;
      const unsigned columns = static_cast<unsigned>((dim + kNormThreads - 1) / kNormThreads);
      acc* weight_rows = weight_grad ? weight_partials.data_ptr<acc>() : nullptr;
      acc* bias_rows = bias_grad ? bias_partials.data_ptr<acc>() : nullptr;
      if (blocks > 0) {
        norm_parameter_partials_kernel<scalar_t, index_t><<<dim3(columns, static_cast<unsigned>(std::min<int64_t>(blocks, 65535))), kNormThreads, 0,
                                                            stream>>>(source, epilogue, seed, grad, stats, weight_rows,
                                                                      bias_rows, tokens);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      for (auto [partials, result] : {std::pair{weight_rows, &weight_out}, std::pair{bias_rows, &bias_out}}) {
        if (partials == nullptr) continue;
        sum_partials_kernel<scalar_t><<<columns, kNormThreads, 0, stream>>>(partials, result->data_ptr<scalar_t>(),
                                                                                 blocks, dim);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return with_table_grads();
}

}  // namespace

TORCH_LIBRARY_IMPL(embedfast, CUDA, m) {
  m.impl("norm_forward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormForwardArgs, &norm_forward_cuda>>());
  m.impl("norm_backward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormBackwardArgs, &norm_backward_cuda>>());
}

}  // namespace embedfast
