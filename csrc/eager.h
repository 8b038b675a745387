// The extension backend's eager entry (eager.cpp), bound as embedfast._C.fused_forward in module.cpp.
#pragma once

#include <ATen/ATen.h>

#include "embedfast/spec.h"

namespace embedfast {

// The forward operator's result; differentiable (a C++ autograd node) when grad mode is on and a table needs a
// gradient. `padding_idx`, `sparse`: spec.GradientOptions.
at::Tensor fused_forward(const ForwardArgs& args, int64_t padding_idx, bool sparse);

}  // namespace embedfast
