// The Python module embedfast._C. The operator schemas are declared in embedfast/ops.py; loading this library
// registers the CPU (and CUDA) kernels of embedfast::forward_extension / backward_extension, and binds the
// extension backend's eager entry, fused_forward (eager.h): the forward's arguments in schema order, then the
// gradient options (spec.GradientOptions), positionally.
#include <torch/extension.h>

#include "eager.h"
#include "embedfast/spec.h"

namespace embedfast {
namespace {

// at the Python boundary an enum is the int of the schema
template <typename T>
struct Boundary {
  using type = T;
  static T from(T value) { return value; }
};
template <>
struct Boundary<PositionMode> {
  using type = int64_t;
  static PositionMode from(int64_t value) { return static_cast<PositionMode>(value); }  // checked by the operator
};

#define EMBEDFAST_PARAMETER(T, name) typename Boundary<T>::type name,
#define EMBEDFAST_ASSIGN(T, name) args.name = Boundary<T>::from(name);
at::Tensor fused_forward_entry(EMBEDFAST_FORWARD_ARGUMENTS(EMBEDFAST_PARAMETER) int64_t padding_idx, bool sparse) {
  ForwardArgs args;
  EMBEDFAST_FORWARD_ARGUMENTS(EMBEDFAST_ASSIGN)
  return fused_forward(args, padding_idx, sparse);
}
#undef EMBEDFAST_ASSIGN
#undef EMBEDFAST_PARAMETER

}  // namespace
}  // namespace embedfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "embedfast kernels (registered with torch.library) and the extension backend's eager entry";
  m.def("fused_forward", &embedfast::fused_forward_entry,
        "the forward operator, differentiable in reverse mode (see csrc/eager.h)");
}
