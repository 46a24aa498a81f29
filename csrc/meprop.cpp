// Every meprop op schema, in one TORCH_LIBRARY block. The op table is meprop/opdefs.py: setup.py writes its
// names and schemas into meprop_ops.inc as MEPROP_OP(name, "(arguments) -> results") lines, so each schema
// is written once. Device implementations live in csrc/cpu/ and csrc/cuda/ (TORCH_LIBRARY_IMPL per device);
// the semantics are those of meprop/reference.py.
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

// `import meprop._C` loads this library, whose static initialisers register the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(meprop, m) {
#define MEPROP_OP(name, signature) m.def(#name signature);
#include "meprop_ops.inc"
#undef MEPROP_OP
}

// The ops compute gradients and have no derivative of their own (meprop.functional differentiates a
// second time through the reference): backward through one raises an error that names the op.
TORCH_LIBRARY_IMPL(meprop, Autograd, m) {
#define MEPROP_OP(name, signature) m.impl(#name, torch::autograd::autogradNotImplementedFallback());
#include "meprop_ops.inc"
#undef MEPROP_OP
}
