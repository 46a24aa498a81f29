"""Pure-PyTorch reference implementation of every meprop op.

This module defines the semantics that every backend (CPU C++, CUDA, Triton) must reproduce; the tests
compare each backend against it. Shapes use the notation of a linear layer ``y = x W^T + b`` with
``x: (N, in)``, ``W: (out, in)`` and the output gradient ``dy: (N, out)``.

Selection order: a larger score comes first; equal scores come in increasing index order; NaN counts as
larger than every number (so a NaN gradient is always kept and propagates instead of being dropped).
Products accumulate in float32 for float16/bfloat16 inputs (float64 for float64) and return the input
dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulate_dtype",
    "topk_unified",
    "topk_rows",
    "linear_input_grad_unified",
    "linear_weight_grad_unified",
    "linear_input_grad_rows",
    "linear_weight_grad_rows",
    "scatter_rows",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products and sums of ``dtype`` inputs accumulate in (float64 stays, the rest use float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _order_desc(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices sorting ``scores`` descending along ``dim``: ties by lower index, NaN first."""
    # A stable descending sort keeps equal scores in index order; torch.sort ranks NaN above +inf.
    return torch.sort(scores, dim=dim, descending=True, stable=True).indices


def topk_unified(dy: torch.Tensor, k: int) -> torch.Tensor:
    """Unified top-k: the ``k`` columns of ``dy (N, out)`` with the largest ``sum_n |dy[n, j]|``.

    Returns int64 indices of shape ``(k,)`` in selection order (largest score first).
    """
    scores = dy.abs().sum(0, dtype=accumulate_dtype(dy.dtype))
    return _order_desc(scores, 0)[:k].contiguous()


def topk_rows(dy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example top-k: for each row ``n`` the ``k`` entries of ``dy (N, out)`` largest in magnitude.

    Returns ``(vals, idx)``, both ``(N, k)``: the signed values ``dy[n, idx[n]]`` (dy's dtype) and int64
    column indices, each row in selection order.
    """
    idx = _order_desc(dy.abs(), 1)[:, :k].contiguous()
    return dy.gather(1, idx), idx


def linear_input_grad_unified(dy: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``dx (N, in) = dy[:, idx] @ W[idx, :]`` for ``dy (N, out)``, ``W (out, in)``, ``idx (k,)``."""
    acc = accumulate_dtype(dy.dtype)
    return (dy.index_select(1, idx).to(acc) @ weight.index_select(0, idx).to(acc)).to(dy.dtype)


def linear_weight_grad_unified(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The kept rows of the weight gradient: ``dW_rows (k, in) = dy[:, idx]^T @ x``."""
    acc = accumulate_dtype(dy.dtype)
    return (dy.index_select(1, idx).to(acc).t() @ x.to(acc)).to(dy.dtype)


def _rows_dense_dy(vals: torch.Tensor, idx: torch.Tensor, out_features: int) -> torch.Tensor:
    """The dense ``(N, out)`` gradient that holds ``vals`` at ``idx`` and zeros elsewhere."""
    dense = vals.new_zeros((vals.shape[0], out_features), dtype=accumulate_dtype(vals.dtype))
    return dense.scatter_(1, idx, vals.to(dense.dtype))


def linear_input_grad_rows(vals: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-example sparse product ``dx[n] = sum_j vals[n, j] * W[idx[n, j], :]``; ``dx`` is ``(N, in)``."""
    dense = _rows_dense_dy(vals, idx, weight.shape[0])
    return (dense @ weight.to(dense.dtype)).to(vals.dtype)


def linear_weight_grad_rows(
    vals: torch.Tensor,
    idx: torch.Tensor,
    x: torch.Tensor,
    out_features: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example weight gradient ``dW[j] = sum over (n, i) with idx[n, i] == j of vals[n, i] * x[n]``.

    With ``rows=None`` the result is the dense ``(out_features, in)`` gradient; with ``rows`` (sorted,
    unique int64 row ids, shape ``(r,)``) it is just those rows, shape ``(r, in)``.
    """
    dense = _rows_dense_dy(vals, idx, out_features)
    if rows is not None:
        dense = dense.index_select(1, rows)
    return (dense.t() @ x.to(dense.dtype)).to(vals.dtype)


def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, out_features: int) -> torch.Tensor:
    """Dense ``(out_features, in)`` matrix holding ``rows[i]`` at row ``idx[i]`` and zeros elsewhere.

    ``idx`` must hold unique indices in ``[0, out_features)``.
    """
    if idx.numel() != torch.unique(idx).numel():
        raise ValueError("scatter_rows: idx holds duplicate row indices")
    dense = rows.new_zeros((out_features, rows.shape[1]))
    return dense.index_copy_(0, idx, rows)
