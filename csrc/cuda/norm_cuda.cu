// CUDA kernels of embedfast::norm_forward_extension and embedfast::norm_backward_extension (spec.py).
//
// One block per token row (grid-strided): its threads walk the row's columns, recomputing the forward's sum of each
// element from the tables (kernel_math.h, as the plain forward does) on every pass rather than keeping the row: the
// row is in L1 after the first pass, and no dim is too large. The row's sums (mean, variance, the backward's two
// means) are block reductions in a fixed order: warp shuffles, then the warps' sums in warp order. Math in float32
// (float64 for float64 tables). The dropout mask is regenerated from the seed, which the kernels read from device
// memory: no host synchronization, CUDA-graph safe.
// The backward is one pass over grad_out, a block per unit of tokens (BackwardWalk, at most kMaxBackwardUnits of
// them): consecutive tokens, or, for default positions, a tile of positions walked over the sequences, so that the
// block sums each of its position rows whole. Each token's row of the sum's gradient is used at once: written as
// the sparse values, added to the unit's norm weight / bias and segment partial rows, and to its running position
// row. A thread owns the same columns for every token of its unit, so the unit's rows need no atomics; a second
// kernel adds the units' rows in unit order. grad_sum is stored only where a gradient is then summed by key (the
// plain backward's kernels, backward_cuda): dense token gradients, explicit or packed positions, periods under
// kMinTilePeriod, more than kMaxPartialSegments segments. No float atomics: every result is bitwise reproducible.
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
constexpr int64_t kMaxBackwardUnits = 1024;  // the backward's units (blocks): enough to fill a GPU, few partial rows
constexpr int64_t kMinTilePeriod = 256;      // shorter periods: position rows summed by key, not by tiles
constexpr int64_t kMaxPartialSegments = 16;  // per-unit segment sums; more segments are summed by key
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

// What the backward kernel writes besides what it reads; a null pointer is not made.
template <typename scalar_t>
struct BackwardOutputs {
  using acc = math_t<scalar_t>;
  scalar_t* grad_sum;      // (tokens, dim): the sum's gradient, for the sums by key made after the kernel
  scalar_t* values;        // (tokens, dim): the sparse token rows, grad_sum * scale
  acc* weight_partials;    // (units, dim): per unit, the sum of dy * x_hat over its tokens in order
  acc* bias_partials;      // (units, dim): per unit, the sum of dy
  acc* segment_partials;   // (units, num_segments, dim): per unit, grad_sum summed per segment (tokens in the chunk)
  int64_t num_segments;
  scalar_t* position_grad;  // (num_positions, dim), zeros: the position rows of the walk's tiles (default positions)
  acc* position_sums;       // (units, dim), zeros: a unit's running position row
};

// The backward's units of work, one block at a time each (grid-strided), fixed by the shape alone so that the
// partial sums and their order do not vary: `tokens_per_unit` consecutive tokens, or (tiles) `tile` consecutive
// default positions of the period, each summed over the sequences in order before the next.
struct BackwardWalk {
  int64_t units;
  int64_t tokens_per_unit;
  bool tiles;
  int64_t period;
  int64_t tile;
};

// One token's row of the backward, the block's threads along its columns: dy = grad_out with the forward's mask;
// grad_sum = NONE: dy; else rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * w (RMSNORM without mean(g)),
// rounded to the storage dtype as stored; then, per column (each a thread's, the same for every token of the unit,
// so the unit's partial rows need no atomics), what `outs` asks for. `position`: add grad_sum to the unit's
// position row.
template <typename scalar_t, typename index_t>
__device__ void backward_row(const SumSource<scalar_t, index_t>& source, const NormEpilogue<math_t<scalar_t>>& epilogue,
                             const scalar_t* __restrict__ norm_weight, const scalar_t* __restrict__ grad,
                             const math_t<scalar_t>* __restrict__ stats, const BackwardOutputs<scalar_t>& outs,
                             int64_t n, int64_t unit, bool position, math_t<scalar_t>* shared) {
  using acc = math_t<scalar_t>;
  const int64_t dim = source.dim;
  const uint32_t key = epilogue.row_key(n);
  const auto dy = [&](int64_t j) { return epilogue.drop(static_cast<acc>(grad[n * dim + j]), key, j); };
  const bool norm = epilogue.mode != NormMode::kNone;
  const auto token = source.token(n);
  const acc mean = norm ? stats[2 * n] : acc(0), rstd = norm ? stats[2 * n + 1] : acc(1);
  acc mean_g = 0, mean_gx = 0;
  if (norm) {
    acc sum_g = 0, sum_gx = 0;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const acc g = rounded_product(dy(j), parameter(norm_weight, j, acc(1)));
      sum_g += g;
      sum_gx += g * ((source.value(token, j) - mean) * rstd);
    }
    if (epilogue.mode == NormMode::kLayernorm) mean_g = block_sum(sum_g, shared) / static_cast<acc>(dim);
    mean_gx = block_sum(sum_gx, shared) / static_cast<acc>(dim);
  }
  const bool side = token.side;  // the token took the position and segment terms
  const int64_t segment = outs.segment_partials != nullptr && side
                              ? (source.segment_ids != nullptr ? static_cast<int64_t>(source.segment_ids[n]) : 0)
                              : -1;
  acc* segment_row = segment >= 0 ? outs.segment_partials + (unit * outs.num_segments + segment) * dim : nullptr;
  acc* position_row = position && side ? outs.position_sums + unit * dim : nullptr;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const acc d = dy(j);
    acc result = d, x_hat = 0;
    if (norm) {
      const acc g = rounded_product(d, parameter(norm_weight, j, acc(1)));
      x_hat = (source.value(token, j) - mean) * rstd;
      result = rstd * (g - mean_g - x_hat * mean_gx);
    }
    const scalar_t stored = static_cast<scalar_t>(result);
    const acc sum = static_cast<acc>(stored);  // as stored: the tables' gradients sum it
    if (outs.grad_sum != nullptr) outs.grad_sum[n * dim + j] = stored;
    if (outs.values != nullptr) outs.values[n * dim + j] = static_cast<scalar_t>(sum * source.scale);
    if (outs.weight_partials != nullptr) outs.weight_partials[unit * dim + j] += d * x_hat;
    if (outs.bias_partials != nullptr) outs.bias_partials[unit * dim + j] += d;
    if (segment_row != nullptr) segment_row[j] += sum;
    if (position_row != nullptr) position_row[j] += sum;
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kNormThreads) norm_backward_kernel(
    SumSource<scalar_t, index_t> source, NormEpilogue<math_t<scalar_t>> epilogue_in, const int64_t* __restrict__ seed,
    const scalar_t* __restrict__ norm_weight, const scalar_t* __restrict__ grad, const math_t<scalar_t>* __restrict__ stats,
    BackwardOutputs<scalar_t> outs, BackwardWalk walk, int64_t tokens) {
  using acc = math_t<scalar_t>;
  __shared__ acc shared[32];
  const NormEpilogue<acc> epilogue = with_seed(epilogue_in, seed);
  const int64_t dim = source.dim;
  for (int64_t unit = blockIdx.x; unit < walk.units; unit += gridDim.x) {
    if (!walk.tiles) {
      const int64_t first = unit * walk.tokens_per_unit, last = min(tokens, first + walk.tokens_per_unit);
      for (int64_t n = first; n < last; ++n) {
        backward_row(source, epilogue, norm_weight, grad, stats, outs, n, unit, false, shared);
      }
      continue;
    }
    const int64_t first = unit * walk.tile, last = min(walk.period, first + walk.tile);
    for (int64_t column = first; column < last; ++column) {
      for (int64_t n = column; n < tokens; n += walk.period) {
        backward_row(source, epilogue, norm_weight, grad, stats, outs, n, unit, true, shared);
      }
      // the position row is complete: stored, and the unit's running row cleared for the next (each column is
      // this thread's alone, as in backward_row)
      scalar_t* position_row = outs.position_grad + (source.offset + column) * dim;
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
        acc& sum = outs.position_sums[unit * dim + j];
        position_row[j] = static_cast<scalar_t>(sum);
        sum = 0;
      }
    }
  }
}

unsigned norm_grid(int64_t units) { return static_cast<unsigned>(std::min(units, kMaxNormBlocks)); }

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
  const bool sparse = args.token_grad == TokenGrad::kSparse, dense = args.token_grad == TokenGrad::kDense;
  at::Tensor grad_sum = at::empty({tokens, dim}, args.weight.options());
  // the table gradients asked for; what the kernel does not make is summed by key from grad_sum afterwards
  BackwardArgs rest = backward_part(args, grad_sum);
  if (dim == 0 || tokens == 0) {
    auto [token_grad, position_grad, segment_grad] = backward_cuda(rest);
    return {token_grad, position_grad, segment_grad, at::zeros({weight_grad ? dim : 0}, args.weight.options()),
            at::zeros({bias_grad ? dim : 0}, args.weight.options())};
  }
  const int64_t period = std::min(std::max<int64_t>(args.seq_len, 1), tokens);
  const bool tiles = rest.num_positions > 0 && !args.position_ids.has_value() && !args.cu_seqlens.has_value() &&
                     period >= kMinTilePeriod;
  const bool segments_here = rest.num_segments > 0 && rest.num_segments <= kMaxPartialSegments;
  const bool write_grad_sum = dense || (rest.num_positions > 0 && !tiles) || (rest.num_segments > 0 && !segments_here);
  // from the shape alone, so that the partial sums and their order do not vary
  BackwardWalk walk{0, (tokens + kMaxBackwardUnits - 1) / kMaxBackwardUnits, tiles, period,
                    (period + kMaxBackwardUnits - 1) / kMaxBackwardUnits};
  walk.units = tiles ? (period + walk.tile - 1) / walk.tile : (tokens + walk.tokens_per_unit - 1) / walk.tokens_per_unit;
  const auto math_options = args.weight.options().dtype(math_dtype);
  at::Tensor values = at::empty({sparse ? tokens : 0, dim}, args.weight.options());
  at::Tensor weight_partials = at::zeros({weight_grad ? walk.units : 0, dim}, math_options);
  at::Tensor bias_partials = at::zeros({bias_grad ? walk.units : 0, dim}, math_options);
  const int64_t partial_segments = segments_here ? rest.num_segments : 0;
  at::Tensor segment_partials = at::zeros({partial_segments > 0 ? walk.units : 0, partial_segments, dim}, math_options);
  at::Tensor position_grad = at::zeros({tiles ? rest.num_positions : 0, dim}, args.weight.options());
  at::Tensor position_sums = at::zeros({tiles ? walk.units : 0, dim}, math_options);
  // (0,) when not wanted, each its own tensor: outputs never alias
  at::Tensor weight_out = at::empty({weight_grad ? dim : 0}, args.weight.options());
  at::Tensor bias_out = at::empty({bias_grad ? dim : 0}, args.weight.options());
  at::Tensor segment_grad = at::empty({partial_segments, dim}, args.weight.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_norm_backward_cuda", [&] {
    EMBEDFAST_DISPATCH_TABLE_TYPES(dtype, "embedfast_norm_backward_cuda", [&] {
      using acc = math_t<scalar_t>;
      const BackwardOutputs<scalar_t> outs{write_grad_sum ? grad_sum.data_ptr<scalar_t>() : nullptr,
                                           sparse ? values.data_ptr<scalar_t>() : nullptr,
                                           weight_grad ? weight_partials.data_ptr<acc>() : nullptr,
                                           bias_grad ? bias_partials.data_ptr<acc>() : nullptr,
                                           partial_segments > 0 ? segment_partials.data_ptr<acc>() : nullptr,
                                           partial_segments,
                                           tiles ? position_grad.data_ptr<scalar_t>() : nullptr,
                                           tiles ? position_sums.data_ptr<acc>() : nullptr};
      norm_backward_kernel<scalar_t, index_t><<<norm_grid(walk.units), kNormThreads, 0, stream>>>(
          sum_source<scalar_t, index_t>(forward), norm_epilogue<acc>(args), data_or_null<int64_t>(args.dropout_seed),
          data_or_null<scalar_t>(args.norm_weight), args.grad_out.data_ptr<scalar_t>(), args.stats.data_ptr<acc>(),
          outs, walk, tokens);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // the units' partial sums, added in unit order
      for (auto [partials, result] : {std::pair{&weight_partials, &weight_out}, std::pair{&bias_partials, &bias_out},
                                      std::pair{&segment_partials, &segment_grad}}) {
        const int64_t size = result->numel();
        if (size == 0) continue;
        sum_partials_kernel<scalar_t><<<static_cast<unsigned>((size + kNormThreads - 1) / kNormThreads), kNormThreads,
                                        0, stream>>>(partials->data_ptr<acc>(), result->data_ptr<scalar_t>(),
                                                     walk.units, size);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  if (sparse) rest.token_grad = TokenGrad::kNone;
  if (tiles) rest.num_positions = 0;
  if (segments_here) rest.num_segments = 0;
  // with nothing left to sum by key, no plain backward: it would check the ids again (a host synchronization)
  const auto none = [&] { return at::empty({0, dim}, args.weight.options()); };
  auto [token_grad, rest_position_grad, rest_segment_grad] =
      write_grad_sum ? backward_cuda(rest) : std::tuple{none(), none(), none()};
  return {sparse ? values : token_grad, tiles ? position_grad : rest_position_grad,
          segments_here ? segment_grad : rest_segment_grad, weight_out, bias_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedfast, CUDA, m) {
  m.impl("norm_forward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormForwardArgs, &norm_forward_cuda>>());
  m.impl("norm_backward_extension",
         torch::CppFunction::makeFromBoxedFunction<&boxed<NormBackwardArgs, &norm_backward_cuda>>());
}

}  // namespace embedfast
