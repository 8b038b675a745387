// The operators' arguments, position modes and dtype policy for C++: the mirror of embedfast/spec.py, which
// defines them (tests/test_spec.py fails when the two differ).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cctype>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

namespace embedfast {

// X(name, value)
#define EMBEDFAST_POSITION_MODES(X) \
  X(kNone, 0)                       \
  X(kLearned, 1)                    \
  X(kInterleaved, 2)                \
  X(kConcat, 3)

#define EMBEDFAST_TOKEN_GRADS(X) \
  X(kNone, 0)                    \
  X(kSparse, 1)                  \
  X(kDense, 2)

// what the norm operators apply to each token's sum before the dropout
#define EMBEDFAST_NORM_MODES(X) \
  X(kNone, 0)                   \
  X(kLayernorm, 1)              \
  X(kRmsnorm, 2)

// the CPU kernels' instruction-set paths, lowest first (csrc/cpu/cpu_machine.h)
#define EMBEDFAST_CPU_ISAS(X) \
  X(kPortable, 0)             \
  X(kAvx2, 1)                 \
  X(kAvx512, 2)               \
  X(kAvx512Bf16, 3)

#define EMBEDFAST_ENUMERATOR(name, value) name = value,
enum class PositionMode : int64_t { EMBEDFAST_POSITION_MODES(EMBEDFAST_ENUMERATOR) };
enum class TokenGrad : int64_t { EMBEDFAST_TOKEN_GRADS(EMBEDFAST_ENUMERATOR) };
enum class CpuIsa : int64_t { EMBEDFAST_CPU_ISAS(EMBEDFAST_ENUMERATOR) };
enum class NormMode : int64_t { EMBEDFAST_NORM_MODES(EMBEDFAST_ENUMERATOR) };
#undef EMBEDFAST_ENUMERATOR

// The table dtypes (spec.TABLE_DTYPES): float32, float64, float16, bfloat16.
#define EMBEDFAST_DISPATCH_TABLE_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// spec.compute_dtype: float64 tables compute in float64, every other table dtype in float32.
template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType compute_dtype(at::ScalarType storage) { return storage == at::kDouble ? at::kDouble : at::kFloat; }

// The operators' arguments in schema order, X(C++ type, name), as spec.py declares them.
#define EMBEDFAST_FORWARD_ARGUMENTS(X)         \
  X(at::Tensor, input_ids)                     \
  X(at::Tensor, weight)                        \
  X(std::optional<at::Tensor>, position_ids)   \
  X(std::optional<at::Tensor>, position_weight) \
  X(std::optional<at::Tensor>, token_type_ids) \
  X(std::optional<at::Tensor>, segment_weight) \
  X(std::optional<at::Tensor>, cu_seqlens)     \
  X(double, scale)                             \
  X(PositionMode, position_mode)               \
  X(double, sinusoid_base)                     \
  X(int64_t, max_positions)                    \
  X(int64_t, position_offset)                  \
  X(int64_t, seq_len)                          \
  X(bool, check_bounds)                        \
  X(int64_t, vocab_start)                      \
  X(int64_t, vocab_size)                       \
  X(int64_t, chunk_start)                      \
  X(int64_t, chunk_end)

#define EMBEDFAST_BACKWARD_ARGUMENTS(X)        \
  X(at::Tensor, grad_out)                      \
  X(at::Tensor, input_ids)                     \
  X(int64_t, num_embeddings)                   \
  X(std::optional<at::Tensor>, position_ids)   \
  X(std::optional<at::Tensor>, token_type_ids) \
  X(std::optional<at::Tensor>, cu_seqlens)     \
  X(TokenGrad, token_grad)                     \
  X(int64_t, padding_idx)                      \
  X(double, scale)                             \
  X(int64_t, num_positions)                    \
  X(int64_t, num_segments)                     \
  X(int64_t, position_offset)                  \
  X(int64_t, seq_len)                          \
  X(bool, check_bounds)                        \
  X(int64_t, vocab_start)                      \
  X(int64_t, vocab_size)                       \
  X(int64_t, chunk_start)                      \
  X(int64_t, chunk_end)

// The norm operators' epilogue (spec._NORM): dropout(norm(sum)), after the forward's arguments.
#define EMBEDFAST_NORM_ARGUMENTS(X)         \
  X(std::optional<at::Tensor>, norm_weight) \
  X(std::optional<at::Tensor>, norm_bias)   \
  X(NormMode, norm_mode)                    \
  X(double, norm_eps)                       \
  X(double, dropout_p)                      \
  X(std::optional<at::Tensor>, dropout_seed)

#define EMBEDFAST_NORM_FORWARD_ARGUMENTS(X) \
  EMBEDFAST_FORWARD_ARGUMENTS(X)            \
  EMBEDFAST_NORM_ARGUMENTS(X)

// spec._NORM_BACKWARD: grad_out and stats, the norm forward's arguments, which gradients
#define EMBEDFAST_NORM_BACKWARD_ARGUMENTS(X) \
  X(at::Tensor, grad_out)                    \
  X(at::Tensor, stats)                       \
  EMBEDFAST_NORM_FORWARD_ARGUMENTS(X)        \
  X(bool, norm_grads)                        \
  X(TokenGrad, token_grad)                   \
  X(int64_t, padding_idx)                    \
  X(bool, position_grad)                     \
  X(bool, segment_grad)

// spec.DROPOUT_SEED_BOUND: dropout seeds are drawn from [0, kDropoutSeedBound)
inline constexpr int64_t kDropoutSeedBound = int64_t{1} << 62;

// What only the derivative needs (spec.GradientOptions): the eager entry (eager.cpp) is built with it.
#define EMBEDFAST_GRADIENT_ARGUMENTS(X) \
  X(int64_t, padding_idx)               \
  X(bool, sparse)

namespace detail {

template <typename T>
T from_ivalue(const c10::IValue& value, const char* name);

template <>
inline at::Tensor from_ivalue<at::Tensor>(const c10::IValue& value, const char*) { return value.toTensor(); }

template <>
inline std::optional<at::Tensor> from_ivalue<std::optional<at::Tensor>>(const c10::IValue& value, const char*) {
  return value.isNone() ? std::nullopt : std::optional<at::Tensor>(value.toTensor());
}

template <>
inline double from_ivalue<double>(const c10::IValue& value, const char*) { return value.toDouble(); }

template <>
inline int64_t from_ivalue<int64_t>(const c10::IValue& value, const char*) { return value.toInt(); }

template <>
inline bool from_ivalue<bool>(const c10::IValue& value, const char*) { return value.toBool(); }

// An enum's values and names, "kNone" for spec.py's NONE.
struct Choice {
  int64_t value;
  const char* name;
};
#define EMBEDFAST_CHOICE(name, value) Choice{value, #name},
inline constexpr Choice kPositionModes[] = {EMBEDFAST_POSITION_MODES(EMBEDFAST_CHOICE)};
inline constexpr Choice kTokenGrads[] = {EMBEDFAST_TOKEN_GRADS(EMBEDFAST_CHOICE)};
inline constexpr Choice kCpuIsas[] = {EMBEDFAST_CPU_ISAS(EMBEDFAST_CHOICE)};
inline constexpr Choice kNormModes[] = {EMBEDFAST_NORM_MODES(EMBEDFAST_CHOICE)};
#undef EMBEDFAST_CHOICE

// spec.py's lower-case name of a choice: "learned" for kLearned
inline std::string choice_name(const Choice& choice) {
  std::string name = std::string(choice.name).substr(1);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

// "0 (none), 1 (learned), 2 (interleaved) or 3 (concat)", as op_checks.py words it
template <size_t kCount>
std::string describe(const Choice (&choices)[kCount]) {
  std::string text;
  for (size_t i = 0; i < kCount; ++i) {
    text += (i == 0 ? "" : i + 1 == kCount ? " or " : ", ") + std::to_string(choices[i].value) + " (" +
            choice_name(choices[i]) + ")";
  }
  return text;
}

template <typename Enum, size_t kCount>
Enum enum_from(const c10::IValue& value, const Choice (&choices)[kCount], const char* name) {
  const int64_t code = value.toInt();
  bool known = false;
  for (const Choice& choice : choices) known = known || choice.value == code;
  TORCH_CHECK_VALUE(known, name, " must be ", describe(choices), ", got ", code);
  return static_cast<Enum>(code);
}

template <>
inline PositionMode from_ivalue<PositionMode>(const c10::IValue& value, const char* name) {
  return enum_from<PositionMode>(value, kPositionModes, name);
}

template <>
inline TokenGrad from_ivalue<TokenGrad>(const c10::IValue& value, const char* name) {
  return enum_from<TokenGrad>(value, kTokenGrads, name);
}

template <>
inline NormMode from_ivalue<NormMode>(const c10::IValue& value, const char* name) {
  return enum_from<NormMode>(value, kNormModes, name);
}

// Once per operator: the schema's argument names are the ones this header lists, in its order.
template <size_t kCount>
void check_names(const c10::OperatorHandle& op, const char* const (&names)[kCount]) {
  const auto& arguments = op.schema().arguments();
  bool same = arguments.size() == kCount;
  for (size_t i = 0; same && i < kCount; ++i) same = arguments[i].name() == names[i];
  TORCH_CHECK(same, "embedfast: the schema of ", op.schema().name(), " (embedfast/spec.py) and the arguments in "
              "csrc/include/embedfast/spec.h differ: rebuild the extension from the same checkout");
}

inline c10::IValue to_ivalue(const at::Tensor& value) { return value; }
inline c10::IValue to_ivalue(const std::optional<at::Tensor>& value) { return value; }
inline c10::IValue to_ivalue(double value) { return value; }
inline c10::IValue to_ivalue(int64_t value) { return value; }
inline c10::IValue to_ivalue(bool value) { return value; }
inline c10::IValue to_ivalue(PositionMode value) { return static_cast<int64_t>(value); }
inline c10::IValue to_ivalue(TokenGrad value) { return static_cast<int64_t>(value); }
inline c10::IValue to_ivalue(NormMode value) { return static_cast<int64_t>(value); }

inline void push(torch::jit::Stack& stack, at::Tensor result) { torch::jit::push(stack, std::move(result)); }

template <typename... Tensors>
void push(torch::jit::Stack& stack, std::tuple<Tensors...> result) {
  std::apply([&](auto&... tensors) { torch::jit::push(stack, std::move(tensors)...); }, result);
}

}  // namespace detail

#define EMBEDFAST_FIELD(type, name) type name;
#define EMBEDFAST_NAME(type, name) #name,
#define EMBEDFAST_UNPACK(type, name) args.name = detail::from_ivalue<type>(*(value++), #name);
#define EMBEDFAST_PACK(type, name) stack.push_back(detail::to_ivalue(name));
#define EMBEDFAST_ARGUMENTS_STRUCT(Struct, LIST)                                      \
  struct Struct {                                                                     \
    LIST(EMBEDFAST_FIELD)                                                             \
    static constexpr const char* kNames[] = {LIST(EMBEDFAST_NAME)};                   \
    static constexpr size_t kCount = sizeof(kNames) / sizeof(kNames[0]);              \
    static Struct unpack(const torch::jit::Stack& stack) {                            \
      Struct args;                                                                    \
      auto value = stack.end() - kCount;                                              \
      LIST(EMBEDFAST_UNPACK)                                                          \
      return args;                                                                    \
    }                                                                                 \
    /* the arguments as an operator's stack, in schema order */                       \
    torch::jit::Stack pack() const {                                                  \
      torch::jit::Stack stack;                                                        \
      stack.reserve(kCount);                                                          \
      LIST(EMBEDFAST_PACK)                                                            \
      return stack;                                                                   \
    }                                                                                 \
  };

EMBEDFAST_ARGUMENTS_STRUCT(ForwardArgs, EMBEDFAST_FORWARD_ARGUMENTS)
EMBEDFAST_ARGUMENTS_STRUCT(BackwardArgs, EMBEDFAST_BACKWARD_ARGUMENTS)
EMBEDFAST_ARGUMENTS_STRUCT(NormForwardArgs, EMBEDFAST_NORM_FORWARD_ARGUMENTS)
EMBEDFAST_ARGUMENTS_STRUCT(NormBackwardArgs, EMBEDFAST_NORM_BACKWARD_ARGUMENTS)
#undef EMBEDFAST_ARGUMENTS_STRUCT
#undef EMBEDFAST_UNPACK
#undef EMBEDFAST_PACK
#undef EMBEDFAST_NAME
#undef EMBEDFAST_FIELD

// The forward's part of the norm operators' arguments, to run the forward's checks and row walk on.
template <typename Args>
ForwardArgs forward_part(const Args& args) {
  ForwardArgs forward;
#define EMBEDFAST_COPY(type, name) forward.name = args.name;
  EMBEDFAST_FORWARD_ARGUMENTS(EMBEDFAST_COPY)
#undef EMBEDFAST_COPY
  return forward;
}

// The plain backward's arguments for a forward's (ForwardArgs, or the norm operators' arguments) and grad_out: its
// index tensors and constants, every table's rows; token_grad NONE, padding_idx -1 (spec.backward_inputs).
template <typename Args>
BackwardArgs backward_of(const Args& args, at::Tensor grad_out) {
  const auto rows = [](const std::optional<at::Tensor>& table) { return table.has_value() ? table->size(0) : 0; };
  BackwardArgs backward;
  backward.grad_out = std::move(grad_out);
  backward.num_embeddings = args.weight.size(0);
  backward.num_positions = rows(args.position_weight);
  backward.num_segments = rows(args.segment_weight);
  backward.token_grad = TokenGrad::kNone;
  backward.padding_idx = -1;
#define EMBEDFAST_COPY(name) backward.name = args.name;
  EMBEDFAST_COPY(input_ids) EMBEDFAST_COPY(position_ids) EMBEDFAST_COPY(token_type_ids) EMBEDFAST_COPY(cu_seqlens)
  EMBEDFAST_COPY(scale) EMBEDFAST_COPY(position_offset) EMBEDFAST_COPY(seq_len) EMBEDFAST_COPY(check_bounds)
  EMBEDFAST_COPY(vocab_start) EMBEDFAST_COPY(vocab_size) EMBEDFAST_COPY(chunk_start) EMBEDFAST_COPY(chunk_end)
#undef EMBEDFAST_COPY
  return backward;
}

// The plain backward's arguments for grad_sum, the gradient of a norm backward's sum: the table gradients that
// norm backward asks for (spec.table_backward_inputs).
inline BackwardArgs backward_part(const NormBackwardArgs& args, at::Tensor grad_sum) {
  BackwardArgs backward = backward_of(args, std::move(grad_sum));
  backward.token_grad = args.token_grad;
  backward.padding_idx = args.padding_idx;
  if (!args.position_grad) backward.num_positions = 0;
  if (!args.segment_grad) backward.num_segments = 0;
  return backward;
}

// A kernel `Result kernel(const Args&)` as the boxed kernel the dispatcher calls: the arguments come off the
// stack by the order this header lists, checked once against the operator's schema.
template <typename Args, auto kernel>
void boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const bool names_checked = (detail::check_names(op, Args::kNames), true);
  (void)names_checked;
  Args args = Args::unpack(*stack);
  torch::jit::drop(*stack, Args::kCount);
  detail::push(*stack, kernel(args));
}

}  // namespace embedfast
