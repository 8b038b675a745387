// The sums of gradient rows into table gradients that the plain backward (backward_cpu.cpp) and the norm backward
// (norm_cpu.cpp) share: rows summed by key after a stable counting sort, and one tile's rows summed by (offset,
// segment) in a thread's buffer. Every order depends on the inputs alone, never on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "embedfast/kernel_math.h"
#include "row_loops.h"
#include "token_walk.h"

namespace embedfast {

// Reduction blocks of the one-pass paths: at least kMinTokensPerBlock tokens, at most kMaxBlocks of them.
constexpr int64_t kMinTokensPerBlock = 256;
constexpr int64_t kMaxBlocks = 256;
// Tile sums (TileSums) keep kTilePositions x segments rows per thread: with more segments the position rows are
// summed by key instead.
constexpr int64_t kMaxTileSegments = 16;

// out[r] = scale * sum of grad rows n with key(n) == r, summed in token order; rows with no token are zero. Each
// row of `out` is written once: runs of rows no token touches are cleared with one memset.
template <typename scalar_t, typename Key>
void sum_rows_by_key(const scalar_t* grad, int64_t tokens, const SideRowLayout& layout, int64_t rows, Key key,
                     double scale, scalar_t* out) {
  const int64_t dim = layout.dim();
  using acc_t = math_t<scalar_t>;
  std::vector<int64_t> start(rows + 1, 0);
  for (int64_t n = 0; n < tokens; ++n) {
    const int64_t r = key(n);
    if (r >= 0) ++start[r + 1];
  }
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  std::vector<int64_t> sorted_tokens(start[rows]);
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < tokens; ++n) {
    const int64_t r = key(n);
    if (r >= 0) sorted_tokens[cursor[r]++] = n;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    for (int64_t r = begin; r < end;) {
      if (start[r] == start[r + 1]) {
        int64_t untouched_end = r + 1;
        while (untouched_end < end && start[untouched_end] == start[untouched_end + 1]) ++untouched_end;
        std::memset(static_cast<void*>(out + r * dim), 0, (untouched_end - r) * dim * sizeof(scalar_t));
        r = untouched_end;
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = start[r]; i < start[r + 1]; ++i) {
        scale_or_accumulate_rows(static_cast<scalar_t*>(nullptr), acc.data(), grad + sorted_tokens[i] * dim, acc_t(1), dim,
                                 false);
      }
      store_side_rows(out + r * dim, acc.data(), static_cast<acc_t>(scale), dim);
      ++r;
    }
  });
}

// One tile's gradient rows (default positions, token_walk.h) summed by (offset in the tile, segment), sequences in
// order, in side rows; flush() turns them into the tile's position rows and adds them to a segment partial sum.
template <typename acc_t>
class TileSums {
 public:
  TileSums(int64_t slots, int64_t dim) : slots_(slots), dim_(dim), sums_(kTilePositions * slots * dim), position_(dim) {}

  void clear() { std::fill(sums_.begin(), sums_.end(), acc_t(0)); }
  // the sum of the rows at offset k of the tile with this segment (0 without segments)
  acc_t* row(int64_t k, int64_t segment) { return sums_.data() + (k * slots_ + segment) * dim_; }

  // position_rows[k] = the sum over segments at offset k, for the tile's first `count` offsets; segment_partial[s]
  // (side rows, num_segments of them) += the tile's sums of segment s
  template <typename scalar_t>
  void flush(int64_t count, scalar_t* position_rows, acc_t* segment_partial, int64_t num_segments) {
    for (int64_t k = 0; k < count; ++k) {
      std::fill(position_.begin(), position_.end(), acc_t(0));
      for (int64_t segment = 0; segment < slots_; ++segment) {
        const acc_t* sum = row(k, segment);
        for (int64_t j = 0; j < dim_; ++j) position_[j] += sum[j];
      }
      store_side_rows(position_rows + k * dim_, position_.data(), acc_t(1), dim_);
      for (int64_t segment = 0; segment < num_segments; ++segment) {
        const acc_t* sum = row(k, segment);
        acc_t* partial = segment_partial + segment * dim_;
        for (int64_t j = 0; j < dim_; ++j) partial[j] += sum[j];
      }
    }
  }

 private:
  int64_t slots_, dim_;
  std::vector<acc_t> sums_, position_;
};

}  // namespace embedfast
