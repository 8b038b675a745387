// Argument checks shared by the CPU and CUDA operators: the same messages as the Python boundary.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>

#include "embedfast/kernel_math.h"

namespace embedfast {

inline void check_index_tensor(const at::Tensor& ids, const char* name, const at::Tensor& like) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, name,
                   " must be int32 or int64, got dtype ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.is_contiguous(), name, " must be a contiguous 1-D tensor of token ids, got shape ",
                    ids.sizes(), " and strides ", ids.strides());
  TORCH_CHECK_VALUE(ids.device() == like.device(), name, " is on ", ids.device(), ", but weight is on ", like.device());
}

inline void check_optional_index(const std::optional<at::Tensor>& ids, const char* name, const at::Tensor& input_ids,
                                 const at::Tensor& like) {
  if (!ids.has_value()) {
    return;
  }
  check_index_tensor(*ids, name, like);
  TORCH_CHECK_VALUE(ids->numel() == input_ids.numel(), name, " has ", ids->numel(), " elements, but input_ids has ",
                    input_ids.numel());
  TORCH_CHECK_TYPE(ids->scalar_type() == input_ids.scalar_type(), name, " has dtype ", ids->scalar_type(),
                   ", but input_ids has ", input_ids.scalar_type());
}

inline void check_table(const at::Tensor& table, const char* name, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(table.dim() == 2 && table.is_contiguous(), name, " must be a contiguous 2-D table, got shape ",
                    table.sizes());
  TORCH_CHECK_VALUE(table.size(1) == weight.size(1), name, " has embedding_dim ", table.size(1), ", but weight has ",
                    weight.size(1));
  TORCH_CHECK_TYPE(table.scalar_type() == weight.scalar_type(), name, " has dtype ", table.scalar_type(),
                   ", but weight has ", weight.scalar_type());
  TORCH_CHECK_VALUE(table.device() == weight.device(), name, " is on ", table.device(), ", but weight is on ",
                    weight.device());
}

// Default positions are past_length + n % seq_len: they must stay inside a table of `bound` rows (0: unbounded).
inline void check_default_positions(const at::Tensor& input_ids, const std::optional<at::Tensor>& position_ids,
                                    int64_t past_length, int64_t seq_len, int64_t bound) {
  TORCH_CHECK_VALUE(past_length >= 0, "past_length must be >= 0, got ", past_length);
  if (position_ids.has_value() || input_ids.numel() == 0) {
    return;
  }
  TORCH_CHECK_VALUE(seq_len > 0, "seq_len must be > 0, got ", seq_len);
  const int64_t last = past_length + std::min(seq_len, input_ids.numel()) - 1;
  TORCH_CHECK_INDEX(bound <= 0 || last < bound, "positions reach ", last, " (past_length=", past_length,
                    ", seq_len=", seq_len, "), out of range for max_positions=", bound);
}

inline PositionMode parse_position(std::string_view position) {
  if (position == "none") return PositionMode::kNone;
  if (position == "learned") return PositionMode::kLearned;
  if (position == "interleaved") return PositionMode::kInterleaved;
  if (position == "concat") return PositionMode::kConcat;
  TORCH_CHECK_VALUE(false, "position must be 'none', 'learned', 'interleaved' or 'concat', got '", position, "'");
}

// The checks every forward implementation makes before it reads a value.
inline PositionMode check_forward_args(const at::Tensor& input_ids, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& position_ids,
                                       const std::optional<at::Tensor>& position_weight,
                                       const std::optional<at::Tensor>& token_type_ids,
                                       const std::optional<at::Tensor>& segment_weight, std::string_view position,
                                       int64_t past_length, int64_t seq_len) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous 2-D table, got shape ",
                    weight.sizes());
  check_index_tensor(input_ids, "input_ids", weight);
  check_optional_index(position_ids, "position_ids", input_ids, weight);
  check_optional_index(token_type_ids, "token_type_ids", input_ids, weight);
  const PositionMode mode = parse_position(position);
  TORCH_CHECK_VALUE((mode == PositionMode::kLearned) == position_weight.has_value(),
                    "position_weight must be given exactly when position='learned' (position='", position, "')");
  if (position_weight.has_value()) check_table(*position_weight, "position_weight", weight);
  if (segment_weight.has_value()) check_table(*segment_weight, "segment_weight", weight);
  TORCH_CHECK_VALUE(segment_weight.has_value() || !token_type_ids.has_value(),
                    "token_type_ids were given, but there is no segment table");
  check_default_positions(input_ids, position_ids, past_length, seq_len,
                          mode == PositionMode::kLearned ? position_weight->size(0) : 0);
  return mode;
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& input_ids,
                                const std::optional<at::Tensor>& position_ids,
                                const std::optional<at::Tensor>& token_type_ids, std::string_view token_grad,
                                int64_t num_embeddings, int64_t num_positions, int64_t num_segments,
                                int64_t past_length, int64_t seq_len) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.is_contiguous() && grad_out.size(0) == input_ids.numel(),
                    "grad_out must be a contiguous (num_tokens, embedding_dim) tensor, got shape ", grad_out.sizes());
  check_index_tensor(input_ids, "input_ids", grad_out);
  check_optional_index(position_ids, "position_ids", input_ids, grad_out);
  check_optional_index(token_type_ids, "token_type_ids", input_ids, grad_out);
  TORCH_CHECK_VALUE(token_grad == "sparse" || token_grad == "dense" || token_grad == "none",
                    "token_grad must be 'sparse', 'dense' or 'none', got '", token_grad, "'");
  TORCH_CHECK_VALUE(num_embeddings > 0 && num_positions >= 0 && num_segments >= 0,
                    "table sizes must be positive, got num_embeddings=", num_embeddings, ", num_positions=", num_positions,
                    ", num_segments=", num_segments);
  check_default_positions(input_ids, position_ids, past_length, seq_len, num_positions);
}

}  // namespace embedfast

namespace embedfast {

// Every id must lie in [0, bound) (bound <= 0: no upper bound). `exact`: read the values back and raise
// IndexError naming the bad one (on CUDA a host synchronization). Otherwise a device-side assertion: no
// synchronization, safe under CUDA-graph capture, and a bad id stops the stream before any kernel reads it.
inline void check_index_range(const at::Tensor& ids, const char* name, int64_t bound, bool exact = true) {
  if (ids.numel() == 0) {
    return;
  }
  if (!exact) {
    at::Tensor valid = ids.ge(0);
    if (bound > 0) valid = valid.logical_and(ids.lt(bound));
    at::_assert_async(valid.all(), std::string(name) + " contains an index out of range (check_bounds=False)");
    return;
  }
  const auto [low_tensor, high_tensor] = at::aminmax(ids);
  const int64_t low = low_tensor.item<int64_t>();
  const int64_t high = high_tensor.item<int64_t>();
  TORCH_CHECK_INDEX(low >= 0, name, " contains ", low, ": indices must be >= 0");
  TORCH_CHECK_INDEX(bound <= 0 || high < bound, name, " contains ", high, ", out of range for a table of ", bound,
                    " rows (valid: 0..", bound - 1, ")");
}

// The index values the forward reads rows with, each against its table.
inline void check_forward_index_ranges(const at::Tensor& input_ids, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& position_ids,
                                       const std::optional<at::Tensor>& position_weight,
                                       const std::optional<at::Tensor>& token_type_ids,
                                       const std::optional<at::Tensor>& segment_weight, int64_t max_positions,
                                       bool exact = true) {
  check_index_range(input_ids, "input_ids", weight.size(0), exact);
  if (position_ids.has_value()) {
    check_index_range(*position_ids, "position_ids", position_weight.has_value() ? position_weight->size(0) : max_positions,
                      exact);
  }
  if (token_type_ids.has_value()) check_index_range(*token_type_ids, "token_type_ids", segment_weight->size(0), exact);
}

// The index values the backward writes rows with, each against the gradient it writes.
inline void check_backward_index_ranges(const at::Tensor& input_ids, const std::optional<at::Tensor>& position_ids,
                                        const std::optional<at::Tensor>& token_type_ids, bool dense,
                                        int64_t num_embeddings, int64_t num_positions, int64_t num_segments,
                                        bool exact = true) {
  if (dense) check_index_range(input_ids, "input_ids", num_embeddings, exact);
  if (num_positions > 0 && position_ids.has_value()) check_index_range(*position_ids, "position_ids", num_positions, exact);
  if (num_segments > 0 && token_type_ids.has_value()) {
    check_index_range(*token_type_ids, "token_type_ids", num_segments, exact);
  }
}

}  // namespace embedfast
