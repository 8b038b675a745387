// Per-element math of the fused embedding, shared by the CPU and the CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include "embedfast/spec.h"

namespace embedfast {

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

// The dropout of the norm operators (embedfast/dropout.py): element (n, d), token n's column d, is kept when its
// bits fmix32(d ^ key(n)) are >= dropout_threshold(p), key(n) being two rounds of MurmurHash3's 32-bit finaliser over
// the token index and the seed: two rounds a row, one an element.
C10_HOST_DEVICE inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

C10_HOST_DEVICE inline uint32_t dropout_row_key(uint64_t seed, uint64_t row) {
  const uint32_t mixed = fmix32(static_cast<uint32_t>(row) ^ static_cast<uint32_t>(seed));
  return fmix32(mixed ^ static_cast<uint32_t>(seed >> 32) ^ (static_cast<uint32_t>(row >> 32) * 0x9E3779B9u));
}

C10_HOST_DEVICE inline uint32_t dropout_bits(uint32_t row_key, uint32_t column) { return fmix32(column ^ row_key); }

// spec.dropout_threshold: min(int(p * 2**32), 2**32 - 1), p in [0, 1)
C10_HOST_DEVICE inline uint32_t dropout_threshold(double p) {
  const double scaled = p * 4294967296.0;
  return scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
}

// What a kept element is multiplied by: 1 / (1 - p), rounded once to the math type (as torch rounds the scalar).
template <typename T>
C10_HOST_DEVICE inline T dropout_scale(double p) {
  return static_cast<T>(1.0 / (1.0 - p));
}

// A token's (mean, rstd) from the row's sum and its sum of squares about `mean` (spec.py): LAYERNORM
// mean(x), 1 / sqrt(mean((x - mean)^2) + eps); RMSNORM 0, 1 / sqrt(mean(x^2) + eps); NONE 0, 1.
C10_HOST_DEVICE inline float norm_rstd(float squares, int64_t dim, float eps) {
  return 1.0f / sqrtf(squares / static_cast<float>(dim) + eps);
}
C10_HOST_DEVICE inline double norm_rstd(double squares, int64_t dim, double eps) {
  return 1.0 / sqrt(squares / static_cast<double>(dim) + eps);
}

// The parameters of one call's norm epilogue, for the kernels.
template <typename T>
struct NormEpilogue {
  NormMode mode;
  T eps;
  uint64_t seed;       // the dropout seed (read on the device on CUDA)
  uint32_t threshold;  // dropout_threshold(p)
  T keep_scale;        // dropout_scale(p)
  bool dropout;        // p > 0

  C10_HOST_DEVICE uint32_t row_key(uint64_t row) const { return dropout_row_key(seed, row); }
  C10_HOST_DEVICE bool kept(uint32_t key, int64_t column) const {
    return dropout_bits(key, static_cast<uint32_t>(column)) >= threshold;
  }
  // a value after the dropout: zero when dropped, else scaled; key: row_key(row) of the value's row
  C10_HOST_DEVICE T drop(T value, uint32_t key, int64_t column) const {
    return !dropout ? value : kept(key, column) ? value * keep_scale : T(0);
  }
};

// The epilogue of a norm operator's arguments; the seed is left 0 for the kernel to read (CPU: from the tensor; CUDA:
// from device memory, in the kernel).
template <typename T, typename Args>
NormEpilogue<T> norm_epilogue(const Args& args) {
  const bool dropout = args.dropout_p > 0;
  return {args.norm_mode, static_cast<T>(args.norm_eps), 0, dropout ? dropout_threshold(args.dropout_p) : 0u,
          dropout ? dropout_scale<T>(args.dropout_p) : T(1), dropout};
}

// Where token n's position comes from (spec.py): position_ids[n]; else, for packed documents,
// offset + n - cu_seqlens[i] for token n of document i; else offset + n % seq_len.
template <typename index_t>
C10_HOST_DEVICE inline int64_t unpacked_position(const index_t* position_ids, int64_t n, int64_t offset, int64_t seq_len) {
  return position_ids != nullptr ? static_cast<int64_t>(position_ids[n]) : offset + n % seq_len;
}

// The first token of token n's document: cu_seqlens[lo] <= n < cu_seqlens[hi] by binary search.
template <typename index_t>
C10_HOST_DEVICE inline int64_t document_start(const index_t* cu_seqlens, int64_t num_documents, int64_t n) {
  int64_t lo = 0, hi = num_documents;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(cu_seqlens[mid]) <= n) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return static_cast<int64_t>(cu_seqlens[lo]);
}

// A vocabulary shard (spec.py): table row r holds id start + r, for r < rows.
struct Shard {
  int64_t start;
  int64_t rows;

  // id's row in the table, or -1 when the id is another shard's
  C10_HOST_DEVICE int64_t row(int64_t id) const {
    const int64_t r = id - start;
    return r >= 0 && r < rows ? r : -1;
  }
};

// A sequence chunk (spec.py): the tokens n whose column n % seq_len lies in [start, stop) get the position and
// segment terms.
struct Chunk {
  int64_t start;
  int64_t stop;
  int64_t seq_len;

  C10_HOST_DEVICE bool whole() const { return start == 0 && stop == seq_len; }
  C10_HOST_DEVICE bool contains(int64_t n) const {
    if (whole()) return true;  // (no division per token when there is no chunk)
    const int64_t column = n % seq_len;
    return column >= start && column < stop;
  }
};

// The shard and the chunk of an operator's arguments; `rows`: the table's rows (weight's, or num_embeddings).
template <typename Args>
Shard shard_of(const Args& args, int64_t rows) {
  return {args.vocab_start, rows};
}

template <typename Args>
Chunk chunk_of(const Args& args) {
  const int64_t seq_len = std::max<int64_t>(args.seq_len, 1);
  return {args.chunk_start, args.chunk_end == -1 ? seq_len : args.chunk_end, seq_len};
}

// The position source as one value, for the CPU kernels.
template <typename index_t>
struct PositionSource {
  const index_t* position_ids;  // or null
  const index_t* cu_seqlens;    // or null; num_documents + 1 boundaries
  int64_t num_documents;
  int64_t offset;
  int64_t seq_len;

  bool packed() const { return position_ids == nullptr && cu_seqlens != nullptr; }

  int64_t operator()(int64_t n) const {
    return packed() ? offset + n - document_start(cu_seqlens, num_documents, n)
                    : unpacked_position(position_ids, n, offset, seq_len);
  }
};

template <typename index_t>
const index_t* data_or_null(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr<index_t>() : nullptr;
}

// The position source of an operator's arguments (ForwardArgs or BackwardArgs).
template <typename index_t, typename Args>
PositionSource<index_t> position_source(const Args& args) {
  return {data_or_null<index_t>(args.position_ids), data_or_null<index_t>(args.cu_seqlens),
          args.cu_seqlens.has_value() ? args.cu_seqlens->numel() - 1 : 0, args.position_offset,
          std::max<int64_t>(args.seq_len, 1)};
}

}  // namespace embedfast
