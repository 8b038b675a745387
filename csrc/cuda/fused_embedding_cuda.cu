// CUDA kernels of embedfast::forward_extension and embedfast::backward_extension.
//
// Forward: threads along x own 16-byte column chunks, threads along y walk token rows, so a warp reads
// contiguous 512-byte spans of one row (LDG.E.128) and the sinusoid frequencies of a chunk are computed
// once per thread. Sinusoids are computed in-kernel (angle reduced in float64, see kernel_math.h): a
// table would add a read per element for nothing a memory-bound kernel can use.
// Backward: one pass over grad_out writes the sparse values and per-block segment sums (up to
// kMaxRegisterSegments segments in registers); a second tiny kernel adds the block sums in block order.
// Dense token and learned-position gradients: stable sort of the keys, then one thread group per run of
// equal keys sums its rows in token order; positions of packed documents (cu_seqlens, found by binary search in
// the forward) instead sum each position row over the documents in order. No float atomics anywhere: results
// are bitwise reproducible.
// Vocabulary shards and sequence chunks (spec.py): a token of another shard reads no token row and its key drops it
// from the dense sums; a token out of the chunk skips the position and segment rows rather than multiplying them by 0,
// so that an Inf or NaN there cannot leak into its output or the side gradients.
// Everything runs on the current stream with no host synchronization except the exact index-range checks;
// with check_bounds=False or under CUDA-graph capture, device-side assertions replace them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "embedfast/checks.h"
#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"
#include "cuda_common.cuh"

namespace embedfast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRegisterSegments = 4;
constexpr int64_t kTokensPerBlock = 64;  // backward reduction block: fixed, so sums do not depend on the GPU
constexpr int kMaxGridY = 65535;

// the elements of one column chunk, moved by one access (Chunk is kernel_math.h's sequence chunk)
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Packet {
  scalar_t v[kVec];
};

template <typename scalar_t, int kVec>
__device__ __forceinline__ Packet<scalar_t, kVec> load_chunk(const scalar_t* p) {
  return *reinterpret_cast<const Packet<scalar_t, kVec>*>(p);
}

template <typename scalar_t, int kVec>
__device__ __forceinline__ void store_chunk(scalar_t* p, const Packet<scalar_t, kVec>& c) {
  *reinterpret_cast<Packet<scalar_t, kVec>*>(p) = c;
}

// kPacked: positions of packed documents (a binary search per token), in a variant of its own so that the search's
// registers do not weigh on the other kernels. At least 3 blocks per SM for the 8-wide (16-bit) variants, 4 for the
// others (at most 80 and 64 registers): the occupancy ptxas picks for the widest ones unbounded, but by spilling.
template <typename scalar_t, typename index_t, int kVec, bool kPacked>
__global__ void __launch_bounds__(kThreads, kVec == 8 ? 3 : 4) forward_kernel(
    const index_t* __restrict__ ids, const scalar_t* __restrict__ weight, Shard shard,
    const index_t* __restrict__ position_ids, const index_t* __restrict__ cu_seqlens, int64_t num_documents,
    int64_t offset, SequenceColumns sequence, const scalar_t* __restrict__ position_weight,
    const index_t* __restrict__ segment_ids, const scalar_t* __restrict__ segment_weight, scalar_t* __restrict__ out,
    int64_t tokens, int64_t dim, math_t<scalar_t> scale, PositionMode mode, double log_step) {
  using acc = math_t<scalar_t>;
  const auto position_of = [&](int64_t n, int64_t column) {
    if constexpr (kPacked) {
      return offset + n - document_start(cu_seqlens, num_documents, n);
    } else {
      return position_ids != nullptr ? static_cast<int64_t>(position_ids[n]) : offset + column;
    }
  };
  const int64_t chunks = dim / kVec;
  for (int64_t chunk = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; chunk < chunks;
       chunk += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = chunk * kVec;
    const bool sinusoid = mode == PositionMode::kInterleaved || mode == PositionMode::kConcat;
    SinusoidColumn columns[kVec];
    if (sinusoid) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) columns[k] = sinusoid_column(col + k, dim, mode, log_step);
    }
    for (int64_t n = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; n < tokens; n += int64_t(gridDim.y) * blockDim.y) {
      const int64_t token_row = shard.row(static_cast<int64_t>(ids[n]));
      Packet<scalar_t, kVec> token = {};
      if (token_row >= 0) token = load_chunk<scalar_t, kVec>(weight + token_row * dim + col);
      acc position[kVec] = {};
      acc segment[kVec] = {};
      const int64_t column = sequence.column(n);
      if (sequence.in_chunk(column)) {
        if (mode == PositionMode::kLearned) {
          const auto row = load_chunk<scalar_t, kVec>(position_weight + position_of(n, column) * dim + col);
#pragma unroll
          for (int k = 0; k < kVec; ++k) position[k] = static_cast<acc>(row.v[k]);
        } else if (sinusoid) {
          const int64_t pos = position_of(n, column);
#pragma unroll
          for (int k = 0; k < kVec; ++k) position[k] = sine<acc>(sinusoid_angle(pos, columns[k])) * columns[k].keep;
        }
        if (segment_weight != nullptr) {
          const int64_t seg = segment_ids != nullptr ? static_cast<int64_t>(segment_ids[n]) : 0;
          const auto row = load_chunk<scalar_t, kVec>(segment_weight + seg * dim + col);
#pragma unroll
          for (int k = 0; k < kVec; ++k) segment[k] = static_cast<acc>(row.v[k]);
        }
      }
      Packet<scalar_t, kVec> result;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        result.v[k] = static_cast<scalar_t>(combine(static_cast<acc>(token.v[k]), scale, position[k], segment[k]));
      }
      store_chunk<scalar_t, kVec>(out + n * dim + col, result);
    }
  }
}

// Sparse values (grad * scale) and, per block of kTokensPerBlock tokens, the sum of grad rows per segment (of the
// chunk's tokens).
template <typename scalar_t, typename index_t, int kVec>
__global__ void __launch_bounds__(kThreads) values_and_segment_partials_kernel(
    const scalar_t* __restrict__ grad, const index_t* __restrict__ segment_ids, SequenceColumns sequence,
    scalar_t* __restrict__ values, math_t<scalar_t>* __restrict__ partials, int64_t tokens, int64_t dim,
    int num_segments, math_t<scalar_t> scale) {
  using acc = math_t<scalar_t>;
  const int64_t chunks = dim / kVec;
  const int64_t chunk = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;  // x: token blocks (no 65535 limit)
  if (chunk >= chunks) return;
  const int64_t col = chunk * kVec;
  acc sums[kMaxRegisterSegments][kVec] = {};
  const int64_t first = blockIdx.x * kTokensPerBlock;
  const int64_t last = min(tokens, first + kTokensPerBlock);
  for (int64_t n = first, column = sequence.column(first); n < last; ++n, column = sequence.next(column)) {
    const auto row = load_chunk<scalar_t, kVec>(grad + n * dim + col);
    if (values != nullptr) {
      Packet<scalar_t, kVec> scaled;
#pragma unroll
      for (int k = 0; k < kVec; ++k) scaled.v[k] = static_cast<scalar_t>(static_cast<acc>(row.v[k]) * scale);
      store_chunk<scalar_t, kVec>(values + n * dim + col, scaled);
    }
    if (num_segments > 0 && sequence.in_chunk(column)) {
      const int seg = segment_ids != nullptr ? static_cast<int>(segment_ids[n]) : 0;
#pragma unroll
      for (int s = 0; s < kMaxRegisterSegments; ++s) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) sums[s][k] += seg == s ? static_cast<acc>(row.v[k]) : acc(0);
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kMaxRegisterSegments; ++s) {  // static indices keep sums in registers
    if (s < num_segments) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) partials[(blockIdx.x * int64_t(num_segments) + s) * dim + col + k] = sums[s][k];
    }
  }
}

// Per token, the row of a keyed sum its gradient goes to: ids[n] (no ids: the default position offset + n % seq_len)
// as a row of `shard`; -1 (dropped) for a token out of seq_chunk, with the id `skip` or of another shard.
template <typename index_t>
__global__ void row_keys_kernel(const index_t* __restrict__ ids, int64_t offset, Chunk seq_chunk, int64_t skip,
                                Shard shard, int64_t* __restrict__ keys, int64_t tokens) {
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= tokens) return;
  const int64_t id = unpacked_position(ids, n, offset, seq_chunk.seq_len);
  keys[n] = seq_chunk.contains(n) && id != skip ? shard.row(id) : -1;
}

// keys sorted (stably) with their token order: each run of equal keys is summed by the thread group of its
// first element, in token order; keys -1 (dropped tokens) are skipped.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sum_sorted_runs_kernel(
    const scalar_t* __restrict__ grad, const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ order,
    scalar_t* __restrict__ out, int64_t tokens, int64_t dim, math_t<scalar_t> scale) {
  for (int64_t i = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; i < tokens; i += int64_t(gridDim.y) * blockDim.y) {
    const int64_t key = sorted_keys[i];
    if (key < 0 || (i > 0 && sorted_keys[i - 1] == key)) continue;
    for (int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; col < dim; col += int64_t(gridDim.x) * blockDim.x) {
      math_t<scalar_t> sum = 0;
      for (int64_t j = i; j < tokens && sorted_keys[j] == key; ++j) sum += static_cast<math_t<scalar_t>>(grad[order[j] * dim + col]);
      out[key * dim + col] = static_cast<scalar_t>(sum * scale);
    }
  }
}

// out[p] = sum over documents i, in order, of grad[cu_seqlens[i] + p - offset] where document i reaches that far
// and that token is in seq_chunk.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) sum_packed_positions_kernel(
    const scalar_t* __restrict__ grad, const index_t* __restrict__ cu_seqlens, Chunk seq_chunk,
    scalar_t* __restrict__ out, int64_t num_documents, int64_t num_positions, int64_t dim, int64_t offset) {
  for (int64_t p = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; p < num_positions; p += int64_t(gridDim.y) * blockDim.y) {
    for (int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; col < dim; col += int64_t(gridDim.x) * blockDim.x) {
      math_t<scalar_t> sum = 0;
      for (int64_t i = 0; p >= offset && i < num_documents; ++i) {
        const int64_t token = static_cast<int64_t>(cu_seqlens[i]) + p - offset;
        if (token < static_cast<int64_t>(cu_seqlens[i + 1]) && seq_chunk.contains(token)) {
          sum += static_cast<math_t<scalar_t>>(grad[token * dim + col]);
        }
      }
      out[p * dim + col] = static_cast<scalar_t>(sum);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// launch(std::integral_constant<int, kVec>{}) with 16-byte chunks (kVec = 16 / sizeof(scalar_t)) when every row
// start of the given tables is 16-byte aligned, else with one element per thread (kVec = 1).
template <typename scalar_t, typename Launch>
void launch_vectorized(int64_t dim, std::initializer_list<const void*> pointers, const Launch& launch) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  bool wide = dim % kWide == 0;
  for (const void* p : pointers) wide = wide && (p == nullptr || aligned16(p));
  if (wide) {
    launch(std::integral_constant<int, kWide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

dim3 row_grid(int64_t chunks, int64_t rows, dim3 block) {
  const int64_t x = (chunks + block.x - 1) / block.x;
  const int64_t y = std::min<int64_t>((rows + block.y - 1) / block.y, kMaxGridY);
  return dim3(static_cast<unsigned>(std::max<int64_t>(x, 1)), static_cast<unsigned>(std::max<int64_t>(y, 1)));
}

dim3 row_block(int64_t chunks) {
  const int x = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (chunks + 31) / 32 * 32)));
  return dim3(x, kThreads / x);
}

at::Tensor forward_cuda(const ForwardArgs& args) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(args.weight));
  check_forward_args(args, exact_checks(args.check_bounds));
  const at::Tensor& weight = args.weight;
  const int64_t tokens = args.input_ids.numel(), dim = weight.size(1);
  at::Tensor out = at::empty({tokens, dim}, weight.options());
  if (tokens == 0 || dim == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_forward_cuda", [&] {
    EMBEDFAST_DISPATCH_TABLE_TYPES(weight.scalar_type(), "embedfast_forward_cuda", [&] {
      const scalar_t* pos_table = args.position_weight.has_value() ? args.position_weight->data_ptr<scalar_t>() : nullptr;
      const scalar_t* seg_table = args.segment_weight.has_value() ? args.segment_weight->data_ptr<scalar_t>() : nullptr;
      launch_vectorized<scalar_t>(dim, {weight.data_ptr(), out.data_ptr(), pos_table, seg_table}, [&](auto vec_constant) {
        constexpr int kVec = decltype(vec_constant)::value;
        const dim3 block = row_block(dim / kVec);
        const PositionSource<index_t> positions = position_source<index_t>(args);
        const auto kernel = positions.packed() ? forward_kernel<scalar_t, index_t, kVec, true>
                                               : forward_kernel<scalar_t, index_t, kVec, false>;
        kernel<<<row_grid(dim / kVec, tokens, block), block, 0, stream>>>(
            args.input_ids.data_ptr<index_t>(), weight.data_ptr<scalar_t>(), shard_of(args, weight.size(0)),
            positions.position_ids, positions.cu_seqlens, positions.num_documents, positions.offset,
            SequenceColumns(chunk_of(args)), pos_table, data_or_null<index_t>(args.token_type_ids), seg_table,
            out.data_ptr<scalar_t>(), tokens, dim, static_cast<math_t<scalar_t>>(args.scale), args.position_mode,
            sinusoid_log_step(dim, args.position_mode, std::log(args.sinusoid_base)));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

// The keys of row_keys_kernel for ids (or none) of input_ids' dtype.
at::Tensor row_keys(const at::Tensor& input_ids, const std::optional<at::Tensor>& ids, int64_t offset,
                    const Chunk& seq_chunk, int64_t skip, const Shard& shard) {
  const int64_t tokens = input_ids.numel();
  at::Tensor keys = at::empty({tokens}, input_ids.options().dtype(at::kLong));
  if (tokens == 0) return keys;
  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "embedfast_row_keys", [&] {
    row_keys_kernel<index_t><<<static_cast<unsigned>((tokens + kThreads - 1) / kThreads), kThreads, 0,
                               at::cuda::getCurrentCUDAStream()>>>(
        data_or_null<index_t>(ids), offset, seq_chunk, skip, shard, keys.data_ptr<int64_t>(), tokens);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return keys;
}

// scale * (sum of grad rows per key), rows with no key zero; keys -1 are dropped.
at::Tensor sum_rows_by_key(const at::Tensor& grad, const at::Tensor& keys, int64_t rows, double scale) {
  at::Tensor out = at::zeros({rows, grad.size(1)}, grad.options());
  const int64_t tokens = grad.size(0), dim = grad.size(1);
  if (tokens == 0 || rows == 0 || dim == 0) return out;
  const auto [sorted_keys, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const dim3 block(std::min<int64_t>(128, (dim + 31) / 32 * 32), 2);
  EMBEDFAST_DISPATCH_TABLE_TYPES(grad.scalar_type(), "embedfast_sum_rows_by_key", [&] {
    sum_sorted_runs_kernel<scalar_t><<<row_grid(dim, tokens, block), block, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), sorted_keys.data_ptr<int64_t>(), order.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
        tokens, dim, static_cast<math_t<scalar_t>>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Positions of packed documents: each position row summed over the documents, in document order.
at::Tensor sum_packed_positions(const at::Tensor& grad, const at::Tensor& cu_seqlens, const Chunk& seq_chunk,
                                int64_t rows, int64_t offset) {
  at::Tensor out = at::empty({rows, grad.size(1)}, grad.options());
  const int64_t dim = grad.size(1);
  if (rows == 0 || dim == 0) return out;
  const dim3 block(std::min<int64_t>(128, (dim + 31) / 32 * 32), 2);
  AT_DISPATCH_INDEX_TYPES(cu_seqlens.scalar_type(), "embedfast_sum_packed_positions", [&] {
    EMBEDFAST_DISPATCH_TABLE_TYPES(grad.scalar_type(), "embedfast_sum_packed_positions", [&] {
      sum_packed_positions_kernel<scalar_t, index_t><<<row_grid(dim, rows, block), block, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad.data_ptr<scalar_t>(), cu_seqlens.data_ptr<index_t>(), seq_chunk, out.data_ptr<scalar_t>(),
          cu_seqlens.numel() - 1, rows, dim, offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const BackwardArgs& args) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(args.grad_out));
  check_backward_args(args, exact_checks(args.check_bounds));
  const at::Tensor& grad_out = args.grad_out;
  const at::Tensor& input_ids = args.input_ids;
  const int64_t num_segments = args.num_segments, num_positions = args.num_positions;
  const bool sparse = args.token_grad == TokenGrad::kSparse, dense = args.token_grad == TokenGrad::kDense;
  const int64_t tokens = grad_out.size(0), dim = grad_out.size(1);
  at::Tensor values = at::empty({sparse ? tokens : 0, dim}, grad_out.options());
  at::Tensor weight_grad = values;
  at::Tensor segment_grad = at::zeros({num_segments, dim}, grad_out.options());
  const bool segments_in_registers = num_segments <= kMaxRegisterSegments;
  const Chunk seq_chunk = chunk_of(args);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (tokens > 0 && dim > 0 && (sparse || (num_segments > 0 && segments_in_registers))) {
    AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "embedfast_backward_cuda", [&] {
      EMBEDFAST_DISPATCH_TABLE_TYPES(grad_out.scalar_type(), "embedfast_backward_cuda", [&] {
        using acc = math_t<scalar_t>;
        const int64_t blocks = (tokens + kTokensPerBlock - 1) / kTokensPerBlock;
        const int reduced_segments = segments_in_registers ? static_cast<int>(num_segments) : 0;
        at::Tensor partials = at::empty({reduced_segments > 0 ? blocks : 0, reduced_segments, dim},
                                        grad_out.options().dtype(c10::CppTypeToScalarType<acc>::value));
        launch_vectorized<scalar_t>(dim, {grad_out.data_ptr(), values.data_ptr()}, [&](auto vec_constant) {
          constexpr int kVec = decltype(vec_constant)::value;
          const int64_t chunks = dim / kVec;
          const int threads = static_cast<int>(std::min<int64_t>(kThreads, (chunks + 31) / 32 * 32));
          const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((chunks + threads - 1) / threads));
          values_and_segment_partials_kernel<scalar_t, index_t, kVec><<<grid, threads, 0, stream>>>(
              grad_out.data_ptr<scalar_t>(), data_or_null<index_t>(args.token_type_ids), SequenceColumns(seq_chunk),
              sparse ? values.data_ptr<scalar_t>() : nullptr, partials.data_ptr<acc>(), tokens, dim, reduced_segments,
              static_cast<acc>(args.scale));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        if (reduced_segments > 0) {
          const int64_t size = num_segments * dim;
          sum_partials_kernel<scalar_t><<<static_cast<unsigned>((size + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
              partials.data_ptr<acc>(), segment_grad.data_ptr<scalar_t>(), blocks, size);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  }
  if (num_segments > 0 && !segments_in_registers) {
    const at::Tensor segments =
        args.token_type_ids.has_value() ? *args.token_type_ids : at::zeros({tokens}, input_ids.options());
    const at::Tensor keys = row_keys(input_ids, segments, 0, seq_chunk, -1, Shard{0, num_segments});
    segment_grad = sum_rows_by_key(grad_out, keys, num_segments, 1.0);
  }
  if (dense) {
    const Chunk every_token{0, 1, 1};
    const at::Tensor keys =
        row_keys(input_ids, input_ids, 0, every_token, args.padding_idx, shard_of(args, args.num_embeddings));
    weight_grad = sum_rows_by_key(grad_out, keys, args.num_embeddings, args.scale);
  } else if (!sparse) {
    weight_grad = at::empty({0, dim}, grad_out.options());
  }
  at::Tensor position_grad = at::empty({0, dim}, grad_out.options());
  if (num_positions > 0 && args.cu_seqlens.has_value() && !args.position_ids.has_value()) {
    position_grad = sum_packed_positions(grad_out, *args.cu_seqlens, seq_chunk, num_positions, args.position_offset);
  } else if (num_positions > 0) {
    const at::Tensor keys =
        row_keys(input_ids, args.position_ids, args.position_offset, seq_chunk, -1, Shard{0, num_positions});
    position_grad = sum_rows_by_key(grad_out, keys, num_positions, 1.0);
  }
  return {weight_grad, position_grad, segment_grad};
}

TORCH_LIBRARY_IMPL(embedfast, CUDA, m) {
  m.impl("forward_extension", torch::CppFunction::makeFromBoxedFunction<&boxed<ForwardArgs, &forward_cuda>>());
  m.impl("backward_extension", torch::CppFunction::makeFromBoxedFunction<&boxed<BackwardArgs, &backward_cuda>>());
}

}  // namespace embedfast
