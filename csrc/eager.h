// The extension backend's eager entry (eager.cpp), bound as embedfast._C.EagerEmbedding in module.cpp.
#pragma once

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include "embedfast/spec.h"

namespace embedfast {

// functional.embed for the extension backend, built once per module plan: the call's constants (the fields of
// functional.Settings) are fixed here, and a call shapes its inputs for the forward operator as embed does (the
// same checks, exception types and messages) and returns the operator's result as (*input_ids.shape, D),
// differentiable (a C++ autograd node) when grad mode is on and a table needs a gradient. With norm_mode (a
// functional.NormSettings: norm_mode, norm_eps, dropout_p, and the module's norm_weight / norm_bias) the call is the
// norm forward operator's, with a dropout seed drawn as dropout.draw_seed draws it.
// (hidden like the pybind11 types that bind it: gcc warns of a bound class more visible than its binding)
class __attribute__((visibility("hidden"))) EagerEmbedding {
 public:
  EagerEmbedding(int64_t position_mode, int64_t max_positions, double scale, double sinusoid_base, int64_t padding_idx,
                 bool sparse, bool check_bounds, int64_t vocab_start, int64_t vocab_size);

  // The tables are known good (checked by the module or fused_input_embedding); the other arguments are the
  // caller's Python objects, checked here.
  at::Tensor operator()(pybind11::handle input_ids, const at::Tensor& weight,
                        const std::optional<at::Tensor>& position_weight, const std::optional<at::Tensor>& segment_weight,
                        pybind11::handle token_type_ids, pybind11::handle position_ids, pybind11::handle past_length,
                        pybind11::handle cu_seqlens, pybind11::handle position_offset, int64_t chunk_start,
                        int64_t chunk_end, std::optional<int64_t> norm_mode, double norm_eps, double dropout_p,
                        const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias) const;

 private:
  ForwardArgs constants_;  // the settings' fields of the forward's arguments; no tensors
  int64_t padding_idx_;  // spec.GradientOptions
  bool sparse_;
};

}  // namespace embedfast
