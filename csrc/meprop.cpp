// Every meprop op schema, in one TORCH_LIBRARY block. Device implementations live in csrc/cpu/ and
// csrc/cuda/ (TORCH_LIBRARY_IMPL per device); the semantics are those of meprop/reference.py.
#include <Python.h>
#include <torch/library.h>

// `import meprop._C` loads this library, whose static initialisers register the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(meprop, m) {
  // Selection. Indices are int64, in selection order: larger |value| (or column sum) first, ties by
  // lower index, NaN above every number.
  m.def("topk_unified(Tensor dy, int k) -> Tensor");
  m.def("topk_rows(Tensor dy, int k) -> (Tensor, Tensor)");
  // Unified compacted products: dx = dy[:, idx] @ W[idx, :], dW_rows = dy[:, idx]^T @ x.
  m.def("linear_input_grad_unified(Tensor dy, Tensor weight, Tensor idx) -> Tensor");
  m.def("linear_weight_grad_unified(Tensor dy, Tensor x, Tensor idx) -> Tensor");
  // Per-example sparse products from (vals, idx) of shape (N, k).
  m.def("linear_input_grad_rows(Tensor vals, Tensor idx, Tensor weight) -> Tensor");
  m.def("linear_weight_grad_rows(Tensor vals, Tensor idx, Tensor x, int out_features, Tensor? rows) -> Tensor");
  // Dense (out_features, in) matrix with rows[i] at row idx[i] and zeros elsewhere.
  m.def("scatter_rows(Tensor rows, Tensor idx, int out_features) -> Tensor");
}
