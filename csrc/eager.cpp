// The extension backend's eager entry, embedfast._C.fused_forward: the forward operator and, when a table needs a
// gradient, a C++ autograd node whose backward calls the backward operator. It computes what ops._backward
// computes for the other backends (the sparse or dense token gradient, padding rows gathered away, the position
// and segment gradients), without Python on the path: a call costs microseconds, not tens of them. ops.py
// sends every other derivative mode (forward mode, torch.func, torch.compile) through its Python Functions.
#include "eager.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

namespace embedfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Calls an embedfast operator by its stack; below autograd unless a graph of the call is wanted (double backward
// goes through the backward operator's registered derivative).
torch::jit::Stack call(const char* name, torch::jit::Stack stack, bool record_autograd = false) {
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  if (record_autograd) {
    op.callBoxed(stack);
  } else {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.callBoxed(stack);
  }
  return stack;
}

at::Tensor forward(const ForwardArgs& args) { return call("embedfast::forward_extension", args.pack())[0].toTensor(); }

at::Tensor sparse_gradient(const at::Tensor& indices, const at::Tensor& values, int64_t num_embeddings) {
  return at::_sparse_coo_tensor_unsafe(indices, values, {num_embeddings, values.size(1)});
}

// The tables are the Function's inputs 0-2 (weight, position_weight, segment_weight; those not given are not
// variables), the forward's other arguments and the gradient options follow as plain values.
struct FusedForward : public torch::autograd::Function<FusedForward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const std::optional<at::Tensor>& position_weight,
                            const std::optional<at::Tensor>& segment_weight, const ForwardArgs& args, int64_t padding_idx,
                            bool sparse) {
    (void)weight, (void)position_weight, (void)segment_weight;  // the same tensors as in args
    ctx->saved_data["padding_idx"] = padding_idx;
    ctx->saved_data["sparse"] = sparse;
    ctx->saved_data["num_embeddings"] = args.weight.size(0);
    ctx->saved_data["num_positions"] = args.position_weight.has_value() ? args.position_weight->size(0) : int64_t{0};
    ctx->saved_data["num_segments"] = args.segment_weight.has_value() ? args.segment_weight->size(0) : int64_t{0};
    ctx->saved_data["scale"] = args.scale;
    ctx->saved_data["position_offset"] = args.position_offset;
    ctx->saved_data["seq_len"] = args.seq_len;
    ctx->saved_data["check_bounds"] = args.check_bounds;
    ctx->saved_data["vocab_start"] = args.vocab_start;
    ctx->saved_data["vocab_size"] = args.vocab_size;
    ctx->saved_data["chunk_start"] = args.chunk_start;
    ctx->saved_data["chunk_end"] = args.chunk_end;
    const auto or_undefined = [](const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); };
    ctx->save_for_backward(
        {args.input_ids, or_undefined(args.position_ids), or_undefined(args.token_type_ids), or_undefined(args.cu_seqlens)});
    return embedfast::forward(args);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& saved = ctx->saved_data;
    const int64_t num_positions = saved.at("num_positions").toInt(), num_segments = saved.at("num_segments").toInt();
    const bool wants_weight = ctx->needs_input_grad(0);
    const bool wants_positions = num_positions > 0 && ctx->needs_input_grad(1);
    const bool wants_segments = num_segments > 0 && ctx->needs_input_grad(num_positions > 0 ? 2 : 1);
    const bool sparse = saved.at("sparse").toBool();
    const int64_t padding_idx = saved.at("padding_idx").toInt(), num_embeddings = saved.at("num_embeddings").toInt();
    const double scale = saved.at("scale").toDouble();
    const variable_list index_tensors = ctx->get_saved_variables();
    const at::Tensor& input_ids = index_tensors[0];
    const at::Tensor grad_out = grads[0].contiguous();
    const int64_t vocab_start = saved.at("vocab_start").toInt(), vocab_size = saved.at("vocab_size").toInt();
    // sparse with padding or of a shard: the rows kept are only known from the ids, so they are gathered here instead
    const bool gather_rows = wants_weight && sparse && (padding_idx >= 0 || vocab_size > 0);
    const TokenGrad token_grad = !wants_weight || gather_rows ? TokenGrad::kNone : sparse ? TokenGrad::kSparse : TokenGrad::kDense;
    const auto optional_tensor = [&](size_t i) {
      return index_tensors[i].defined() ? std::optional<at::Tensor>(index_tensors[i]) : std::optional<at::Tensor>();
    };
    BackwardArgs args;
    args.grad_out = grad_out;
    args.input_ids = input_ids;
    args.num_embeddings = num_embeddings;
    args.position_ids = optional_tensor(1);
    args.token_type_ids = optional_tensor(2);
    args.cu_seqlens = optional_tensor(3);
    args.token_grad = token_grad;
    args.padding_idx = padding_idx;
    args.scale = scale;
    args.num_positions = wants_positions ? num_positions : 0;
    args.num_segments = wants_segments ? num_segments : 0;
    args.position_offset = saved.at("position_offset").toInt();
    args.seq_len = saved.at("seq_len").toInt();
    args.check_bounds = saved.at("check_bounds").toBool();
    args.vocab_start = vocab_start;
    args.vocab_size = vocab_size;
    args.chunk_start = saved.at("chunk_start").toInt();
    args.chunk_end = saved.at("chunk_end").toInt();
    const torch::jit::Stack result = call("embedfast::backward_extension", args.pack(), c10::GradMode::is_enabled());

    at::Tensor weight_grad;
    if (gather_rows) {
      const at::Tensor rows = vocab_start == 0 ? input_ids.to(at::kLong) : input_ids.to(at::kLong) - vocab_start;
      at::Tensor keep = input_ids.ne(padding_idx);
      if (vocab_size > 0) keep.logical_and_(rows.ge(0)).logical_and_(rows.lt(num_embeddings));  // in the shard
      weight_grad = sparse_gradient(rows.index({keep}).unsqueeze(0), grad_out.index({keep}).mul_(scale), num_embeddings);
    } else if (token_grad == TokenGrad::kSparse) {  // indices copied: the gradient must not change when ids are reused
      weight_grad = sparse_gradient(input_ids.to(at::kLong, false, /*copy=*/true).unsqueeze(0), result[0].toTensor(),
                                    num_embeddings);
    } else if (token_grad == TokenGrad::kDense) {
      weight_grad = result[0].toTensor();
    }
    return {weight_grad, wants_positions ? result[1].toTensor() : at::Tensor(),
            wants_segments ? result[2].toTensor() : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor fused_forward(const ForwardArgs& args, int64_t padding_idx, bool sparse) {
  const auto needs_grad = [](const std::optional<at::Tensor>& table) { return table.has_value() && table->requires_grad(); };
  if (!c10::GradMode::is_enabled() || !(args.weight.requires_grad() || needs_grad(args.position_weight) ||
                                        needs_grad(args.segment_weight))) {
    return forward(args);
  }
  return FusedForward::apply(args.weight, args.position_weight, args.segment_weight, args, padding_idx, sparse);
}

}  // namespace embedfast
