// The Python module apkernels._C. It exposes no Python functions: importing it runs the
// TORCH_LIBRARY_IMPL registrations of every kernel file (CPU and, when built, CUDA) for the op
// schemas that apkernels/_library.py defines.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C", /* name */
      "apkernels compiled kernels (registered with the torch dispatcher on import)",
      -1, /* size */
      nullptr, /* methods */
  };
  return PyModule_Create(&module_def);
}
}
