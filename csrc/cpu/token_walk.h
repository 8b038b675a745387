// The order in which the CPU kernels visit tokens with default positions: tile by tile of kTilePositions
// positions, every sequence's run of tokens in the tile before the next tile. A thread then reads (or makes) a
// tile's position rows once for the whole batch, and still writes output rows in runs. Any other position
// source is one sequence of all tokens: token order.
#pragma once

#include <algorithm>
#include <cstdint>

namespace embedfast {

constexpr int64_t kTilePositions = 16;

struct Walk {
  int64_t tokens;
  int64_t period;     // default positions are offset + [0, period)
  int64_t sequences;  // ceil(tokens / period)

  static Walk over(int64_t tokens, int64_t seq_len, bool default_positions) {
    const int64_t period = default_positions ? std::min(seq_len, tokens) : tokens;
    return {tokens, period, (tokens + period - 1) / period};
  }
  int64_t tiles() const { return (period + kTilePositions - 1) / kTilePositions; }
  // units of up to kTilePositions consecutive tokens of one sequence, tile-major
  int64_t units() const { return tiles() * sequences; }
  int64_t first_offset(int64_t unit) const { return unit / sequences * kTilePositions; }
  int64_t first_token(int64_t unit) const { return unit % sequences * period + first_offset(unit); }
  // tokens in a unit: fewer at the end of a sequence and in a ragged last sequence
  int64_t length(int64_t unit) const {
    return std::min({kTilePositions, period - first_offset(unit), tokens - first_token(unit)});
  }
};

}  // namespace embedfast
