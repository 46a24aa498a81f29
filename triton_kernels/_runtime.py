"""How the Triton kernels are tuned, launched and registered with ``torch.library``.

Triton fixes its mode when it is imported: with ``TRITON_INTERPRET=1`` in the environment at that moment,
``triton.jit`` kernels (Triton's own library functions included) run in the interpreter, which takes CPU
tensors; otherwise they compile for the GPU. :data:`INTERPRETED` records which of the two this process got.
"""

import functools
import os

import torch
import triton

from meprop.opdefs import OPS

__all__ = ["DTYPES", "INTERPRETED", "HAS_TRITON_OP", "MAX_K", "NAMESPACE", "autotune", "launch", "library_op"]

NAMESPACE = "meprop_triton"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 256  # the largest k of the top-k selection kernels (the kept keys live in registers)


def _interpreted() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETED = _interpreted()
_DEVICE = "cpu" if INTERPRETED else "cuda"


# The position of k among the arguments of the ops that select with the top-k kernels.
_K_ARGUMENT = {"topk_unified": 1, "topk_unified_feedback": 2, "topk_rows": 1, "linear_backward_unified": 3, "linear_backward_rows": 3, "lstm_backward": 11}


def _check_limits(name: str, args: tuple) -> None:
    """What the Triton kernels take beyond the op contract: their device, float dtypes and largest k."""
    for t in args:
        if isinstance(t, torch.Tensor):
            torch._check_value(
                t.device.type == _DEVICE,
                lambda: (
                    f"meprop.{name}: the Triton kernels take {_DEVICE.upper()} tensors here "
                    f"({'interpreter' if INTERPRETED else 'compiled'} mode), got one on {t.device}"
                ),
            )
            torch._check_type(
                not t.is_floating_point() or t.dtype in DTYPES,
                lambda: f"meprop.{name}: the Triton kernels take float32, float16 or bfloat16 tensors, got {t.dtype}",
            )
    k = args[_K_ARGUMENT[name]] if name in _K_ARGUMENT else None
    if k is not None:
        torch._check_value(k <= MAX_K, lambda: f"meprop.{name}: the Triton top-k kernels take k <= {MAX_K}, got k={k}")


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


def library_op(name: str):
    """Register the decorated launcher as the op ``meprop_triton::<name>`` of ``meprop.opdefs.OPS[name]``.

    The op has the table's schema and runs the table's argument checks before the launcher. It is a
    ``torch.library.triton_op`` where available (torch.compile then sees the Triton kernels, and traces the
    checks and the launcher for the fake kernel); otherwise, and in the interpreter (whose launches run the
    kernels, which fake tensors cannot), a ``torch.library.custom_op`` whose fake kernel is the table's.
    """
    opdef = OPS[name]
    qualname = f"{NAMESPACE}::{name}"

    def register(launcher):
        @functools.wraps(launcher)
        def checked(*args):
            opdef.check(*args)
            _check_limits(name, args)
            return launcher(*args)

        if HAS_TRITON_OP and not INTERPRETED:
            return torch.library.triton_op(qualname, checked, mutates_args=(), schema=opdef.signature)
        op = torch.library.custom_op(qualname, checked, mutates_args=(), schema=opdef.signature)
        op.register_fake(opdef.fake)
        return op

    return register
