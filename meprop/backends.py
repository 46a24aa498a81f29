"""Backends: the implementations of the meprop ops, as capability objects.

A :class:`Backend` says where it runs (device types), what it runs (dtypes, the largest ``k`` of its
selections), whether it loaded here (and if not, why), and exposes the ops of :mod:`meprop.opdefs` as
attributes with the semantics of :mod:`meprop.reference` (``get("cpu").topk_unified(dy, k)``).

- ``"reference"``: pure PyTorch (:mod:`meprop.reference`); any device, every float dtype, always loaded.
- ``"cpu"``: the C++ kernels of ``csrc/cpu`` (CPU tensors, every float dtype).
- ``"cuda"``: the CUDA kernels of ``csrc/cuda`` (CUDA tensors, every float dtype; needs a CUDA build).
- ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors when triton runs in its interpreter,
  ``TRITON_INTERPRET=1`` set before triton is imported); float32/float16/bfloat16, ``k <= 256``.

Automatic choice (``backend=None``): the first backend of :data:`PREFERENCE` for the tensors' device type
that can run the case (dtype and ``k``); the reference where no kernel can.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Callable

import torch

from . import checks, ops, reference
from .opdefs import OP_NAMES

__all__ = ["BACKENDS", "PREFERENCE", "Backend", "available", "get", "loaded", "resolve"]

BACKENDS = ("reference", "cpu", "cuda", "triton")
# Automatic choice per device type, best first; the reference runs everything the others cannot.
PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

# The Triton kernels' import name (the folder triton_kernels/ is installed under this name, so that it
# cannot clash with other projects' `triton_kernels` packages).
TRITON_MODULE = "meprop_triton"


class Backend:
    """One implementation of the meprop ops and what it can run; the ops are attributes.

    Attributes:
        name: one of :data:`BACKENDS`.
        device_types: device types it takes (``None``: any).
        dtypes: float dtypes it takes.
        max_k: the largest ``k`` its top-k selections take (``None``: any).
        error: why it cannot run here at all (not built, not importable), or None when loaded.
        <op name>: each op of :data:`meprop.opdefs.OPS` when loaded (``backend.topk_unified(dy, k)``).
    """

    def __init__(
        self,
        name: str,
        device_types: tuple[str, ...] | None,
        dtypes: tuple[torch.dtype, ...],
        max_k: int | None = None,
        error: str | None = None,
        ops: dict[str, Callable] | None = None,
    ) -> None:
        self.name, self.device_types, self.dtypes, self.max_k, self.error = name, device_types, dtypes, max_k, error
        for op, fn in (ops or {}).items():
            setattr(self, op, fn)

    def __repr__(self) -> str:
        where = "any device" if self.device_types is None else "/".join(self.device_types)
        state = "loaded" if self.error is None else f"unavailable: {self.error}"
        return f"Backend({self.name!r}, {where}, max_k={self.max_k}, {state})"

    def why_not(self, device: torch.device, dtype: torch.dtype | None = None, k: int | None = None):
        """None when this backend can run ``dtype`` tensors on ``device`` with selections of ``k``; else
        ``(exception type, reason)``."""
        if self.error is not None:
            return RuntimeError, self.error
        if self.device_types is not None and device.type not in self.device_types:
            kinds = " or ".join(t.upper() for t in self.device_types)
            return RuntimeError, f"it takes {kinds} tensors, got tensors on {device}"
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return TypeError, f"it takes {names} tensors, got {dtype}"
        if k is not None and self.max_k is not None and k > self.max_k:
            return ValueError, f"its top-k selections take k <= {self.max_k}, got k={k}"
        return None


def _reference() -> Backend:
    fns = {name: getattr(reference, name) for name in OP_NAMES}
    return Backend("reference", None, checks.FLOAT_DTYPES, ops=fns)


def _compiled(device_type: str) -> Backend:
    if ops.EXTENSION_ERROR is not None:
        error = f"the meprop C++ extension failed to load ({ops.EXTENSION_ERROR})"
    elif not ops.has_kernels(device_type):
        error = f"the meprop extension was built without {device_type.upper()} kernels"
    else:
        return Backend(device_type, (device_type,), checks.FLOAT_DTYPES, ops={n: ops.op(n) for n in OP_NAMES})
    return Backend(device_type, (device_type,), checks.FLOAT_DTYPES, error=error)


def _triton(interpret: bool) -> Backend:
    if "triton" not in sys.modules and not interpret and not torch.cuda.is_available():
        # Importing triton fixes its mode: a CPU-only process that did not ask for the interpreter never
        # imports it (so a test suite can still set TRITON_INTERPRET=1 before the first import).
        return Backend("triton", ("cuda",), (), error="no CUDA device, and TRITON_INTERPRET=1 is not set")
    try:
        module = importlib.import_module(TRITON_MODULE)
    except Exception as exc:  # triton missing, or no Triton kernels installed
        error = f"the Triton kernels cannot be imported ({type(exc).__name__}: {exc})"
        return Backend("triton", ("cuda",), (), error=error)
    # The interpreter takes CPU tensors only; compiled kernels take CUDA tensors.
    device_types = ("cpu",) if module.INTERPRETED else ("cuda",)
    return Backend("triton", device_types, module.DTYPES, module.MAX_K, ops=module.OPS)


@functools.lru_cache(maxsize=None)
def _load(name: str, interpret: bool) -> Backend:
    if name == "reference":
        return _reference()
    if name in ("cpu", "cuda"):
        return _compiled(name)
    return _triton(interpret)


def _check_name(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"meprop: backend must be None or one of {BACKENDS}, got {backend!r}")


def get(name: str) -> Backend:
    """The :class:`Backend` called ``name`` (loaded or not: see its ``error``)."""
    _check_name(name)
    return _load(name, os.environ.get("TRITON_INTERPRET") == "1")


def available(device: torch.device | str) -> list[str]:
    """The backends that can run on ``device``, e.g. ``available("cpu") == ["reference", "cpu"]``."""
    device = torch.device(device)
    return [name for name in BACKENDS if get(name).why_not(device) is None]


@functools.lru_cache(maxsize=None)
def _resolve(backend: str | None, device: torch.device, dtype, k: int | None, interpret: bool) -> str:
    if backend is None:
        order = PREFERENCE.get(device.type, ("reference",))
        backend = next((name for name in order if _load(name, interpret).why_not(device, dtype, k) is None), None)
        if backend is None:
            exc_type, reason = _load("reference", interpret).why_not(device, dtype, k)
            raise exc_type(f"meprop: no backend can run this case ({dtype} tensors on {device}, k={k}): {reason}")
    chosen = _load(backend, interpret)
    problem = chosen.why_not(device, dtype, k)
    if problem is not None:
        exc_type, reason = problem
        raise exc_type(f"meprop backend {backend!r} cannot run this case: {reason}")
    _LOADED[backend] = chosen
    return backend


def constant_under_compile(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (about 1.5 s) when
    meprop is imported: that decorator only sets this attribute (tests/test_backends.py checks it)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def _resolve_name(backend, device, dtype, k, interpret) -> str:
    return _resolve(backend, device, dtype, k, interpret)


def resolve(
    backend: str | None, device: torch.device, dtype: torch.dtype | None = None, k: int | None = None
) -> Backend:
    """The backend to use for ``dtype`` tensors on ``device`` with selections of ``k`` entries.

    ``backend`` is None (the automatic choice) or a name, which is checked: a backend that cannot run the
    case raises ``RuntimeError`` (not available here), ``TypeError`` (dtype) or ``ValueError`` (``k``), with
    the reason. The choice is cached, and constant under ``torch.compile``.
    """
    if backend is not None:
        _check_name(backend)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return _LOADED[_resolve_name(backend, torch.device(device), dtype, k, interpret)]


# The backends resolve() chose (filled by _resolve, so that a traced resolve() is a constant and a lookup).
_LOADED: dict[str, Backend] = {"reference": _reference()}


def loaded(name: str) -> Backend:
    """The backend ``name`` as :func:`resolve` last returned it (a dictionary lookup, for the autograd layer)."""
    return _LOADED[name]
