// The Python module embedfast._C. The operator schemas are declared in embedfast/ops.py; loading this library
// registers the CPU (and CUDA) kernels of embedfast::forward_extension / backward_extension, and binds the
// extension backend's eager entry, EagerEmbedding (eager.h): built from the fields of functional.Settings (by
// keyword), called with functional.embed's arguments after the backend and settings.
#include <torch/extension.h>

#include "eager.h"

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  using embedfast::EagerEmbedding;
  m.doc() = "embedfast kernels (registered with torch.library) and the extension backend's eager entry";
  py::class_<EagerEmbedding>(m, "EagerEmbedding",
                             "functional.embed for the extension backend, differentiable in reverse mode (csrc/eager.h)")
      .def(py::init<int64_t, int64_t, double, double, int64_t, bool, bool, int64_t, int64_t>(), py::arg("position_mode"),
           py::arg("max_positions"), py::arg("scale"), py::arg("sinusoid_base"), py::arg("padding_idx"),
           py::arg("sparse"), py::arg("check_bounds"), py::arg("vocab_start"), py::arg("vocab_size"))
      .def("__call__", &EagerEmbedding::operator(), py::arg("input_ids"), py::arg("weight"),
           py::arg("position_weight"), py::arg("segment_weight"), py::arg("token_type_ids"), py::arg("position_ids"),
           py::arg("past_length"), py::arg("cu_seqlens"), py::arg("position_offset"), py::arg("chunk_start") = 0,
           py::arg("chunk_end") = -1, py::arg("norm_mode") = py::none(), py::arg("norm_eps") = 1e-5,
           py::arg("dropout_p") = 0.0, py::arg("norm_weight") = py::none(), py::arg("norm_bias") = py::none());
}
