"""Thin wrappers over the compiled ``torch.ops.meprop.*`` ops, with their fake (meta) implementations.

The functions have the signatures and semantics of :mod:`meprop.reference`; the dispatcher runs the
kernel of the tensors' device (``csrc/cpu`` or ``csrc/cuda``). Importing this module loads the extension;
when that fails, :data:`EXTENSION_ERROR` holds the reason and the ops are absent.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.meprop.*)

    EXTENSION_ERROR: str | None = None
except Exception as exc:  # any import failure (missing build, ABI mismatch) leaves the reference path
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

OP_NAMES = (
    "topk_unified",
    "topk_rows",
    "linear_input_grad_unified",
    "linear_weight_grad_unified",
    "linear_input_grad_rows",
    "linear_weight_grad_rows",
    "scatter_rows",
)

__all__ = ["EXTENSION_ERROR", "has_kernels", *OP_NAMES]


def has_kernels(device_type: str) -> bool:
    """Whether the extension is loaded and has kernels for every op on ``device_type`` ("cpu", "cuda")."""
    if EXTENSION_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"meprop::{name}", key) for name in OP_NAMES)


def topk_unified(dy: torch.Tensor, k: int) -> torch.Tensor:
    """See :func:`meprop.reference.topk_unified`."""
    return torch.ops.meprop.topk_unified(dy, k)


def topk_rows(dy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`meprop.reference.topk_rows`."""
    return torch.ops.meprop.topk_rows(dy, k)


def linear_input_grad_unified(dy: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """See :func:`meprop.reference.linear_input_grad_unified`."""
    return torch.ops.meprop.linear_input_grad_unified(dy, weight, idx)


def linear_weight_grad_unified(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """See :func:`meprop.reference.linear_weight_grad_unified`."""
    return torch.ops.meprop.linear_weight_grad_unified(dy, x, idx)


def linear_input_grad_rows(vals: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """See :func:`meprop.reference.linear_input_grad_rows`."""
    return torch.ops.meprop.linear_input_grad_rows(vals, idx, weight)


def linear_weight_grad_rows(
    vals: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, out_features: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """See :func:`meprop.reference.linear_weight_grad_rows`."""
    return torch.ops.meprop.linear_weight_grad_rows(vals, idx, x, out_features, rows)


def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, out_features: int) -> torch.Tensor:
    """See :func:`meprop.reference.scatter_rows`."""
    return torch.ops.meprop.scatter_rows(rows, idx, out_features)


def _register_fakes() -> None:
    """Shape-only implementations, so that torch.compile and opcheck can trace the ops."""
    lib = "meprop::"

    @torch.library.register_fake(lib + "topk_unified")
    def _(dy, k):
        return dy.new_empty((k,), dtype=torch.long)

    @torch.library.register_fake(lib + "topk_rows")
    def _(dy, k):
        return dy.new_empty((dy.shape[0], k)), dy.new_empty((dy.shape[0], k), dtype=torch.long)

    @torch.library.register_fake(lib + "linear_input_grad_unified")
    def _(dy, weight, idx):
        return dy.new_empty((dy.shape[0], weight.shape[1]))

    @torch.library.register_fake(lib + "linear_weight_grad_unified")
    def _(dy, x, idx):
        return dy.new_empty((idx.shape[0], x.shape[1]))

    @torch.library.register_fake(lib + "linear_input_grad_rows")
    def _(vals, idx, weight):
        return vals.new_empty((vals.shape[0], weight.shape[1]))

    @torch.library.register_fake(lib + "linear_weight_grad_rows")
    def _(vals, idx, x, out_features, rows):
        return vals.new_empty((out_features if rows is None else rows.shape[0], x.shape[1]))

    @torch.library.register_fake(lib + "scatter_rows")
    def _(rows, idx, out_features):
        return rows.new_empty((out_features, rows.shape[1]))


if EXTENSION_ERROR is None:
    _register_fakes()
