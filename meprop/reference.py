"""Pure-PyTorch reference implementation of every meprop op: the semantics every backend reproduces.

Each function validates its arguments with the op's checks (:mod:`meprop.opdefs`), exactly as the CPU,
CUDA and Triton kernels do, so every backend rejects the same inputs with the same exception. Shapes use a
linear layer ``y = x W^T + b`` with ``x: (N, in)``, ``W: (out, in)`` and the output gradient ``dy: (N, out)``.

Selection order: a larger score comes first; equal scores come in increasing index order; NaN counts as
larger than every number (so a NaN gradient is always kept and propagates instead of being dropped).
Products accumulate in float32 for float16/bfloat16 inputs (float64 for float64) and return the input
dtype. The per-example products are sums over the kept entries only: a weight-gradient row that no
example selected is exactly zero even where ``x`` holds inf or NaN, and an index repeated within a row
counts as often as it appears. The random selections (:func:`random_unified`, :func:`random_rows`) are
the random-k baseline and are shared by every backend.

Every function is differentiable in its float arguments (used for double backward) and runs on any
device, the meta device included.
"""

from __future__ import annotations

import torch

from .opdefs import OPS, accumulate_dtype
from .selection import feedback_select

__all__ = [
    "accumulate_dtype",
    "column_scores",
    "topk_unified",
    "topk_unified_feedback",
    "topk_rows",
    "random_unified",
    "random_rows",
    "linear_input_grad_unified",
    "linear_weight_grad_unified",
    "linear_input_grad_rows",
    "linear_weight_grad_rows",
    "scatter_rows",
    "linear_backward_unified",
    "linear_backward_rows",
    "lstm_backward",
    "lstm_forward",
]


def _order_desc(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices sorting ``scores`` descending along ``dim``: ties by lower index, NaN first."""
    # A stable descending sort keeps equal scores in index order; torch.sort ranks NaN above +inf.
    return torch.sort(scores, dim=dim, descending=True, stable=True).indices


def _column_scores(dy: torch.Tensor) -> torch.Tensor:
    return dy.detach().abs().sum(0, dtype=accumulate_dtype(dy.dtype))


def column_scores(dy: torch.Tensor) -> torch.Tensor:
    """The unified selection's scores ``sum_n |dy[n, j]|``, shape ``(out,)``, in the accumulation dtype.

    ``topk_unified(dy, k)`` is the top ``k`` of these; summed over several ``dy`` (the ranks of a data-parallel
    group) and then ranked (``topk_unified(scores[None], k)``), they select for the concatenated batch.
    """
    OPS["column_scores"].check(dy)
    return _column_scores(dy)


def topk_unified(dy: torch.Tensor, k: int) -> torch.Tensor:
    """Unified top-k: the ``k`` columns of ``dy (N, out)`` with the largest ``sum_n |dy[n, j]|``.

    Returns int64 indices of shape ``(k,)`` in selection order (largest score first).
    """
    OPS["topk_unified"].check(dy, k)
    return _order_desc(_column_scores(dy), 0)[:k].contiguous()


def topk_unified_feedback(
    dy: torch.Tensor, memory: torch.Tensor, k: int, decay: float, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unified top-k with error feedback, for ``dy (N, out)`` and ``memory (out,)`` (accumulation dtype).

    The ranked scores are ``r = sum_n |dy[n, j]| + memory[j]``. Returns ``(kept, next_memory, db)``: the ``k``
    columns of largest ``|r|`` in selection order (int64 ``(k,)``), ``decay * r`` with the kept columns 0
    (``(out,)``, memory's dtype; the memory is not modified) and ``db = sum_n dy`` (``(out,)``, dy's dtype) when
    ``bias_grad``, else an empty tensor. :func:`meprop.selection.feedback_select` defines the selection.
    """
    OPS["topk_unified_feedback"].check(dy, memory, k, decay, bias_grad)
    kept, memory = feedback_select(_column_scores(dy), memory.detach(), k, decay, "meprop.topk_unified_feedback")
    db = dy.sum(0, dtype=accumulate_dtype(dy.dtype)).to(dy.dtype) if bias_grad else dy.new_empty((0,))
    return kept.contiguous(), memory, db


def topk_rows(dy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example top-k: for each row ``n`` the ``k`` entries of ``dy (N, out)`` largest in magnitude.

    Returns ``(vals, idx)``, both ``(N, k)``: the signed values ``dy[n, idx[n]]`` (dy's dtype) and int64
    column indices, each row in selection order.
    """
    OPS["topk_rows"].check(dy, k)
    idx = _order_desc(dy.detach().abs(), 1)[:, :k].contiguous()
    return dy.gather(1, idx), idx


def random_unified(dy: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-k baseline of :func:`topk_unified`: ``k`` distinct columns of ``dy`` drawn uniformly, ascending."""
    OPS["topk_unified"].check(dy, k)
    return torch.randperm(dy.shape[1], generator=generator, device=dy.device)[:k].sort().values


def random_rows(
    dy: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-k baseline of :func:`topk_rows`: per row, ``k`` distinct columns drawn uniformly, ascending."""
    OPS["topk_rows"].check(dy, k)
    # Uniform k-subsets per row: the k largest of i.i.d. uniform keys (an (N, out) temporary, like dy).
    keys = torch.rand(dy.shape, generator=generator, device=dy.device)
    idx = keys.topk(k, dim=1).indices.sort(dim=1).values
    return dy.gather(1, idx), idx


def linear_input_grad_unified(dy: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``dx (N, in) = dy[:, idx] @ W[idx, :]`` for ``dy (N, out)``, ``W (out, in)``, ``idx (k,)``."""
    OPS["linear_input_grad_unified"].check(dy, weight, idx)
    acc = accumulate_dtype(dy.dtype)
    return (dy.index_select(1, idx).to(acc) @ weight.index_select(0, idx).to(acc)).to(dy.dtype)


def linear_weight_grad_unified(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The kept rows of the weight gradient: ``dW_rows (k, in) = dy[:, idx]^T @ x``."""
    OPS["linear_weight_grad_unified"].check(dy, x, idx)
    acc = accumulate_dtype(dy.dtype)
    return (dy.index_select(1, idx).to(acc).t() @ x.to(acc)).to(dy.dtype)


def linear_input_grad_rows(vals: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-example sparse product ``dx[n] = sum_i vals[n, i] * W[idx[n, i], :]``; ``dx`` is ``(N, in)``."""
    OPS["linear_input_grad_rows"].check(vals, idx, weight)
    acc = accumulate_dtype(vals.dtype)
    w = weight.to(acc)
    dx = vals.new_zeros((vals.shape[0], weight.shape[1]), dtype=acc)
    for i in range(vals.shape[1]):  # one kept entry per row at a time: (N, in) temporaries only
        dx.addcmul_(vals[:, i : i + 1].to(acc), w.index_select(0, idx[:, i]))
    return dx.to(vals.dtype)


def linear_weight_grad_rows(
    vals: torch.Tensor,
    idx: torch.Tensor,
    x: torch.Tensor,
    out_features: int,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example weight gradient ``dW[j] = sum over (n, i) with idx[n, i] == j of vals[n, i] * x[n]``.

    With ``rows=None`` the result is the dense ``(out_features, in)`` gradient; with ``rows`` (distinct int64
    row ids in any order, shape ``(r,)``) it is ``dW[rows]``, shape ``(r, in)``.
    """
    OPS["linear_weight_grad_rows"].check(vals, idx, x, out_features, rows)
    acc = accumulate_dtype(vals.dtype)
    xa = x.to(acc)
    dw = vals.new_zeros((out_features, x.shape[1]), dtype=acc)
    for i in range(vals.shape[1]):
        dw.index_add_(0, idx[:, i], vals[:, i : i + 1].to(acc) * xa)
    if rows is not None:
        dw = dw.index_select(0, rows)
    return dw.to(vals.dtype)


def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, out_features: int) -> torch.Tensor:
    """Dense ``(out_features, in)`` matrix holding ``rows[i]`` at row ``idx[i]`` and zeros elsewhere.

    ``idx`` must hold distinct indices in ``[0, out_features)``.
    """
    OPS["scatter_rows"].check(rows, idx, out_features)
    return rows.new_zeros((out_features, rows.shape[1])).index_copy_(0, idx, rows)


def linear_backward_unified(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    idx: torch.Tensor | None = None,
    input_grad: bool = True,
    weight_grad: bool = True,
    bias_grad: bool = True,
    rows_only: bool = False,
    reuse_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unified backward of ``y = x W^T + b`` in one call: ``(dx, dW, db, kept)``.

    ``kept (k,)`` is ``idx`` (k distinct columns, e.g. a random draw) or :func:`topk_unified` of ``dy``;
    ``dx (N, in)`` as :func:`linear_input_grad_unified`; ``dW`` the dense ``(out, in)`` gradient, or with
    ``rows_only`` its kept rows ``(k, in)`` with ``kept`` ascending; ``db (out,) = sum_n dy``. An output not
    asked for is an empty ``(0,)`` tensor. ``reuse_grad`` is a hint the compiled kernels may use (the reference
    always returns a fresh ``dW``).
    """
    OPS["linear_backward_unified"].check(dy, x, weight, k, idx)
    kept = topk_unified(dy, k) if idx is None else idx
    nothing = dy.new_empty((0,))
    dx = linear_input_grad_unified(dy, weight, kept) if input_grad else nothing
    dw = nothing
    if weight_grad and rows_only:
        kept = kept.sort().values
        dw = linear_weight_grad_unified(dy, x, kept)
    elif weight_grad:
        dw = scatter_rows(linear_weight_grad_unified(dy, x, kept), kept, weight.shape[0])
    db = dy.sum(0, dtype=accumulate_dtype(dy.dtype)).to(dy.dtype) if bias_grad else nothing
    return dx, dw, db, kept


def linear_backward_rows(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    idx: torch.Tensor | None = None,
    input_grad: bool = True,
    weight_grad: bool = True,
    bias_grad: bool = True,
    rows_only: bool = False,
    reuse_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-example backward in one call: ``(dx, dW, db, rows)``.

    The kept entries are ``idx (N, k)`` (e.g. a random draw) or :func:`topk_rows` of ``dy``, with values
    ``dy.gather(1, idx)``; ``dx`` and ``dW`` as :func:`linear_input_grad_rows` and
    :func:`linear_weight_grad_rows`; with ``rows_only``, ``dW`` holds the touched rows only and ``rows (r,)``
    their ascending indices (else ``rows`` is empty); ``db = sum_n dy``.
    """
    OPS["linear_backward_rows"].check(dy, x, weight, k, idx)
    if idx is None:
        vals, idx = topk_rows(dy, k)
    else:
        vals = dy.gather(1, idx)
    nothing = dy.new_empty((0,))
    dx = linear_input_grad_rows(vals, idx, weight) if input_grad else nothing
    dw, rows = nothing, idx.new_empty((0,))
    if weight_grad and rows_only:
        rows = torch.unique(idx)
        dw = linear_weight_grad_rows(vals, idx, x, weight.shape[0], rows)
    elif weight_grad:
        dw = linear_weight_grad_rows(vals, idx, x, weight.shape[0])
    db = dy.sum(0, dtype=accumulate_dtype(dy.dtype)).to(dy.dtype) if bias_grad else nothing
    return dx, dw, db, rows


# The LSTM ops' reference is a module of its own (a per-step loop over the functions above).
from .lstm_reference import lstm_backward, lstm_forward  # noqa: E402
