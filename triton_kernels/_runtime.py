"""How the Triton kernels are tuned, launched and registered with ``torch.library``.

Triton fixes its mode when it is imported: with ``TRITON_INTERPRET=1`` in the environment at that moment,
``triton.jit`` kernels (Triton's own library functions included) run in the interpreter, which takes CPU
tensors; otherwise they compile for the GPU. :data:`INTERPRETED` records which of the two this process got.
"""

import os

import torch
import triton

__all__ = ["INTERPRETED", "HAS_TRITON_OP", "NAMESPACE", "autotune", "launch", "library_op"]

NAMESPACE = "meprop_triton"


def _interpreted() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETED = _interpreted()

# torch >= 2.6 can trace Triton launches inside a triton_op; older torch gets a plain custom op.
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def autotune(configs: list, key: list[str], interpret_config):
    """``triton.autotune`` over ``configs`` on a GPU; only ``interpret_config`` (no timing runs) in the interpreter."""
    return triton.autotune(configs=[interpret_config] if INTERPRETED else configs, key=key)


def launch(kernel):
    """``kernel`` made traceable by torch.compile (``wrap_triton``) where torch supports it."""
    if HAS_TRITON_OP and not INTERPRETED:
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
