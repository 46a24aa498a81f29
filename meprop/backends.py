"""Backend selection: which implementation of the meprop ops runs for given tensors.

A backend is a module exposing the functions of :mod:`meprop.reference` (``topk_unified``, ``topk_rows``,
``linear_input_grad_unified``, ``linear_weight_grad_unified``, ``linear_input_grad_rows``,
``linear_weight_grad_rows``, ``scatter_rows``) with the same semantics.

- ``"reference"``: pure PyTorch (:mod:`meprop.reference`); any device, always available.
- ``"cpu"``: the C++ kernels of ``csrc/cpu`` (CPU tensors).
- ``"cuda"``: the CUDA kernels of ``csrc/cuda`` (CUDA tensors; needs a CUDA build of the extension).
- ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``).
- ``None``: automatic: CPU tensors use ``"cpu"``; CUDA tensors use ``"cuda"``, else ``"triton"``; the
  reference wherever no kernel is available.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from . import ops, reference

__all__ = ["BACKENDS", "available", "get", "resolve"]

BACKENDS = ("reference", "cpu", "cuda", "triton")

# The Triton kernels' import name (the folder triton_kernels/ is installed under this name, so that it
# cannot clash with other projects' `triton_kernels` packages).
TRITON_MODULE = "meprop_triton"


def _triton_module() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(TRITON_MODULE), None
    except Exception as exc:  # triton missing, or no Triton kernels installed
        return None, f"{type(exc).__name__}: {exc}"


def _why_unavailable(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else the reason it cannot."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        if device.type != name:
            return f"backend {name!r} takes {name.upper()} tensors, got tensors on {device}"
        if ops.EXTENSION_ERROR is not None:
            return f"the meprop C++ extension failed to load ({ops.EXTENSION_ERROR})"
        if not ops.has_kernels(name):
            return f"the meprop extension was built without {name.upper()} kernels"
        return None
    if name == "triton":
        # Device first: CPU-only runs without the interpreter never import triton (whose mode is fixed when it
        # is imported, so a test suite can still set TRITON_INTERPRET=1 before the first import).
        if not (device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
            return f"backend 'triton' takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device}"
        module, error = _triton_module()
        if module is None:
            return f"the Triton kernels cannot be imported ({error})"
        if device.type == "cpu" and not module.INTERPRETED:
            return "backend 'triton' got CPU tensors but triton was imported before TRITON_INTERPRET=1 was set"
        return None
    raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS} or None (automatic)")


def available(device: torch.device | str) -> list[str]:
    """The backends that can run on ``device``, e.g. ``available("cpu") == ["reference", "cpu"]``."""
    device = torch.device(device)
    return [name for name in BACKENDS if _why_unavailable(name, device) is None]


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend name to use on ``device``: ``backend`` itself (checked), or the automatic choice."""
    if backend is None:
        order = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}.get(device.type, ())
        return next((name for name in order if _why_unavailable(name, device) is None), "reference")
    reason = _why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"meprop backend {backend!r} is unavailable: {reason}")
    return backend


def get(name: str) -> ModuleType:
    """The module implementing backend ``name`` (see the module docstring)."""
    if name == "reference":
        return reference
    if name in ("cpu", "cuda"):
        return ops
    if name == "triton":
        module, error = _triton_module()
        if module is None:
            raise RuntimeError(f"meprop backend 'triton' is unavailable: {error}")
        return module
    raise ValueError(f"unknown backend {name!r}: choose one of {BACKENDS} or None (automatic)")
