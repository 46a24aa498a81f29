"""The compiled ops ``torch.ops.meprop.*`` (``csrc/``), with their fake kernels from :mod:`meprop.opdefs`.

Importing this module loads the extension; when that fails, :data:`EXTENSION_ERROR` holds the reason and
the ops are absent. Each op has the signature and semantics of the function of the same name in
:mod:`meprop.reference`; the dispatcher runs the kernel of the tensors' device (``csrc/cpu``, ``csrc/cuda``).
"""

from __future__ import annotations

import torch

from .opdefs import OP_NAMES, register_fakes

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.meprop.*)

    EXTENSION_ERROR: str | None = None
except Exception as exc:  # any import failure (missing build, ABI mismatch) leaves the reference path
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["EXTENSION_ERROR", "has_kernels", "op"]


def has_kernels(device_type: str) -> bool:
    """Whether the extension is loaded and has kernels for every op on ``device_type`` ("cpu", "cuda")."""
    if EXTENSION_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"meprop::{name}", key) for name in OP_NAMES)


def op(name: str) -> torch._ops.OpOverload:
    """The compiled op ``meprop::<name>`` (its default overload)."""
    return getattr(torch.ops.meprop, name).default


if EXTENSION_ERROR is None:
    register_fakes("meprop")
