// The schemas of sparsekern's native ops, and the Python module `sparsekern._C` whose import registers them.
// sparsekern/ops.py keeps the same schemas for the fallback it registers when this extension is not built.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(sparsekern, m) {
  m.def("hinv_cholesky(Tensor hessian, float percdamp, int max_tries) -> (Tensor, Tensor)");
  m.def("hinv_cholesky_(Tensor(a!) hessian, float percdamp, int max_tries) -> Tensor");
  m.def("cholesky_update(Tensor upper, Tensor x, bool downdate) -> Tensor");
  m.def("cholesky_delete(Tensor upper, Tensor index) -> (Tensor, Tensor)");
}

// An empty module: importing it runs the static registrations above and in the op files.
static struct PyModuleDef sparsekern_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparsekern_c_module); }
