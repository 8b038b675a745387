// CPU kernel of embedfast::forward_extension.
//
// One parallel pass over tokens (forward_rows.h); each output row is written once from the token row, a position
// row and a segment row, around the caches when the output is big (row_loops.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "embedfast/checks.h"
#include "embedfast/spec.h"
#include "forward_rows.h"
#include "row_loops.h"

namespace embedfast {
namespace {

at::Tensor forward_cpu(const ForwardArgs& args) {
  check_forward_args(args, /*exact=*/true);  // on CPU the exact check is cheap: always made
  const int64_t tokens = args.input_ids.numel(), dim = args.weight.size(1);
  at::Tensor out = at::empty({tokens, dim}, args.weight.options());
  if (tokens == 0 || dim == 0) return out;
  const SideRowLayout layout(args.weight.scalar_type(), dim);
  const bool stream = stream_output(out.nbytes());
  const int64_t grain = std::max<int64_t>(1, 16384 / (dim * kTilePositions));
  AT_DISPATCH_INDEX_TYPES(args.input_ids.scalar_type(), "embedfast_forward_cpu", [&] {
    EMBEDFAST_DISPATCH_TABLE_TYPES(args.weight.scalar_type(), "embedfast_forward_cpu", [&] {
      using acc_t = math_t<scalar_t>;
      scalar_t* output = out.data_ptr<scalar_t>();
      const acc_t scale = static_cast<acc_t>(args.scale);
      forward_rows::walk_rows<scalar_t, index_t>(
          args, layout, grain,
          [&](int64_t, int64_t n, const scalar_t* token_row, const auto* position_row, const scalar_t* segment_row) {
            combine_rows(output + n * dim, token_row, position_row, segment_row, scale, dim, stream);
          },
          [&] {
            if (stream) end_streaming();
          });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedfast, CPU, m) {
  m.impl("forward_extension", torch::CppFunction::makeFromBoxedFunction<&boxed<ForwardArgs, &forward_cpu>>());
}

}  // namespace embedfast
