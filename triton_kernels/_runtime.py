"""How the Triton kernels are built, tuned, launched and registered with ``torch.library``.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is *defined*, so the kernel modules
(``*_kernels.py``) are not imported at package import: :func:`kernels` builds one copy of a kernel module
per value of ``TRITON_INTERPRET`` on first use. Setting ``TRITON_INTERPRET=1`` after ``import
meprop_triton`` (as a test suite may) therefore still gives interpreted kernels.
"""

import importlib.util
import os
import pathlib
from types import ModuleType

import torch
import triton

__all__ = ["interpreting", "kernels", "autotune", "launch", "library_op", "NAMESPACE"]

NAMESPACE = "meprop_triton"

_HERE = pathlib.Path(__file__).parent
_BUILT: dict[tuple[str, str | None], ModuleType] = {}

# torch >= 2.6 can trace Triton launches inside a triton_op; older torch gets a plain custom op.
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), which accepts CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels(name: str) -> ModuleType:
    """The kernel module ``<name>.py`` of this package, built under the current ``TRITON_INTERPRET``."""
    key = (name, os.environ.get("TRITON_INTERPRET"))
    module = _BUILT.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(f"{NAMESPACE}.{name}", _HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _BUILT[key] = module
    return module


def autotune(configs: list, key: list[str], interpret_config):
    """``triton.autotune`` over ``configs`` on a GPU; only ``interpret_config`` (no timing runs) in the interpreter."""
    return triton.autotune(configs=[interpret_config] if interpreting() else configs, key=key)


def launch(kernel):
    """``kernel`` made traceable by torch.compile (``wrap_triton``) where torch supports it."""
    if HAS_TRITON_OP and not interpreting():
        return torch.library.wrap_triton(kernel)
    return kernel


def library_op(name: str, fake):
    """Register the decorated launcher as the op ``meprop_triton::<name>`` and return the op.

    A ``torch.library.triton_op`` where available (torch.compile then sees the Triton kernels); otherwise a
    ``torch.library.custom_op`` with ``fake`` as its shape function.
    """
    qualname = f"{NAMESPACE}::{name}"

    def register(fn):
        if HAS_TRITON_OP:
            return torch.library.triton_op(qualname, mutates_args=())(fn)
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return register
