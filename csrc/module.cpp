// The Python module embedfast._C. The operator schemas are declared in embedfast/ops.py; loading this
// library registers the CPU (and CUDA) kernels of embedfast::forward_extension / backward_extension.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "embedfast kernels (registered with torch.library)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
}
