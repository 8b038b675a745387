// CPU kernel of embedfast::backward_extension.
//
// One pass over grad_out writes the sparse values and reduces the segment gradient per fixed block of tokens;
// with a position table and default positions the pass goes tile by tile instead (token_walk.h) and sums the
// position rows too (backward_by_tiles). Dense token gradients, and position gradients of explicit or packed
// positions, are summed per row after a stable counting sort. Every reduction order depends only on the
// inputs, never on the thread count. Sums are side rows (row_loops.h) until they are stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "embedfast/checks.h"
#include "embedfast/kernel_math.h"
#include "embedfast/spec.h"
#include "row_loops.h"
#include "table_sums.h"
#include "token_walk.h"

namespace embedfast {
namespace {

// Default positions with a position table: one pass over grad_out in the forward's tile order, one tile per
// task, writes the sparse values and sums each tile's rows by (offset, segment) in a thread's buffer, whence
// the tile's position rows and a per-tile segment partial; the partials are then summed in tile order. Every
// sum runs in an order fixed by the inputs alone (sequences in order within a tile).
template <typename scalar_t, typename index_t>
void backward_by_tiles(const scalar_t* grad, const index_t* seg_ids, const Walk& walk, const Chunk& chunk,
                       const SideRowLayout& layout, double scale, int64_t offset, int64_t num_segments, scalar_t* values,
                       bool stream, scalar_t* position_grad, int64_t num_positions, scalar_t* segment_grad) {
  using acc_t = math_t<scalar_t>;
  const int64_t dim = layout.dim();
  const int64_t slots = std::max<int64_t>(num_segments, 1);  // sums of one offset: one per segment
  std::memset(static_cast<void*>(position_grad), 0, num_positions * dim * sizeof(scalar_t));
  std::vector<acc_t> partial(walk.tiles() * num_segments * dim, acc_t(0));
  at::parallel_for(0, walk.tiles(), 1, [&](int64_t begin, int64_t end) {
    TileSums<acc_t> sums(slots, dim);
    for (int64_t tile = begin; tile < end; ++tile) {
      sums.clear();
      for (int64_t unit = tile * walk.sequences; unit < (tile + 1) * walk.sequences; ++unit) {
        const int64_t n0 = walk.first_token(unit);
        for (int64_t k = 0; k < walk.length(unit); ++k) {
          const int64_t n = n0 + k, segment = seg_ids != nullptr ? static_cast<int64_t>(seg_ids[n]) : 0;
          acc_t* sum = chunk.contains(n) ? sums.row(k, segment) : nullptr;
          if (values == nullptr && sum == nullptr) continue;
          scale_or_accumulate_rows(values != nullptr ? values + n * dim : nullptr, sum, grad + n * dim,
                                   static_cast<acc_t>(scale), dim, stream);
        }
      }
      const int64_t first = tile * kTilePositions;
      sums.flush(std::min(kTilePositions, walk.period - first), position_grad + (offset + first) * dim,
                 partial.data() + tile * num_segments * dim, num_segments);
    }
    if (stream) end_streaming();
  });
  sum_partials(partial.data(), walk.tiles(), num_segments, layout, segment_grad);
}

// One pass: sparse values, and per-block segment sums (blocks fixed by the token count alone).
template <typename scalar_t, typename index_t>
void values_and_segment_sums(const scalar_t* grad, const index_t* seg_ids, int64_t tokens, const Chunk& chunk,
                             const SideRowLayout& layout, double scale, int64_t num_segments, scalar_t* values, bool stream,
                             scalar_t* segment_grad) {
  using acc_t = math_t<scalar_t>;
  const int64_t dim = layout.dim();
  const int64_t block = std::max(kMinTokensPerBlock, (tokens + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t blocks = (tokens + block - 1) / block;
  std::vector<acc_t> partial(blocks * num_segments * dim, acc_t(0));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t n = b * block; n < std::min(tokens, (b + 1) * block); ++n) {
        const int64_t segment = seg_ids != nullptr ? static_cast<int64_t>(seg_ids[n]) : 0;
        acc_t* sum = num_segments > 0 && chunk.contains(n) ? partial.data() + (b * num_segments + segment) * dim : nullptr;
        if (values == nullptr && sum == nullptr) continue;
        scale_or_accumulate_rows(values != nullptr ? values + n * dim : nullptr, sum, grad + n * dim,
                                 static_cast<acc_t>(scale), dim, stream);
      }
    }
    if (stream) end_streaming();
  });
  sum_partials(partial.data(), blocks, num_segments, layout, segment_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const BackwardArgs& args) {
  check_backward_args(args, /*exact=*/true);
  const at::Tensor& grad_out = args.grad_out;
  const int64_t tokens = grad_out.size(0), dim = grad_out.size(1);
  const bool sparse = args.token_grad == TokenGrad::kSparse, dense = args.token_grad == TokenGrad::kDense;
  const int64_t num_positions = args.num_positions, num_segments = args.num_segments;
  const SideRowLayout layout(grad_out.scalar_type(), dim);
  at::Tensor weight_grad = at::empty({sparse ? tokens : (dense ? args.num_embeddings : 0), dim}, grad_out.options());
  at::Tensor position_grad = at::empty({num_positions, dim}, grad_out.options());
  at::Tensor segment_grad = at::empty({num_segments, dim}, grad_out.options());

  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_backward_cpu", [&] {
    const index_t* ids = args.input_ids.data_ptr<index_t>();
    const PositionSource<index_t> source = position_source<index_t>(args);
    // token types are read only for a segment gradient: with a frozen segment table they index nothing
    const index_t* seg_ids = num_segments > 0 ? data_or_null<index_t>(args.token_type_ids) : nullptr;
    const Shard shard = shard_of(args, args.num_embeddings);
    const Chunk chunk = chunk_of(args);
    EMBEDFAST_DISPATCH_TABLE_TYPES(grad_out.scalar_type(), "embedfast_backward_cpu", [&] {
      const scalar_t* grad = grad_out.data_ptr<scalar_t>();
      scalar_t* values = sparse ? weight_grad.data_ptr<scalar_t>() : nullptr;
      const bool stream = sparse && stream_output(weight_grad.nbytes());
      const bool default_positions = source.position_ids == nullptr && !source.packed();
      const bool by_tiles = num_positions > 0 && default_positions && tokens > 0 && num_segments <= kMaxTileSegments;
      if (by_tiles) {
        backward_by_tiles(grad, seg_ids, Walk::over(tokens, source.seq_len, true), chunk, layout, args.scale,
                          source.offset, num_segments, values, stream, position_grad.data_ptr<scalar_t>(), num_positions,
                          segment_grad.data_ptr<scalar_t>());
      } else if (sparse || num_segments > 0) {
        values_and_segment_sums(grad, seg_ids, tokens, chunk, layout, args.scale, num_segments, values, stream,
                                segment_grad.data_ptr<scalar_t>());
      }
      if (dense) {
        const int64_t padding_idx = args.padding_idx;
        sum_rows_by_key(grad, tokens, layout, args.num_embeddings,
                        [&](int64_t n) {
                          const int64_t id = static_cast<int64_t>(ids[n]);
                          return id == padding_idx ? int64_t(-1) : shard.row(id);
                        },
                        args.scale, weight_grad.data_ptr<scalar_t>());
      }
      if (num_positions > 0 && !by_tiles) {
        sum_rows_by_key(grad, tokens, layout, num_positions,
                        [&](int64_t n) { return chunk.contains(n) ? source(n) : int64_t(-1); }, 1.0,
                        position_grad.data_ptr<scalar_t>());
      }
    });
  });
  return {weight_grad, position_grad, segment_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedfast, CPU, m) {
  m.impl("backward_extension", torch::CppFunction::makeFromBoxedFunction<&boxed<BackwardArgs, &backward_cpu>>());
}

}  // namespace embedfast
