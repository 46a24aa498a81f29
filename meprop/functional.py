"""meProp's autograd-aware linear function: an ordinary dense forward, a top-k sparsified backward.

In the backward of ``y = x W^T + b`` only ``k`` entries of the output gradient ``dy (N, out)`` are kept,
chosen by the ``mode``:

- ``"unified"``: the same ``k`` columns for the whole mini-batch, those with the largest ``sum_n |dy|``;
  ``dx = dy[:, S] W[S, :]`` and ``dW[S, :] = dy[:, S]^T x`` (other rows of ``dW`` are zero).
- ``"per_example"``: the ``k`` largest ``|dy[n, j]|`` of each row ``n``.
- ``"random_unified"`` / ``"random_per_example"``: the same with the indices drawn uniformly without
  replacement (the paper's random-k baseline), from ``generator`` if one is given.

The bias gradient is always dense (``sum_n dy``). ``k`` is an int (``1 <= k``) or a ratio in ``(0, 1]``
(``k = ceil(r * out)``); ``k >= out`` or ``k=None`` gives exactly ``torch.nn.functional.linear``'s backward.
NaN entries of ``dy`` rank above every number, so they are always kept and propagate into the gradients;
``+-inf`` entries are the largest numbers and are kept likewise.
"""

from __future__ import annotations

import functools
import math
import numbers
import os

import torch
import torch.nn.functional as F

from . import backends
from .reference import accumulate_dtype

__all__ = ["MODES", "linear", "linear_backward", "resolve_k"]

MODES = ("unified", "per_example", "random_unified", "random_per_example")


def resolve_k(k, out_features: int, where: str = "meprop") -> int | None:
    """The number of kept gradient entries, or None for the exact dense backward.

    ``k`` is an int >= 1, a float ratio in (0, 1] (``ceil(k * out_features)``) or None; ``k >= out_features``
    resolves to None. Anything else is a ValueError naming ``where``.
    """
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ValueError(f"{where}: k must be a positive int or a ratio in (0, 1], got {k!r}")
    if isinstance(k, numbers.Integral):
        if k <= 0:
            raise ValueError(f"{where}: k must be >= 1, got {k}")
        k = int(k)
    elif 0.0 < float(k) <= 1.0:
        k = max(1, math.ceil(float(k) * out_features))
    else:
        raise ValueError(f"{where}: k must be a positive int or a ratio in (0, 1], got {k!r}")
    return None if k >= out_features else k


def _check_mode(mode: str, where: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")


def _check_tensors(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"meprop.functional.linear: {name} must be a floating-point tensor, got {t.dtype}")
        if t is not None and t.device != weight.device:
            raise ValueError(
                f"meprop.functional.linear: {name} is on {t.device} but weight is on {weight.device}"
            )
    if weight.dim() != 2:
        raise ValueError(f"meprop.functional.linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if input.dtype != weight.dtype:
        raise TypeError(f"meprop.functional.linear: input is {input.dtype} but weight is {weight.dtype}")


@functools.lru_cache(maxsize=None)
def _resolve_backend(backend: str | None, device: torch.device, interpret: str | None) -> str:
    return backends.resolve(backend, device)


def _random_unified(out_features: int, k: int, generator, device) -> torch.Tensor:
    return torch.randperm(out_features, generator=generator, device=device)[:k].sort().values


def _random_rows(dy: torch.Tensor, k: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Uniform k-subsets per row: the k largest of i.i.d. uniform keys (an (N, out) temporary, like dy).
    keys = torch.rand(dy.shape, generator=generator, device=dy.device)
    idx = keys.topk(k, dim=1).indices.sort(dim=1).values
    return dy.gather(1, idx), idx


def _row_sparse(rows: torch.Tensor, idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A coalesced sparse COO tensor of ``shape`` holding ``rows[i]`` at row ``idx[i]`` (unique, ascending)."""
    return torch.sparse_coo_tensor(idx.unsqueeze(0), rows, shape, is_coalesced=True, check_invariants=False)


def linear_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    *,
    k: int,
    mode: str = "unified",
    backend: str = "reference",
    input_grad: bool = True,
    weight_grad: bool = True,
    bias_grad: bool = True,
    sparse_grad: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """meProp's backward of ``y = input W^T + b`` for ``grad_output`` of shape ``(..., out)``.

    ``k`` is the resolved int (``1 <= k < out``) and ``backend`` a resolved backend name. Returns
    ``(dx, dW, db)``: ``dx`` shaped like ``input``, ``dW (out, in)`` dense or, with ``sparse_grad``, a
    coalesced sparse COO tensor holding only the touched rows, ``db (out,)``; None where not asked for.
    """
    out_features, in_features = weight.shape
    dy = grad_output.reshape(-1, out_features).to(weight.dtype)
    x = input.reshape(-1, in_features)
    ops = backends.get(backend)
    dx = dw = db = None
    if mode in ("unified", "random_unified"):
        if mode == "unified":
            idx = ops.topk_unified(dy, k)
        else:
            idx = _random_unified(out_features, k, generator, dy.device)
        if input_grad:
            dx = ops.linear_input_grad_unified(dy, weight, idx)
        if weight_grad and sparse_grad:
            rows_idx = idx.sort().values  # the rows come out in the ascending order a coalesced tensor needs
            dw = _row_sparse(ops.linear_weight_grad_unified(dy, x, rows_idx), rows_idx, weight.shape)
        elif weight_grad:
            dw = ops.scatter_rows(ops.linear_weight_grad_unified(dy, x, idx), idx, out_features)
    else:
        vals, idx = ops.topk_rows(dy, k) if mode == "per_example" else _random_rows(dy, k, generator)
        if input_grad:
            dx = ops.linear_input_grad_rows(vals, idx, weight)
        if weight_grad:
            if sparse_grad:
                touched = torch.unique(idx)
                dw = _row_sparse(ops.linear_weight_grad_rows(vals, idx, x, out_features, touched), touched, weight.shape)
            else:
                dw = ops.linear_weight_grad_rows(vals, idx, x, out_features, None)
    if bias_grad:
        db = dy.sum(0, dtype=accumulate_dtype(dy.dtype)).to(dy.dtype)
    if dx is not None:
        dx = dx.reshape(input.shape).to(input.dtype)
    return dx, dw, db


class _MePropLinear(torch.autograd.Function):
    # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips binding the arguments
    # with inspect.signature on every call, which cost as much as the forward of a small layer.
    @staticmethod
    def forward(ctx, input, weight, bias, k, mode, backend, sparse_grad, generator):
        ctx.save_for_backward(input, weight)
        ctx.options = dict(k=k, mode=mode, backend=backend, sparse_grad=sparse_grad, generator=generator)
        ctx.has_bias = bias is not None
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = linear_backward(
            grad_output,
            input,
            weight,
            input_grad=need_dx,
            weight_grad=need_dw,
            bias_grad=need_db and ctx.has_bias,
            **ctx.options,
        )
        return dx, dw, db, None, None, None, None, None


def linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k,
    mode: str = "unified",
    backend: str | None = None,
    sparse_grad: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.linear`` whose backward keeps only the top-k output-gradient entries.

    Args:
        input: ``(..., in)`` floating-point tensor.
        weight: ``(out, in)``; bias: ``(out,)`` or None.
        k: kept entries (int >= 1, or a ratio in (0, 1]); ``k >= out`` or None gives the dense backward.
        mode: one of :data:`MODES` (see the module docstring).
        backend: ``None`` (automatic) or one of :data:`meprop.backends.BACKENDS`.
        sparse_grad: make the weight gradient a sparse COO tensor holding only the touched rows (for
            optimizers that take sparse gradients: ``torch.optim.SGD``, ``Adagrad``, ``SparseAdam``).
        generator: random source of the random modes.

    Returns:
        ``(..., out)``, equal to ``torch.nn.functional.linear(input, weight, bias)``.
    """
    where = "meprop.functional.linear"
    _check_mode(mode, where)
    _check_tensors(input, weight, bias)
    k = resolve_k(k, weight.shape[0], where)
    name = _resolve_backend(backend, weight.device, os.environ.get("TRITON_INTERPRET"))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    if k is None or not needs_grad:
        return F.linear(input, weight, bias)
    return _MePropLinear.apply(input, weight, bias, k, mode, name, sparse_grad, generator)
