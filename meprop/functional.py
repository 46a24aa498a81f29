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

Toolchain: under ``torch.autocast`` the inputs are cast as ``nn.Linear``'s are; ``torch.compile`` (also
``fullgraph=True``) and ``torch.export`` trace the layer; ``torch.func`` transforms (``grad``,
``vmap(grad)``, ``jacrev``) and double backward (``create_graph=True``) differentiate through the reference
products with the selection held fixed, so second-order gradients are exact for the kept entries.
``sparse_grad=True`` and an explicit ``generator`` are eager-only (a clear error under ``torch.compile``).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

from . import backends, distributed, reference, selection
from .opdefs import accumulate_dtype

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


def check_options(mode: str, backend, where: str) -> None:
    """Raise a ValueError naming ``where`` for an unknown ``mode`` or ``backend``."""
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
    if backend is not None and (not isinstance(backend, str) or backend not in backends.BACKENDS):
        raise ValueError(f"{where}: backend must be None or one of {backends.BACKENDS}, got {backend!r}")


def _check_tensors(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, where: str) -> None:
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point tensor, got {t.dtype}")
        if t is not None and t.device != weight.device:
            raise ValueError(f"{where}: {name} is on {t.device} but weight is on {weight.device}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if input.dtype != weight.dtype:
        raise TypeError(f"{where}: input is {input.dtype} but weight is {weight.dtype}")


def _autocast(input, weight, bias):
    """The arguments as ``nn.Linear`` sees them under ``torch.autocast``: floating tensors other than float64
    cast to the autocast dtype of their device (unchanged when autocast is off)."""
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(input), cast(weight), cast(bias)


def linear_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    *,
    k: int,
    mode: str = "unified",
    backend: str | backends.Backend = "reference",
    input_grad: bool = True,
    weight_grad: bool = True,
    bias_grad: bool = True,
    sparse_grad: bool = False,
    generator: torch.Generator | None = None,
    sync: distributed.SyncSelection | None = None,
    reuse_grad: bool = False,
    idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """meProp's backward of ``y = input W^T + b`` for ``grad_output`` of shape ``(..., out)``, in one op call.

    ``k`` is the resolved int (``1 <= k < out``) and ``backend`` a backend name or :class:`~meprop.backends.Backend`;
    with ``sync`` the unified selections are those of the whole process group (:mod:`meprop.distributed`).
    Returns ``(dx, dW, db)``: ``dx`` shaped like ``input``, ``dW (out, in)`` dense or, with ``sparse_grad``, a
    coalesced sparse COO tensor holding only the touched rows, ``db (out,)``; None where not asked for.
    ``reuse_grad``: the CPU kernels may return the dense ``dW`` they returned for this weight last time, if nothing
    holds it any more and it was not written since (its version counter); only its previously written rows are
    cleared instead of all of it. Writes that bypass the version counter (through ``.data``, a raw pointer or
    NumPy) are not seen: ``MEPROP_REUSE_GRAD=0`` in the environment turns reuse off.
    ``idx (k,)``: unified modes only, the kept columns chosen by the caller (e.g. :func:`meprop.selection.select`).
    """
    if not isinstance(backend, backends.Backend):
        backend = backends.resolve(backend, weight.device, weight.dtype, k)
    flat = grad_output.dim() == 2  # (2-D inputs skip the reshapes: a few microseconds each at small sizes)
    dy = grad_output if flat else grad_output.reshape(-1, weight.shape[0])
    if dy.dtype != weight.dtype:
        dy = dy.to(weight.dtype)
    x = input if flat else input.reshape(dy.shape[0], weight.shape[1])  # (not -1: in_features may be 0)
    if mode == "unified" or mode == "random_unified":
        if idx is not None:
            pass
        elif sync is not None:  # data parallel: one selection for every rank of the group (meprop.distributed)
            idx = sync.select(dy, k, mode, backend, generator)
        else:
            idx = None if mode == "unified" else reference.random_unified(dy, k, generator)
        dx, dw, db, rows = backend.linear_backward_unified(
            dy, x, weight, k, idx, input_grad, weight_grad, bias_grad, sparse_grad, reuse_grad
        )
    else:
        idx = None if mode == "per_example" else reference.random_rows(dy, k, generator)[1]
        dx, dw, db, rows = backend.linear_backward_rows(
            dy, x, weight, k, idx, input_grad, weight_grad, bias_grad, sparse_grad, reuse_grad
        )
    dx = (dx if flat else dx.reshape(input.shape)) if input_grad else None
    if weight_grad and sparse_grad:
        dw = torch.sparse_coo_tensor(rows.unsqueeze(0), dw, weight.shape, is_coalesced=True, check_invariants=False)
    return dx, dw if weight_grad else None, db if bias_grad else None


class _SparseLinear(torch.autograd.Function):
    """Dense forward, meProp backward. ``forward(ctx, ...)`` rather than a separate ``setup_context``, so
    that ``Function.apply`` skips binding its arguments with ``inspect`` on every call (eager, compile)."""

    @staticmethod
    def forward(ctx, input, weight, bias, k, mode, backend, sparse_grad, generator, sync):
        _SparseLinear._save(ctx, input, weight, bias, k, mode, backend, sparse_grad, generator, sync)
        return F.linear(input, weight, bias)

    @staticmethod
    def _save(ctx, input, weight, bias, k, mode, backend, sparse_grad, generator, sync):
        ctx.save_for_backward(input, weight)
        ctx.k, ctx.mode, ctx.backend, ctx.sparse_grad, ctx.generator = k, mode, backend, sparse_grad, generator
        ctx.has_bias, ctx.sync = bias is not None, sync
        # The dense weight-gradient buffer is reused only in eager mode (a compiled graph may write its
        # outputs' memory without the version counter seeing it).
        ctx.reuse_grad = not torch.compiler.is_compiling()

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        device_type = grad_output.device.type
        # Differentiating again (create_graph, torch.func): the reference products are PyTorch ops, so
        # autograd and functorch see through them; their selection equals the kernels' by contract.
        again = torch.is_grad_enabled()
        with torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else contextlib.nullcontext():
            dx, dw, db = linear_backward(
                grad_output,
                input,
                weight,
                k=ctx.k,
                mode=ctx.mode,
                backend=backends.loaded("reference" if again else ctx.backend),
                input_grad=need_dx,
                weight_grad=need_dw,
                bias_grad=need_db and ctx.has_bias,
                sparse_grad=ctx.sparse_grad,
                generator=ctx.generator,
                sync=ctx.sync,
                reuse_grad=ctx.reuse_grad and not again,
            )
        return dx, dw, db, None, None, None, None, None, None


class _SparseLinearTransformable(_SparseLinear):
    """:class:`_SparseLinear` in the form ``torch.func`` transforms need (``setup_context``, a vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, k, mode, backend, sparse_grad, generator, sync):
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _SparseLinear._save(ctx, *inputs)


class _ControlledLinear(torch.autograd.Function):
    """Dense forward; a unified backward whose columns ``owner``'s selection chooses (an adaptive ``k``, error
    feedback: :mod:`meprop.selection`). ``owner`` is the layer (``last_k``, ``feedback``) or None."""

    @staticmethod
    def forward(ctx, input, weight, bias, k, backend, sparse_grad, owner, where):
        ctx.save_for_backward(input, weight)
        ctx.k, ctx.backend, ctx.sparse_grad, ctx.owner, ctx.where = k, backend, sparse_grad, owner, where
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        owner, out = ctx.owner, weight.shape[0]
        dy = grad_output.reshape(-1, out)
        if dy.dtype != weight.dtype:
            dy = dy.to(weight.dtype)
        x = input.reshape(dy.shape[0], weight.shape[1])
        feedback = owner is not None and owner.error_feedback
        # Differentiating again (create_graph=True): the selection is held fixed (computed without a graph) and
        # the products are the reference's PyTorch ops, which autograd sees through, as in _SparseLinear.
        again = torch.is_grad_enabled()
        backend = backends.loaded("reference" if again else ctx.backend)
        db = memory = None
        with torch.no_grad() if again else contextlib.nullcontext():
            if feedback and not isinstance(ctx.k, selection.Adaptive):  # one op: scores, memory, selection, db
                memory = owner._feedback_memory(out, accumulate_dtype(dy.dtype))
                kept, memory, db = backend.topk_unified_feedback(dy, memory, ctx.k, owner.feedback_decay, need_db)
                db = db if need_db and not again else None
            elif feedback:
                kept, memory = owner._feedback_select(backend.column_scores(dy), ctx.k, ctx.where)
            else:
                kept = selection.select(backend.column_scores(dy), ctx.k, ctx.where)
        if owner is not None:
            owner._record_selection(kept.numel(), memory)
        off = _autocast_on(dy.device.type)
        with torch.autocast(dy.device.type, enabled=False) if off else contextlib.nullcontext():
            if kept.numel() >= out:  # the whole layer kept (an Adaptive k): the dense products
                dx = (dy @ weight).reshape(input.shape) if need_dx else None
                dw = (dy.t() @ x) if need_dw else None
                if dw is not None and ctx.sparse_grad:
                    dw = dw.to_sparse()
                db = dy.sum(0, dtype=accumulate_dtype(dy.dtype)).to(dy.dtype) if need_db else None
            else:
                dx, dw, db_products = linear_backward(  # eager only (controlled_linear): the dW buffer may be reused
                    dy, x, weight, k=kept.numel(), backend=backend, input_grad=need_dx, weight_grad=need_dw,
                    bias_grad=need_db and db is None, sparse_grad=ctx.sparse_grad, idx=kept, reuse_grad=not again,
                )
                dx = dx.reshape(input.shape) if need_dx else None
                db = db if db is not None else db_products
        return dx, dw, db, None, None, None, None, None


def controlled_linear(input, weight, bias, k, backend, sparse_grad: bool, where: str, owner=None):
    """The path of ``meprop.Linear`` with an :class:`~meprop.Adaptive` ``k`` or error feedback (unified mode):
    ``k`` resolved by :func:`meprop.selection.resolve`, ``owner`` the layer keeping ``last_k`` / ``feedback``."""
    input, weight, bias = _autocast(input, weight, bias)
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if k is None or not needs_grad:
        return F.linear(input, weight, bias)
    _check_tensors(input, weight, bias, where)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        raise RuntimeError(f"{where}: an Adaptive k and error feedback work in eager mode only")
    largest = k.bounds(weight.shape[0], where)[1] if isinstance(k, selection.Adaptive) else k
    name = backends.resolve(backend, weight.device, weight.dtype, min(largest, weight.shape[0] - 1)).name
    if sparse_grad:
        distributed.refuse_sparse_grad_under_ddp(weight, where)
    return _ControlledLinear.apply(input, weight, bias, k, name, sparse_grad, owner, where)


def _autocast_on(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def sparse_linear(
    input, weight, bias, k: int | None, mode: str, backend, sparse_grad: bool, generator, where: str, sync=None
):
    """:func:`linear` with checked options and a resolved ``k`` (the per-call path of ``meprop.Linear``);
    ``sync``: the layer's :class:`~meprop.distributed.SyncSelection` or None."""
    input, weight, bias = _autocast(input, weight, bias)
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if sync is not None and needs_grad:  # data parallel (meprop.distributed): eager only; dense gradients noted
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                f"{where}: sync_selection=True works in eager mode only (not under torch.compile or torch.func)"
            )
        if k is None or mode not in ("unified", "random_unified"):
            sync.touch_all()
    if k is None or not needs_grad:
        return F.linear(input, weight, bias)
    _check_tensors(input, weight, bias, where)
    name = backends.resolve(backend, weight.device, weight.dtype, k).name
    if torch.compiler.is_compiling() and (sparse_grad or generator is not None):
        raise RuntimeError(
            f"{where}: sparse_grad=True and an explicit generator work in eager mode only; under torch.compile use "
            "sparse_grad=False and seed the global random generator (torch.manual_seed) instead"
        )
    if sparse_grad:
        distributed.refuse_sparse_grad_under_ddp(weight, where)
    function = _SparseLinear
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        function = _SparseLinearTransformable
    return function.apply(input, weight, bias, k, mode, name, sparse_grad, generator, sync)


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
        generator: random source of the random modes (eager mode only).

    Returns:
        ``(..., out)``, equal to ``torch.nn.functional.linear(input, weight, bias)``.
    """
    where = "meprop.functional.linear"
    check_options(mode, backend, where)
    k = resolve_k(k, weight.shape[0], where)
    return sparse_linear(input, weight, bias, k, mode, backend, sparse_grad, generator, where)
