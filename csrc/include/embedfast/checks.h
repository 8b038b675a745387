// The checks the C++ operators make before they read a value: the same conditions and messages as
// embedfast/op_checks.py, which the Python operators make (tests/test_op_checks.py compares the two).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "embedfast/spec.h"

namespace embedfast {
namespace detail {

inline auto dtype_name(const at::Tensor& t) { return c10::getDtypeNames(t.scalar_type()).first; }

// Below this many ids a CPU tensor's extremes are read by one loop over its values: a decode-sized call then makes
// no operator call of its own; above it aminmax's parallel reduction is faster.
constexpr int64_t kLoopedExtremesLimit = int64_t{1} << 16;

// (min, max) of int32/int64 ids, read back to the host
inline std::pair<int64_t, int64_t> index_extremes(const at::Tensor& ids) {
  if (ids.is_cpu() && ids.is_contiguous() && ids.numel() <= kLoopedExtremesLimit) {
    return AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "embedfast_index_extremes", [&] {
      const index_t* values = ids.const_data_ptr<index_t>();
      index_t low = values[0], high = values[0];
      for (int64_t i = 1; i < ids.numel(); ++i) {
        low = std::min(low, values[i]);
        high = std::max(high, values[i]);
      }
      return std::pair<int64_t, int64_t>(low, high);
    });
  }
  const auto [low, high] = at::aminmax(ids);
  return {low.item<int64_t>(), high.item<int64_t>()};
}

// Every id must lie in [0, bound) (bound <= 0: no upper bound). `exact`: read the values back and raise
// IndexError naming the bad one (on CUDA a host synchronization). Otherwise a device-side assertion: no
// synchronization, safe under CUDA-graph capture, and a bad id stops the stream before any kernel reads it.
inline void check_index_range(const at::Tensor& ids, const char* name, int64_t bound, bool exact) {
  if (ids.numel() == 0) return;
  if (!exact) {
    at::Tensor valid = ids.ge(0);
    if (bound > 0) valid = valid.logical_and(ids.lt(bound));
    at::_assert_async(valid.all(), std::string(name) + " contains an index out of range (check_bounds=False)");
    return;
  }
  const auto [low, high] = index_extremes(ids);
  TORCH_CHECK_INDEX(low >= 0, name, " contains ", low, ": indices must be >= 0");
  TORCH_CHECK_INDEX(bound <= 0 || high < bound, name, " contains ", high, ", out of range for a table of ", bound,
                    " rows (valid: 0..", bound - 1, ")");
}

inline void check_index_tensor(const at::Tensor& ids, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, name,
                   " must be int32 or int64, got dtype ", dtype_name(ids));
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.is_contiguous(), name, " must be a contiguous 1-D tensor, got shape ",
                    ids.sizes(), " and strides ", ids.strides());
  TORCH_CHECK_VALUE(ids.device() == like.device(), name, " is on ", ids.device(), ", but ", like_name, " is on ",
                    like.device());
}

inline void check_optional_index(const std::optional<at::Tensor>& ids, const char* name, const at::Tensor& input_ids,
                                 const at::Tensor& like, const char* like_name, bool per_token = true) {
  if (!ids.has_value()) return;
  check_index_tensor(*ids, name, like, like_name);
  TORCH_CHECK_VALUE(!per_token || ids->numel() == input_ids.numel(), name, " has ", ids->numel(),
                    " elements, but input_ids has ", input_ids.numel());
  TORCH_CHECK_TYPE(ids->scalar_type() == input_ids.scalar_type(), name, " has dtype ", dtype_name(*ids),
                   ", but input_ids has ", dtype_name(input_ids));
}

inline void check_table(const std::optional<at::Tensor>& table, const char* name, const at::Tensor& weight) {
  if (!table.has_value()) return;
  TORCH_CHECK_VALUE(table->dim() == 2 && table->is_contiguous(), name, " must be a contiguous 2-D table, got shape ",
                    table->sizes(), " and strides ", table->strides());
  TORCH_CHECK_VALUE(table->size(1) == weight.size(1), name, " has embedding_dim ", table->size(1), ", but weight has ",
                    weight.size(1));
  TORCH_CHECK_TYPE(table->scalar_type() == weight.scalar_type(), name, " has dtype ", dtype_name(*table),
                   ", but weight has ", dtype_name(weight));
  TORCH_CHECK_VALUE(table->device() == weight.device(), name, " is on ", table->device(), ", but weight is on ",
                    weight.device());
}

// cu_seqlens is [0, l1, l1 + l2, ..., num_tokens]; the longest document's last position is in range.
inline void check_documents(const at::Tensor& cu_seqlens, int64_t num_tokens, int64_t position_offset, int64_t bound,
                            bool exact) {
  TORCH_CHECK_VALUE(cu_seqlens.numel() > 0, "cu_seqlens must hold at least one boundary ([0] for no tokens), got none");
  const at::Tensor lengths = cu_seqlens.slice(0, 1) - cu_seqlens.slice(0, 0, -1);
  if (!exact) {
    at::Tensor valid = cu_seqlens[0].eq(0).logical_and(cu_seqlens[-1].eq(num_tokens)).logical_and(lengths.ge(0).all());
    if (bound > 0 && lengths.numel() > 0) valid = valid.logical_and((lengths.max() + position_offset).le(bound));
    at::_assert_async(valid, "cu_seqlens is not a valid [0, ..., num_tokens] boundary list in range (check_bounds=False)");
    return;
  }
  const at::Tensor boundaries = cu_seqlens.to(at::kCPU, at::kLong);
  const int64_t* cu = boundaries.data_ptr<int64_t>();
  const int64_t count = boundaries.numel();
  TORCH_CHECK_VALUE(cu[0] == 0, "cu_seqlens must start at 0, got ", cu[0]);
  int64_t longest = 0;
  for (int64_t i = 0; i + 1 < count; ++i) {
    TORCH_CHECK_VALUE(cu[i] <= cu[i + 1], "cu_seqlens must not decrease, got cu_seqlens[", i, "] = ", cu[i],
                      " > cu_seqlens[", i + 1, "] = ", cu[i + 1]);
    longest = std::max(longest, cu[i + 1] - cu[i]);
  }
  TORCH_CHECK_VALUE(cu[count - 1] == num_tokens, "cu_seqlens must end at the number of tokens, ", num_tokens, ", got ",
                    cu[count - 1]);
  const int64_t last_position = position_offset + longest - 1;
  TORCH_CHECK_INDEX(bound <= 0 || longest == 0 || last_position < bound, "positions reach ", last_position,
                    " (position_offset=", position_offset, ", longest document ", longest,
                    "), out of range for max_positions=", bound);
}

// The positions tokens get (see spec.py) must stay inside a table of `bound` rows (0: unbounded).
template <typename Args>
void check_position_source(const Args& args, const at::Tensor& like, const char* like_name, int64_t bound, bool exact) {
  check_optional_index(args.position_ids, "position_ids", args.input_ids, like, like_name);
  check_optional_index(args.cu_seqlens, "cu_seqlens", args.input_ids, like, like_name, /*per_token=*/false);
  TORCH_CHECK_VALUE(args.position_offset >= 0, "position_offset must be >= 0, got ", args.position_offset);
  const int64_t tokens = args.input_ids.numel();
  if (args.position_ids.has_value()) {
    TORCH_CHECK_VALUE(!args.cu_seqlens.has_value(),
                      "position_ids and cu_seqlens were both given: packed documents number their own positions");
    check_index_range(*args.position_ids, "position_ids", bound, exact);
  } else if (args.cu_seqlens.has_value()) {
    check_documents(*args.cu_seqlens, tokens, args.position_offset, bound, exact);
  } else if (tokens > 0) {
    TORCH_CHECK_VALUE(args.seq_len > 0, "seq_len must be > 0, got ", args.seq_len);
    const int64_t last = args.position_offset + std::min(args.seq_len, tokens) - 1;
    TORCH_CHECK_INDEX(bound <= 0 || last < bound, "positions reach ", last, " (position_offset=", args.position_offset,
                      ", seq_len=", args.seq_len, "), out of range for max_positions=", bound);
  }
}

// A shard of `rows` rows from id vocab_start fits in a vocabulary of vocab_size ids (0: the rows are the whole
// vocabulary); returns the bound ids are checked against.
inline int64_t check_shard(int64_t vocab_start, int64_t vocab_size, int64_t rows) {
  TORCH_CHECK_VALUE(vocab_start >= 0, "vocab_start must be >= 0, got ", vocab_start);
  TORCH_CHECK_VALUE(vocab_size >= 0, "vocab_size must be >= 0 (0: the table is the whole vocabulary), got ", vocab_size);
  if (vocab_size == 0) {
    TORCH_CHECK_VALUE(vocab_start == 0, "vocab_start=", vocab_start, " needs vocab_size (the ids of the whole vocabulary)");
    return rows;
  }
  TORCH_CHECK_VALUE(vocab_start + rows <= vocab_size, "the shard's rows [", vocab_start, ", ", vocab_start + rows,
                    ") do not fit in vocab_size=", vocab_size);
  return vocab_size;
}

// The sequence chunk [chunk_start, chunk_end) (-1: to seq_len) lies within [0, seq_len].
inline void check_chunk(int64_t chunk_start, int64_t chunk_end, int64_t seq_len) {
  if (chunk_start == 0 && chunk_end == -1) return;
  const int64_t stop = chunk_end == -1 ? seq_len : chunk_end;
  TORCH_CHECK_VALUE(seq_len > 0 && 0 <= chunk_start && chunk_start <= stop && stop <= seq_len && chunk_end >= -1,
                    "the chunk [chunk_start, chunk_end) = [", chunk_start, ", ", chunk_end, ") must lie in [0, seq_len=",
                    seq_len, "]");
}

}  // namespace detail

// The forward's checks (check_forward in op_checks.py). `exact`: see detail::check_index_range.
inline void check_forward_args(const ForwardArgs& args, bool exact) {
  const at::Tensor& weight = args.weight;
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous 2-D table, got shape ",
                    weight.sizes(), " and strides ", weight.strides());
  detail::check_index_tensor(args.input_ids, "input_ids", weight, "weight");
  detail::check_optional_index(args.token_type_ids, "token_type_ids", args.input_ids, weight, "weight");
  const bool learned = args.position_mode == PositionMode::kLearned;
  TORCH_CHECK_VALUE(learned == args.position_weight.has_value(), "position_weight must be given exactly when "
                    "position_mode is 1 (learned), got ", static_cast<int64_t>(args.position_mode));
  detail::check_table(args.position_weight, "position_weight", weight);
  detail::check_table(args.segment_weight, "segment_weight", weight);
  TORCH_CHECK_VALUE(args.segment_weight.has_value() || !args.token_type_ids.has_value(),
                    "token_type_ids were given, but there is no segment table");
  const int64_t vocab_bound = detail::check_shard(args.vocab_start, args.vocab_size, weight.size(0));
  detail::check_chunk(args.chunk_start, args.chunk_end, args.seq_len);
  detail::check_index_range(args.input_ids, "input_ids", vocab_bound, exact);
  if (args.position_mode != PositionMode::kNone) {
    detail::check_position_source(args, weight, "weight", learned ? args.position_weight->size(0) : args.max_positions,
                                  exact);
  }
  if (args.token_type_ids.has_value()) {
    detail::check_index_range(*args.token_type_ids, "token_type_ids", args.segment_weight->size(0), exact);
  }
}

// The backward's checks (check_backward in op_checks.py).
inline void check_backward_args(const BackwardArgs& args, bool exact) {
  const at::Tensor& grad_out = args.grad_out;
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.is_contiguous() && grad_out.size(0) == args.input_ids.numel(),
                    "grad_out must be a contiguous (num_tokens, embedding_dim) tensor, got shape ", grad_out.sizes(),
                    " and strides ", grad_out.strides());
  detail::check_index_tensor(args.input_ids, "input_ids", grad_out, "grad_out");
  detail::check_optional_index(args.token_type_ids, "token_type_ids", args.input_ids, grad_out, "grad_out");
  TORCH_CHECK_VALUE(args.num_embeddings > 0 && args.num_positions >= 0 && args.num_segments >= 0,
                    "table sizes must be positive, got num_embeddings=", args.num_embeddings,
                    ", num_positions=", args.num_positions, ", num_segments=", args.num_segments);
  const int64_t vocab_bound = detail::check_shard(args.vocab_start, args.vocab_size, args.num_embeddings);
  detail::check_chunk(args.chunk_start, args.chunk_end, args.seq_len);
  if (args.token_grad == TokenGrad::kDense) {
    detail::check_index_range(args.input_ids, "input_ids", vocab_bound, exact);
  }
  if (args.num_positions > 0) detail::check_position_source(args, grad_out, "grad_out", args.num_positions, exact);
  if (args.num_segments > 0 && args.token_type_ids.has_value()) {
    detail::check_index_range(*args.token_type_ids, "token_type_ids", args.num_segments, exact);
  }
}

namespace detail {

// A float as Python's repr writes it (the messages of op_checks.py format floats so): the shortest digits that
// read back, fixed notation for exponents in [-4, 16) with ".0" for whole numbers, else "1e-05" / "1e+16".
inline std::string python_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char text[40];
  for (int precision = 0; precision <= 17; ++precision) {
    std::snprintf(text, sizeof(text), "%.*e", precision, value);
    if (std::strtod(text, nullptr) == value) break;
  }
  std::string mantissa(text, std::strchr(text, 'e'));
  const int exponent = std::atoi(std::strchr(text, 'e') + 1);
  const bool negative = mantissa[0] == '-';
  std::string digits;
  for (char c : mantissa) {
    if (c >= '0' && c <= '9') digits += c;
  }
  const auto count = static_cast<int>(digits.size());
  std::string out;
  if (exponent < -4 || exponent >= 16) {
    const int magnitude = exponent < 0 ? -exponent : exponent;
    out = digits.substr(0, 1) + (count > 1 ? "." + digits.substr(1) : "") + (exponent < 0 ? "e-" : "e+") +
          (magnitude < 10 ? "0" : "") + std::to_string(magnitude);
  } else if (exponent < 0) {
    out = "0." + std::string(-exponent - 1, '0') + digits;
  } else if (count <= exponent + 1) {
    out = digits + std::string(exponent + 1 - count, '0') + ".0";
  } else {
    out = digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
  }
  return (negative ? "-" : "") + out;
}

inline void check_norm_parameter(const std::optional<at::Tensor>& parameter, const char* name, const at::Tensor& weight) {
  if (!parameter.has_value()) return;
  TORCH_CHECK_VALUE(parameter->dim() == 1 && parameter->is_contiguous() && parameter->size(0) == weight.size(1), name,
                    " must be a contiguous (", weight.size(1), ",) vector (embedding_dim), got shape ", parameter->sizes());
  TORCH_CHECK_TYPE(parameter->scalar_type() == weight.scalar_type(), name, " has dtype ", dtype_name(*parameter),
                   ", but weight has ", dtype_name(weight));
  TORCH_CHECK_VALUE(parameter->device() == weight.device(), name, " is on ", parameter->device(), ", but weight is on ",
                    weight.device());
}

}  // namespace detail

// The norm operators' checks of their epilogue (check_norm in op_checks.py); the norm mode was checked unpacking.
template <typename Args>
void check_norm_args(const Args& args) {
  const at::Tensor& weight = args.weight;
  TORCH_CHECK_VALUE(args.norm_mode != NormMode::kNone || (!args.norm_weight.has_value() && !args.norm_bias.has_value()),
                    "norm_weight and norm_bias need a norm, but norm_mode is 0 (none)");
  TORCH_CHECK_VALUE(args.norm_mode != NormMode::kRmsnorm || !args.norm_bias.has_value(),
                    "norm_bias was given, but norm_mode is 2 (rmsnorm), which has no bias");
  detail::check_norm_parameter(args.norm_weight, "norm_weight", weight);
  detail::check_norm_parameter(args.norm_bias, "norm_bias", weight);
  TORCH_CHECK_VALUE(args.norm_eps >= 0, "norm_eps must be >= 0, got ", detail::python_float(args.norm_eps));
  TORCH_CHECK_VALUE(args.dropout_p >= 0 && args.dropout_p < 1, "dropout_p must be in [0, 1), got ",
                    detail::python_float(args.dropout_p));
  const std::optional<at::Tensor>& seed = args.dropout_seed;
  if (args.dropout_p > 0) {
    TORCH_CHECK_VALUE(seed.has_value(), "dropout_p > 0 needs dropout_seed (a 1-element int64 tensor)");
  }
  if (seed.has_value()) {
    TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong && seed->numel() == 1, "dropout_seed must be a 1-element int64 "
                     "tensor, got dtype ", detail::dtype_name(*seed), " and shape ", seed->sizes());
    TORCH_CHECK_VALUE(seed->device() == weight.device(), "dropout_seed is on ", seed->device(), ", but weight is on ",
                      weight.device());
  }
}

// The norm forward's checks, in the reference's order: the forward's, then the epilogue's.
inline ForwardArgs check_norm_forward_args(const NormForwardArgs& args, bool exact) {
  ForwardArgs forward = forward_part(args);
  check_forward_args(forward, exact);
  check_norm_args(args);
  return forward;
}

// The norm backward's checks, in the reference's order: the epilogue's, grad_out and stats (check_norm_backward in
// op_checks.py), then the forward's.
inline ForwardArgs check_norm_backward_args(const NormBackwardArgs& args, bool exact) {
  const at::Tensor& weight = args.weight;
  check_norm_args(args);
  const int64_t tokens = args.input_ids.numel(), dim = weight.dim() == 2 ? weight.size(1) : -1;
  const at::Tensor& grad_out = args.grad_out;
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == tokens && grad_out.size(1) == dim &&
                    grad_out.is_contiguous(), "grad_out must be a contiguous (", tokens, ", ", dim,
                    ") tensor, got shape ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == weight.scalar_type(), "grad_out has dtype ", detail::dtype_name(grad_out),
                   ", but weight has ", detail::dtype_name(weight));
  const at::ScalarType stats_dtype = compute_dtype(weight.scalar_type());
  const at::Tensor& stats = args.stats;
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == tokens && stats.size(1) == 2 && stats.is_contiguous() &&
                    stats.scalar_type() == stats_dtype, "stats must be a contiguous (", tokens, ", 2) ",
                    c10::getDtypeNames(stats_dtype).first, " tensor (the norm forward's), got shape ", stats.sizes(),
                    " and dtype ", detail::dtype_name(stats));
  ForwardArgs forward = forward_part(args);
  check_forward_args(forward, exact);
  return forward;
}

}  // namespace embedfast
