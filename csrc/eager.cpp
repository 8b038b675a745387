// The extension backend's eager entry, embedfast._C.EagerEmbedding: a call shaped for the forward operator in C++
// (functional.embed's work), the forward operator and, when a table needs a gradient, a C++ autograd node whose
// backward calls the backward operator. It computes what ops._backward computes for the other backends (the
// sparse or dense token gradient, padding rows gathered away, the position and segment gradients), without Python
// on the path: a call costs microseconds, not tens of them. With a norm or dropout the call is the norm forward
// operator's and its node calls the norm backward operator (what ops._norm_backward does). functional.embed
// sends every other derivative mode (forward mode, torch.func, torch.compile) through ops.call_forward's and
// ops.call_norm_forward's Python Functions.
#include "eager.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <string>
#include <type_traits>
#include <vector>

namespace embedfast {
namespace {

namespace py = pybind11;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The extension's operators, looked up once (ops.define_ops declares them together).
struct Operators {
  c10::OperatorHandle forward, backward, norm_forward, norm_backward;
};

const Operators& operators() {
  const auto find = [](const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); };
  static const Operators ops{find("embedfast::forward_extension"), find("embedfast::backward_extension"),
                             find("embedfast::norm_forward_extension"), find("embedfast::norm_backward_extension")};
  return ops;
}

// Calls an operator by its stack; below autograd unless a graph of the call is wanted (double backward goes
// through the backward operator's registered derivative).
torch::jit::Stack call(const c10::OperatorHandle& op, torch::jit::Stack stack, bool record_autograd) {
  if (record_autograd) {
    op.callBoxed(stack);
  } else {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.callBoxed(stack);
  }
  return stack;
}

// An operator's (num_tokens, D) result as (*leading, D): a fresh tensor that nobody else holds, so the reshape is
// made below autograd (no view to track, no node of its own).
at::Tensor shaped(const at::Tensor& out, c10::IntArrayRef leading) {
  if (leading.size() == 1) return out;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  std::vector<int64_t> sizes(leading.begin(), leading.end());
  sizes.push_back(out.size(1));
  return out.view(sizes);
}

at::Tensor sparse_gradient(const at::Tensor& indices, const at::Tensor& values, int64_t num_embeddings) {
  return at::_sparse_coo_tensor_unsafe(indices, values, {num_embeddings, values.size(1)});
}

std::optional<at::Tensor> optional(const SavedVariable& saved) {
  at::Tensor tensor = saved.unpack();
  return tensor.defined() ? std::optional<at::Tensor>(std::move(tensor)) : std::nullopt;
}

SavedVariable saved(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? SavedVariable(*tensor, /*is_output=*/false) : SavedVariable();
}

// An argument's value into a node's constants; tensors are saved as SavedVariables instead.
template <typename T>
void copy_constant(T& to, const T& from) {
  to = from;
}
inline void copy_constant(at::Tensor&, const at::Tensor&) {}
inline void copy_constant(std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {}

// What the tables' gradients of a call need (its index tensors and constants), and how they are made from the
// gradient of the sum: what ops._backward computes for the other backends (the sparse or dense token gradient,
// padding rows gathered away, the position and segment gradients).
struct TableGradients {
  SavedVariable input_ids, position_ids, token_type_ids, cu_seqlens;  // undefined where not given
  bool sparse = true;
  // the backward's arguments but the tensors and the token gradient; num_positions and num_segments are the
  // tables' rows (0: no table)
  BackwardArgs constants;

  TableGradients() = default;
  TableGradients(const ForwardArgs& args, int64_t padding_idx, bool sparse_gradient)
      : input_ids(args.input_ids, /*is_output=*/false),
        position_ids(saved(args.position_ids)),
        token_type_ids(saved(args.token_type_ids)),
        cu_seqlens(saved(args.cu_seqlens)),
        sparse(sparse_gradient),
        constants(backward_of(args, at::Tensor())) {
    constants.padding_idx = padding_idx;
    constants.input_ids = at::Tensor();  // the index tensors are kept as the SavedVariables above
    constants.position_ids = constants.token_type_ids = constants.cu_seqlens = std::nullopt;
  }

  void reset() {
    for (SavedVariable* tensor : {&input_ids, &position_ids, &token_type_ids, &cu_seqlens}) tensor->reset_data();
  }

  // The token gradient a backward operator is asked for, and whether its kept rows are gathered instead: sparse with
  // padding or of a shard, the rows kept are only known from the ids.
  std::pair<TokenGrad, bool> token_request(bool wants_weight) const {
    const bool gather_rows = wants_weight && sparse && (constants.padding_idx >= 0 || constants.vocab_size > 0);
    if (!wants_weight || gather_rows) return {TokenGrad::kNone, gather_rows};
    return {sparse ? TokenGrad::kSparse : TokenGrad::kDense, false};
  }

  // {weight, position_weight, segment_weight} gradients from a backward operator's first three results, undefined
  // where not wanted; gather_rows: the token gradient is the kept rows of `rows` (num_tokens, D), times gather_scale.
  variable_list finish(const torch::jit::Stack& result, const at::Tensor& ids, TokenGrad token_grad, bool gather_rows,
                       const at::Tensor& rows, double gather_scale, bool wants_positions, bool wants_segments) const {
    const int64_t num_embeddings = constants.num_embeddings;
    at::Tensor weight_grad;
    if (gather_rows) {
      const int64_t vocab_start = constants.vocab_start;
      const at::Tensor row_ids = vocab_start == 0 ? ids.to(at::kLong) : ids.to(at::kLong) - vocab_start;
      at::Tensor keep = ids.ne(constants.padding_idx);
      if (constants.vocab_size > 0) keep.logical_and_(row_ids.ge(0)).logical_and_(row_ids.lt(num_embeddings));  // in the shard
      at::Tensor values = rows.index({keep});
      if (gather_scale != 1.0) values.mul_(gather_scale);
      weight_grad = sparse_gradient(row_ids.index({keep}).unsqueeze(0), values, num_embeddings);
    } else if (token_grad == TokenGrad::kSparse) {  // indices copied: the gradient must not change when ids are reused
      weight_grad =
          sparse_gradient(ids.to(at::kLong, false, /*copy=*/true).unsqueeze(0), result[0].toTensor(), num_embeddings);
    } else if (token_grad == TokenGrad::kDense) {
      weight_grad = result[0].toTensor();
    }
    return {weight_grad, wants_positions && constants.num_positions > 0 ? result[1].toTensor() : at::Tensor(),
            wants_segments && constants.num_segments > 0 ? result[2].toTensor() : at::Tensor()};
  }

  // {weight, position_weight, segment_weight} gradients of grad_sum (num_tokens, D), undefined where not wanted
  variable_list operator()(const at::Tensor& grad_sum, const at::Tensor& ids, bool wants_weight, bool wants_positions,
                           bool wants_segments) const {
    const auto [token_grad, gather_rows] = token_request(wants_weight);
    BackwardArgs args = constants;
    args.grad_out = grad_sum;
    args.input_ids = ids;
    args.position_ids = optional(position_ids);
    args.token_type_ids = optional(token_type_ids);
    args.cu_seqlens = optional(cu_seqlens);
    args.token_grad = token_grad;
    args.num_positions = wants_positions ? constants.num_positions : 0;
    args.num_segments = wants_segments ? constants.num_segments : 0;
    const torch::jit::Stack result = call(operators().backward, args.pack(), c10::GradMode::is_enabled());
    return finish(result, ids, token_grad, gather_rows, grad_sum, constants.scale, wants_positions, wants_segments);
  }
};

// The derivative of one call. Its edges are the tables (weight, position_weight, segment_weight); a table that was
// not given or needs no gradient has an invalid edge and gets no gradient.
struct FusedInputEmbeddingBackward : public torch::autograd::Node {
  TableGradients tables;

  std::string name() const override { return "FusedInputEmbeddingBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    tables.reset();
  }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(3);
    const at::Tensor ids = tables.input_ids.unpack();
    const at::Tensor grad_out = grads[0].reshape({ids.numel(), grads[0].size(-1)}).contiguous();
    return tables(grad_out, ids, task_should_compute_output(0), task_should_compute_output(1),
                  task_should_compute_output(2));
  }
};

// The derivative of one call with a norm or dropout: the norm's backward operator (the tables' gradients and the
// norm's parameters', in one pass). Its edges are the tables, norm_weight, norm_bias.
struct FusedNormEmbeddingBackward : public torch::autograd::Node {
  TableGradients tables;
  SavedVariable weight, position_weight, segment_weight, norm_weight, norm_bias, dropout_seed, stats;
  NormBackwardArgs constants;  // the norm backward's arguments but the tensors and the gradients asked for

  std::string name() const override { return "FusedNormEmbeddingBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    tables.reset();
    for (SavedVariable* tensor : {&weight, &position_weight, &segment_weight, &norm_weight, &norm_bias, &dropout_seed, &stats}) {
      tensor->reset_data();
    }
  }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(5);
    const at::Tensor ids = tables.input_ids.unpack();
    NormBackwardArgs args = constants;
    args.grad_out = grads[0].reshape({ids.numel(), grads[0].size(-1)}).contiguous();
    args.stats = stats.unpack();
    args.input_ids = ids;
    args.position_ids = optional(tables.position_ids);
    args.token_type_ids = optional(tables.token_type_ids);
    args.cu_seqlens = optional(tables.cu_seqlens);
    args.weight = weight.unpack();
    args.position_weight = optional(position_weight);
    args.segment_weight = optional(segment_weight);
    args.norm_weight = optional(norm_weight);
    args.norm_bias = optional(norm_bias);
    args.dropout_seed = optional(dropout_seed);
    const bool wants_norm_weight = task_should_compute_output(3), wants_norm_bias = task_should_compute_output(4);
    const bool wants_positions = task_should_compute_output(1), wants_segments = task_should_compute_output(2);
    auto [token_grad, gather_rows] = tables.token_request(task_should_compute_output(0));
    args.norm_grads = wants_norm_weight || wants_norm_bias;
    args.token_grad = gather_rows ? TokenGrad::kSparse : token_grad;  // the kept rows are gathered from the values
    args.padding_idx = tables.constants.padding_idx;
    args.position_grad = wants_positions;
    args.segment_grad = wants_segments;
    // with create_graph through the operator's autograd kernel, which refuses a double backward
    const torch::jit::Stack result = call(operators().norm_backward, args.pack(), c10::GradMode::is_enabled());
    variable_list gradients =
        tables.finish(result, ids, token_grad, gather_rows, result[0].toTensor(), 1.0, wants_positions, wants_segments);
    gradients.push_back(wants_norm_weight ? result[3].toTensor() : at::Tensor());
    gradients.push_back(wants_norm_bias ? result[4].toTensor() : at::Tensor());
    return gradients;
  }
};

// torch 2.14 holds autograd nodes by c10::intrusive_ptr, earlier releases by std::shared_ptr with a deleter that
// frees long graphs without deep recursion
template <typename T>
void delete_node(T* node) {
  deleteNode(node);  // found by argument-dependent lookup in torch::autograd, where releases before 2.14 declare it
}

template <typename T>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>();
  } else {
    return std::shared_ptr<T>(new T(), delete_node<T>);
  }
}

// The forward operator's result as (*leading, D); differentiable (the node above) when grad mode is on and a
// table needs a gradient.
at::Tensor fused_forward(const ForwardArgs& args, int64_t padding_idx, bool sparse, c10::IntArrayRef leading) {
  const at::Tensor out = shaped(call(operators().forward, args.pack(), /*record_autograd=*/false)[0].toTensor(), leading);
  if (!torch::autograd::compute_requires_grad(args.weight, args.position_weight, args.segment_weight)) return out;
  auto node = make_node<FusedInputEmbeddingBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(args.weight, args.position_weight, args.segment_weight));
  node->tables = TableGradients(args, padding_idx, sparse);
  torch::autograd::set_history(out, node);
  return out;
}

// The norm forward operator's output as (*leading, D); differentiable (FusedNormEmbeddingBackward) when grad mode
// is on and a table, norm_weight or norm_bias needs a gradient.
at::Tensor fused_norm_forward(const NormForwardArgs& args, int64_t padding_idx, bool sparse, c10::IntArrayRef leading) {
  const torch::jit::Stack result = call(operators().norm_forward, args.pack(), /*record_autograd=*/false);
  const at::Tensor out = shaped(result[0].toTensor(), leading);
  if (!torch::autograd::compute_requires_grad(args.weight, args.position_weight, args.segment_weight, args.norm_weight,
                                              args.norm_bias)) {
    return out;
  }
  auto node = make_node<FusedNormEmbeddingBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(args.weight, args.position_weight, args.segment_weight,
                                                           args.norm_weight, args.norm_bias));
  node->tables = TableGradients(forward_part(args), padding_idx, sparse);
  node->weight = SavedVariable(args.weight, /*is_output=*/false);
  node->position_weight = saved(args.position_weight);
  node->segment_weight = saved(args.segment_weight);
  node->norm_weight = saved(args.norm_weight);
  node->norm_bias = saved(args.norm_bias);
  node->dropout_seed = saved(args.dropout_seed);
  node->stats = SavedVariable(result[1].toTensor(), /*is_output=*/false);
#define EMBEDFAST_COPY(type, name) copy_constant(node->constants.name, args.name);
  EMBEDFAST_NORM_FORWARD_ARGUMENTS(EMBEDFAST_COPY)
#undef EMBEDFAST_COPY
  torch::autograd::set_history(out, node);
  return out;
}

// --- the call's shaping: functional.embed's checks and messages, in the same order (tests/test_eager_entry.py
// compares the two paths' exceptions) ---

std::string python_shape(c10::IntArrayRef sizes) {  // tuple(shape)
  std::string text = "(";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + (sizes.size() == 1 ? ",)" : ")");
}

std::string python_dtype(const at::Tensor& t) { return "torch." + std::string(c10::getDtypeNames(t.scalar_type()).first); }

std::string type_name(py::handle object) { return py::str(py::type::handle_of(object).attr("__name__")); }

std::string python_repr(py::handle object) { return py::repr(object); }

// validation.check_index_tensor
const at::Tensor& index_tensor(const char* name, py::handle object) {
  TORCH_CHECK_TYPE(THPVariable_Check(object.ptr()), name, " must be a torch.Tensor, got ", type_name(object));
  const at::Tensor& ids = THPVariable_Unpack(object.ptr());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, name,
                   " must be int32 or int64, got dtype ", python_dtype(ids));
  return ids;
}

// validation.check_same_device
void check_same_device(const char* name, const at::Tensor& tensor, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(tensor.device() == weight.device(), name, " is on ", tensor.device(), ", but weight is on ",
                    weight.device());
}

// validation.check_nonnegative_int (made for every call: embed skips it for zeros only to save Python time)
int64_t nonnegative_int(const char* name, py::handle object) {
  PyObject* value = object.ptr();
  int overflow = 0;  // 1: above int64's range, -1: below it
  const int64_t number = PyLong_Check(value) && !PyBool_Check(value) ? PyLong_AsLongLongAndOverflow(value, &overflow) : -1;
  TORCH_CHECK_VALUE(overflow > 0 || number >= 0, name, " must be an int >= 0, got ", python_repr(object));
  TORCH_CHECK_VALUE(overflow == 0, name, " must fit in int64, got ", python_repr(object));
  return number;
}

// ids as the operator takes them: 1-D, contiguous. A contiguous tensor's 1-D alias is made below autograd (ids have
// no gradient, so the alias needs no view tracking, which costs more than the rest of a decode step's shaping) and
// shares ids' version counter: the node's saved ids still see the caller change them in place.
at::Tensor flat(const at::Tensor& ids) {
  if (ids.dim() == 1 && ids.is_contiguous()) return ids;
  if (!ids.is_contiguous()) return ids.reshape(-1).contiguous();
  at::Tensor alias;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    alias = ids.view({ids.numel()});
  }
  alias.unsafeGetTensorImpl()->set_version_counter(ids.unsafeGetTensorImpl()->version_counter());
  return alias;
}

// functional._flat_indices: broadcast to `shape`, one id per token
at::Tensor flat_indices(const char* name, py::handle object, c10::IntArrayRef shape, const at::Tensor& weight) {
  const at::Tensor& ids = index_tensor(name, object);
  check_same_device(name, ids, weight);
  bool fits = ids.dim() <= static_cast<int64_t>(shape.size());  // validation.check_broadcastable
  for (int64_t i = 1; fits && i <= ids.dim(); ++i) {
    const int64_t size = ids.size(-i), full = shape[shape.size() - i];
    fits = size == 1 || size == full;
  }
  TORCH_CHECK_VALUE(fits, name, " has shape ", python_shape(ids.sizes()), ", which does not broadcast to input_ids' shape ",
                    python_shape(shape));
  return flat(ids.sizes() == shape ? ids : ids.expand(shape));
}

// functional._boundaries
at::Tensor boundaries(py::handle object, int64_t past_length, const at::Tensor& weight) {
  const at::Tensor& cu_seqlens = index_tensor("cu_seqlens", object);
  check_same_device("cu_seqlens", cu_seqlens, weight);
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1, "cu_seqlens must be 1-D ([0, l1, l1 + l2, ..., N]), got shape ",
                    python_shape(cu_seqlens.sizes()));
  TORCH_CHECK_VALUE(past_length == 0, "cu_seqlens was given with past_length=", past_length,
                    ": packed documents start at position_offset");
  return cu_seqlens.contiguous();
}

// functional._common_index_dtype: int64 if any index tensor is, else int32
void common_index_dtype(ForwardArgs& args) {
  const auto is_long = [](const std::optional<at::Tensor>& ids) { return ids.has_value() && ids->scalar_type() == at::kLong; };
  const at::ScalarType dtype = args.input_ids.scalar_type() == at::kLong || is_long(args.position_ids) ||
                                       is_long(args.token_type_ids) || is_long(args.cu_seqlens)
                                   ? at::kLong
                                   : at::kInt;
  const auto convert = [dtype](at::Tensor& ids) {
    if (ids.scalar_type() != dtype) ids = ids.to(dtype);
  };
  convert(args.input_ids);
  for (std::optional<at::Tensor>* ids : {&args.position_ids, &args.token_type_ids, &args.cu_seqlens}) {
    if (ids->has_value()) convert(**ids);
  }
}

}  // namespace

EagerEmbedding::EagerEmbedding(int64_t position_mode, int64_t max_positions, double scale, double sinusoid_base,
                               int64_t padding_idx, bool sparse, bool check_bounds, int64_t vocab_start,
                               int64_t vocab_size)
    : padding_idx_(padding_idx), sparse_(sparse) {
  constants_.position_mode = static_cast<PositionMode>(position_mode);  // checked by the operator
  constants_.max_positions = max_positions;
  constants_.scale = scale;
  constants_.sinusoid_base = sinusoid_base;
  constants_.check_bounds = check_bounds;
  constants_.vocab_start = vocab_start;
  constants_.vocab_size = vocab_size;
}

at::Tensor EagerEmbedding::operator()(py::handle input_ids, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& position_weight,
                                      const std::optional<at::Tensor>& segment_weight, py::handle token_type_ids,
                                      py::handle position_ids, py::handle past_length, py::handle cu_seqlens,
                                      py::handle position_offset, int64_t chunk_start, int64_t chunk_end,
                                      std::optional<int64_t> norm_mode, double norm_eps, double dropout_p,
                                      const std::optional<at::Tensor>& norm_weight,
                                      const std::optional<at::Tensor>& norm_bias) const {
  const at::Tensor& ids = index_tensor("input_ids", input_ids);
  check_same_device("input_ids", ids, weight);
  const int64_t past = nonnegative_int("past_length", past_length);
  const int64_t offset = nonnegative_int("position_offset", position_offset);
  const c10::IntArrayRef shape = ids.sizes();
  ForwardArgs args = constants_;
  if (!position_ids.is_none()) {
    TORCH_CHECK_VALUE(constants_.position_mode != PositionMode::kNone, "position_ids were given, but position='none'");
    TORCH_CHECK_VALUE(offset == 0 && cu_seqlens.is_none(),
                      "position_ids were given with position_offset or cu_seqlens: position_ids are the positions");
    args.position_ids = flat_indices("position_ids", position_ids, shape, weight);
  }
  if (!cu_seqlens.is_none()) args.cu_seqlens = boundaries(cu_seqlens, past, weight);
  if (!token_type_ids.is_none()) {
    TORCH_CHECK_VALUE(segment_weight.has_value(),
                      "token_type_ids were given, but there is no segment table (num_segments=0)");
    args.token_type_ids = flat_indices("token_type_ids", token_type_ids, shape, weight);
  }
  args.input_ids = flat(ids);
  if (args.position_ids.has_value() || args.token_type_ids.has_value() || args.cu_seqlens.has_value()) {
    common_index_dtype(args);
  }
  args.weight = weight;
  args.position_weight = position_weight;
  args.segment_weight = segment_weight;
  args.position_offset = past + offset;
  args.seq_len = shape.empty() ? 1 : shape.back();
  args.chunk_start = chunk_start;
  args.chunk_end = chunk_end;
  if (!norm_mode.has_value()) return fused_forward(args, padding_idx_, sparse_, shape);
  NormForwardArgs norm_args;
#define EMBEDFAST_COPY(type, name) norm_args.name = args.name;
  EMBEDFAST_FORWARD_ARGUMENTS(EMBEDFAST_COPY)
#undef EMBEDFAST_COPY
  norm_args.norm_weight = norm_weight;
  norm_args.norm_bias = norm_bias;
  norm_args.norm_mode = static_cast<NormMode>(*norm_mode);  // checked by the operator
  norm_args.norm_eps = norm_eps;
  norm_args.dropout_p = dropout_p;
  if (dropout_p > 0) {  // dropout.draw_seed: the same draw from the device's default generator
    norm_args.dropout_seed = at::randint(0, kDropoutSeedBound, {1}, weight.options().dtype(at::kLong));
  }
  return fused_norm_forward(norm_args, padding_idx_, sparse_, shape);
}

}  // namespace embedfast
