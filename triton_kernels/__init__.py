"""meprop's Triton backend (the folder ``triton_kernels/``, installed as ``meprop_triton``).

The seven functions have the signatures and semantics of :mod:`meprop.reference` (``backends.get("triton")``
returns this module). They check their arguments, then call the ops ``torch.ops.meprop_triton.*``
(registered with ``torch.library.triton_op`` where torch has it, so torch.compile traces the kernels).

Limits: float32, float16 and bfloat16 tensors (float32 accumulation); the top-k selections take
``k <= 256`` (:data:`MAX_K`); tensors on a CUDA device, or CPU tensors when Triton runs in its
interpreter (``TRITON_INTERPRET=1`` set before triton is imported). Index arguments are range-checked: on CPU with a ValueError, on CUDA with an
asynchronous device assertion (no host synchronisation).
"""

from typing import Optional

import torch

from . import ops as _ops  # noqa: F401  (registers torch.ops.meprop_triton.*)
from ._runtime import INTERPRETED

__all__ = [
    "DTYPES",
    "INTERPRETED",
    "MAX_K",
    "topk_unified",
    "topk_rows",
    "linear_input_grad_unified",
    "linear_weight_grad_unified",
    "linear_input_grad_rows",
    "linear_weight_grad_rows",
    "scatter_rows",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 256


def _check_matrix(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16 for the Triton kernels, got {t.dtype}")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and INTERPRETED):
        raise ValueError(
            f"{op}: {name} is on {t.device}; the Triton kernels take CUDA tensors "
            "(CPU tensors only when triton was imported with TRITON_INTERPRET=1)"
        )


def _check_like(op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.dtype != like.dtype:
        raise TypeError(f"{op}: {name} is {t.dtype} but {like_name} is {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {like_name} is on {like.device}")


def _check_k(op: str, k, n_cols: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_cols:
        raise ValueError(f"{op}: k must lie in [1, {n_cols}] (the columns of dy), got {k}")
    if k > MAX_K:
        raise ValueError(
            f"{op}: the Triton top-k kernels take k <= {MAX_K}, got k={k}; use the 'cuda', 'cpu' or 'reference' backend"
        )


def _check_out_features(op: str, out_features) -> None:
    if isinstance(out_features, bool) or not isinstance(out_features, int):
        raise TypeError(f"{op}: out_features must be an int, got {type(out_features).__name__}")
    if out_features < 0:
        raise ValueError(f"{op}: out_features must be >= 0, got {out_features}")


def _check_index(
    op: str, name: str, idx, dims: int, like: torch.Tensor, bound: int, unique: bool = False
) -> None:
    """``idx``: int64, ``dims``-D, on ``like``'s device, values in ``[0, bound)`` (and distinct if ``unique``)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(idx).__name__}")
    if idx.dtype != torch.long:
        raise TypeError(f"{op}: {name} must be int64, got {idx.dtype}")
    if idx.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D, got shape {tuple(idx.shape)}")
    if idx.device != like.device:
        raise ValueError(f"{op}: {name} is on {idx.device} but the other tensors are on {like.device}")
    if idx.numel() == 0:
        return
    bad = (idx.min() < 0) | (idx.max() >= bound)
    problem = f"values must lie in [0, {bound})"
    if unique:
        ordered = idx.reshape(-1).sort().values
        bad = bad | (ordered[1:] == ordered[:-1]).any()
        problem += " and be distinct"
    if idx.device.type == "cpu":
        if bool(bad):
            raise ValueError(f"{op}: {name} {problem}")
    else:
        torch._assert_async(~bad, f"{op}: {name} {problem}")


def topk_unified(dy: torch.Tensor, k: int) -> torch.Tensor:
    """See :func:`meprop.reference.topk_unified`; ``k <= 256``."""
    op = "meprop_triton.topk_unified"
    _check_matrix(op, "dy", dy)
    _check_k(op, k, dy.shape[1])
    return torch.ops.meprop_triton.topk_unified(dy, k)


def topk_rows(dy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`meprop.reference.topk_rows`; ``k <= 256``."""
    op = "meprop_triton.topk_rows"
    _check_matrix(op, "dy", dy)
    _check_k(op, k, dy.shape[1])
    return torch.ops.meprop_triton.topk_rows(dy, k)


def linear_input_grad_unified(dy: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """See :func:`meprop.reference.linear_input_grad_unified`."""
    op = "meprop_triton.linear_input_grad_unified"
    _check_matrix(op, "dy", dy)
    _check_matrix(op, "weight", weight)
    _check_like(op, "weight", weight, "dy", dy)
    if dy.shape[1] != weight.shape[0]:
        raise ValueError(f"{op}: dy has {dy.shape[1]} columns but weight has {weight.shape[0]} rows")
    _check_index(op, "idx", idx, 1, dy, weight.shape[0])
    return torch.ops.meprop_triton.linear_input_grad_unified(dy, weight, idx)


def linear_weight_grad_unified(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """See :func:`meprop.reference.linear_weight_grad_unified`."""
    op = "meprop_triton.linear_weight_grad_unified"
    _check_matrix(op, "dy", dy)
    _check_matrix(op, "x", x)
    _check_like(op, "x", x, "dy", dy)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: dy has {dy.shape[0]} rows but x has {x.shape[0]}")
    _check_index(op, "idx", idx, 1, dy, dy.shape[1])
    return torch.ops.meprop_triton.linear_weight_grad_unified(dy, x, idx)


def _check_rows_pair(op: str, vals: torch.Tensor, idx: torch.Tensor, bound: int) -> None:
    _check_matrix(op, "vals", vals)
    _check_index(op, "idx", idx, 2, vals, bound)
    if idx.shape != vals.shape:
        raise ValueError(f"{op}: idx and vals must have the same shape, got {tuple(idx.shape)} and {tuple(vals.shape)}")


def linear_input_grad_rows(vals: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """See :func:`meprop.reference.linear_input_grad_rows` (each row of ``idx`` holds distinct indices)."""
    op = "meprop_triton.linear_input_grad_rows"
    _check_matrix(op, "weight", weight)
    _check_rows_pair(op, vals, idx, weight.shape[0])
    _check_like(op, "vals", vals, "weight", weight)
    return torch.ops.meprop_triton.linear_input_grad_rows(vals, idx, weight)


def linear_weight_grad_rows(
    vals: torch.Tensor,
    idx: torch.Tensor,
    x: torch.Tensor,
    out_features: int,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """See :func:`meprop.reference.linear_weight_grad_rows` (``rows`` may be in any order here)."""
    op = "meprop_triton.linear_weight_grad_rows"
    _check_out_features(op, out_features)
    _check_matrix(op, "x", x)
    _check_rows_pair(op, vals, idx, out_features)
    _check_like(op, "vals", vals, "x", x)
    if vals.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: vals has {vals.shape[0]} rows but x has {x.shape[0]}")
    if rows is not None:
        _check_index(op, "rows", rows, 1, x, out_features)
    return torch.ops.meprop_triton.linear_weight_grad_rows(vals, idx, x, out_features, rows)


def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, out_features: int) -> torch.Tensor:
    """See :func:`meprop.reference.scatter_rows`."""
    op = "meprop_triton.scatter_rows"
    _check_out_features(op, out_features)
    _check_matrix(op, "rows", rows)
    _check_index(op, "idx", idx, 1, rows, out_features, unique=True)
    if idx.shape[0] != rows.shape[0]:
        raise ValueError(f"{op}: idx has {idx.shape[0]} entries but rows has {rows.shape[0]}")
    return torch.ops.meprop_triton.scatter_rows(rows, idx, out_features)
