"""The meprop op table: every op defined once, with its schema, argument checks and output shapes.

Everything else is derived from :data:`OPS`: the C++ schemas (``setup.py`` writes them into the one
``TORCH_LIBRARY(meprop, m)`` block of ``csrc/meprop.cpp``), the fake kernels of the compiled ops
(``meprop::``) and of the Triton ops (``meprop_triton::``), the checks the reference and the Triton ops run,
the list the CUDA compile check verifies, and the parametrisation of the conformance tests. The semantics
of op ``name`` are those of ``meprop.reference.<name>``.

Shapes use a linear layer ``y = x W^T + b``: ``x (N, in)``, ``W (out, in)``, output gradient ``dy (N, out)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import checks

__all__ = ["OpDef", "OPS", "OP_NAMES", "accumulate_dtype", "register_fakes"]


@dataclass(frozen=True)
class OpDef:
    """One op: ``name``, its ``schema`` arguments and results, ``check`` (raises on bad arguments, works on
    fake tensors) and ``shape`` (empty outputs of the right shape, dtype and device)."""

    name: str
    signature: str
    check: Callable[..., None]
    shape: Callable[..., object]
    doc: str

    @property
    def schema(self) -> str:
        """The full schema, e.g. ``"topk_unified(Tensor dy, int k) -> Tensor"``."""
        return self.name + self.signature

    def fake(self, *args):
        """The fake (meta) kernel: the checks, then outputs of the right shapes."""
        self.check(*args)
        return self.shape(*args)

    @property
    def reference(self) -> Callable:
        """The pure-PyTorch implementation that defines the semantics (``meprop.reference.<name>``)."""
        from . import reference

        return getattr(reference, self.name)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products and sums of ``dtype`` inputs accumulate in (float64 stays, the rest use float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _topk(op: str, dy, k) -> None:
    checks.matrix(op, "dy", dy)
    checks.k_range(op, k, dy.shape[1])


def _topk_feedback(dy, memory, k, decay, bias_grad) -> None:
    op = "topk_unified_feedback"
    _topk(op, dy, k)
    checks.accumulator(op, "memory", memory, dy)
    checks.size_match(op, "memory entries and dy columns", memory.shape[0], dy.shape[1])
    checks.decay(op, decay)


def _topk_feedback_shapes(dy, memory, k, decay, bias_grad):
    """(kept (k,), memory (out,), db (out,) or empty) of topk_unified_feedback."""
    db = dy.new_empty((dy.shape[1],) if bias_grad else (0,))
    return dy.new_empty((k,), dtype=torch.long), memory.new_empty(memory.shape), db


# The checks of each op: metadata first, index values last (csrc/checks.h has the same sequence).
def _input_grad_unified(dy, weight, idx) -> None:
    op = "linear_input_grad_unified"
    checks.matrix(op, "dy", dy)
    checks.matrix(op, "weight", weight)
    checks.like(op, "weight", weight, "dy", dy)
    checks.size_match(op, "dy columns and weight rows", dy.shape[1], weight.shape[0])
    checks.index(op, "idx", idx, 1, dy)
    checks.index_values(op, "idx", idx, weight.shape[0])


def _weight_grad_unified(dy, x, idx) -> None:
    op = "linear_weight_grad_unified"
    checks.matrix(op, "dy", dy)
    checks.matrix(op, "x", x)
    checks.like(op, "x", x, "dy", dy)
    checks.size_match(op, "dy rows and x rows", dy.shape[0], x.shape[0])
    checks.index(op, "idx", idx, 1, dy)
    checks.index_values(op, "idx", idx, dy.shape[1])


def _rows_pair(op: str, vals, idx) -> None:
    checks.matrix(op, "vals", vals)
    checks.index(op, "idx", idx, 2, vals)
    checks.size_match(op, "idx and vals shapes", list(idx.shape), list(vals.shape))


def _input_grad_rows(vals, idx, weight) -> None:
    op = "linear_input_grad_rows"
    checks.matrix(op, "weight", weight)
    _rows_pair(op, vals, idx)
    checks.like(op, "vals", vals, "weight", weight)
    checks.index_values(op, "idx", idx, weight.shape[0])


def _weight_grad_rows(vals, idx, x, out_features, rows=None) -> None:
    op = "linear_weight_grad_rows"
    checks.out_features(op, out_features)
    checks.matrix(op, "x", x)
    _rows_pair(op, vals, idx)
    checks.like(op, "vals", vals, "x", x)
    checks.size_match(op, "vals rows and x rows", vals.shape[0], x.shape[0])
    if rows is not None:
        checks.index(op, "rows", rows, 1, x)
    checks.index_values(op, "idx", idx, out_features)
    if rows is not None:
        checks.index_values(op, "rows", rows, out_features, distinct=True)


def _scatter_rows(rows, idx, out_features) -> None:
    op = "scatter_rows"
    checks.out_features(op, out_features)
    checks.matrix(op, "rows", rows)
    checks.index(op, "idx", idx, 1, rows)
    checks.size_match(op, "idx entries and rows", idx.shape[0], rows.shape[0])
    checks.index_values(op, "idx", idx, out_features, distinct=True)


def _linear_backward(op: str, dy, x, weight, k, idx, idx_dims: int) -> None:
    checks.matrix(op, "dy", dy)
    checks.matrix(op, "x", x)
    checks.matrix(op, "weight", weight)
    checks.like(op, "x", x, "dy", dy)
    checks.like(op, "weight", weight, "dy", dy)
    checks.size_match(op, "dy rows and x rows", dy.shape[0], x.shape[0])
    checks.size_match(op, "dy columns and weight rows", dy.shape[1], weight.shape[0])
    checks.size_match(op, "x columns and weight columns", x.shape[1], weight.shape[1])
    checks.k_range(op, k, dy.shape[1])
    if idx is not None:
        checks.index(op, "idx", idx, idx_dims, dy)
        checks.size_match(op, "k and idx entries", k, idx.shape[-1])
        if idx_dims == 2:
            checks.size_match(op, "idx rows and dy rows", idx.shape[0], dy.shape[0])
        checks.index_values(op, "idx", idx, dy.shape[1], distinct=idx_dims == 1)


def _backward_shapes(dy, x, weight, k, input_grad, weight_grad, bias_grad, rows_only, unified: bool):
    """(dx, dW, db, kept) of a fused backward; an output not asked for is empty (shape (0,))."""
    nothing = dy.new_empty((0,))
    dx = dy.new_empty(x.shape) if input_grad else nothing
    if not weight_grad:
        dw = nothing
    elif not rows_only:
        dw = dy.new_empty(weight.shape)
    elif unified:
        dw = dy.new_empty((k, x.shape[1]))
    else:  # the touched rows: their number depends on the values of idx
        dw = dy.new_empty((torch.library.get_ctx().new_dynamic_size(), x.shape[1]))
    db = dy.new_empty((dy.shape[1],)) if bias_grad else nothing
    if unified:
        kept = dy.new_empty((k,), dtype=torch.long)
    else:
        kept = dy.new_empty((dw.shape[0] if weight_grad and rows_only else 0,), dtype=torch.long)
    return dx, dw, db, kept


_BACKWARD_SIGNATURE = (
    "(Tensor dy, Tensor x, Tensor weight, int k, Tensor? idx, bool input_grad, bool weight_grad, bool bias_grad, "
    "bool rows_only, bool reuse_grad) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _lstm_layer(op: str, weight_ih, weight_hh, tensors) -> tuple:
    """The checks both LSTM ops start with: the two weight matrices, each of ``tensors`` ((name, tensor, dims),
    ``x (T, B, I)`` first) an array like the weights, and the weights' sizes against x's; ``(T, B, H)``."""
    checks.matrix(op, "weight_ih", weight_ih)
    checks.matrix(op, "weight_hh", weight_hh)
    checks.like(op, "weight_hh", weight_hh, "weight_ih", weight_ih)
    for name, t, dims in tensors:
        checks.array(op, name, t, dims)
        checks.like(op, name, t, "weight_ih", weight_ih)
    x = tensors[0][1]
    steps, batch, hidden = x.shape[0], x.shape[1], weight_hh.shape[1]
    checks.size_match(op, "weight_hh rows and 4 * hidden", weight_hh.shape[0], 4 * hidden)
    checks.size_match(op, "weight_ih rows and weight_hh rows", weight_ih.shape[0], weight_hh.shape[0])
    checks.size_match(op, "x features and weight_ih columns", x.shape[2], weight_ih.shape[1])
    return steps, batch, hidden


def _lstm_backward(dout, dh_n, dc_n, x, h_prev, c_prev, gates, weight_ih, weight_hh, batch_sizes, reverse, k,
                   per_gate, per_example, idx) -> None:
    op = "lstm_backward"
    steps, batch, hidden = _lstm_layer(op, weight_ih, weight_hh, (
        ("x", x, 3), ("dout", dout, 3), ("h_prev", h_prev, 3), ("c_prev", c_prev, 3), ("gates", gates, 3),
        ("dh_n", dh_n, 2), ("dc_n", dc_n, 2)))
    state = [steps, batch, hidden]
    for name, t in (("dout", dout), ("h_prev", h_prev), ("c_prev", c_prev)):
        checks.size_match(op, f"{name} shape and (steps, batch, hidden)", list(t.shape), state)
    checks.size_match(op, "gates shape and (steps, batch, 4 * hidden)", list(gates.shape), [steps, batch, 4 * hidden])
    for name, t in (("dh_n", dh_n), ("dc_n", dc_n)):
        checks.size_match(op, f"{name} shape and (batch, hidden)", list(t.shape), [batch, hidden])
    if batch_sizes is not None:
        checks.batch_sizes(op, batch_sizes, steps, batch)
    width = hidden if per_gate else 4 * hidden
    checks.k_range(op, k, width)
    if idx is not None:
        checks.index(op, "idx", idx, 3 if per_example else 2, x)
        kept = 4 * k if per_gate else k
        want = [steps, batch, kept] if per_example else [steps, kept]
        checks.size_match(op, "idx shape and the kept entries' shape", list(idx.shape), want)
        checks.index_values(op, "idx", idx, 4 * hidden)


def _lstm_shapes(dout, dh_n, dc_n, x, h_prev, c_prev, gates, weight_ih, weight_hh, *rest):
    """(dx, dh0, dc0, dW_ih, dW_hh, db) of lstm_backward."""
    return (x.new_empty(x.shape), x.new_empty(dh_n.shape), x.new_empty(dc_n.shape), x.new_empty(weight_ih.shape),
            x.new_empty(weight_hh.shape), x.new_empty((weight_hh.shape[0],)))


_LSTM_BACKWARD = OpDef(
    "lstm_backward",
    "(Tensor dout, Tensor dh_n, Tensor dc_n, Tensor x, Tensor h_prev, Tensor c_prev, Tensor gates, Tensor weight_ih, "
    "Tensor weight_hh, int[]? batch_sizes, bool reverse, int k, bool per_gate, bool per_example, Tensor? idx) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _lstm_backward,
    _lstm_shapes,
    "meProp BPTT of one LSTM layer and direction for the whole sequence: (dx (T, B, I), dh0 (B, H), dc0 (B, H), "
    "dW_ih (4H, I), dW_hh (4H, H), db (4H,)); at every step the gate gradient keeps its top k entries per gate "
    "(per_gate) or of all 4H, unified or per_example, or the given idx; see meprop.lstm_reference.",
)


def _lstm_forward(x, h0, c0, weight_ih, weight_hh, bias, batch_sizes, reverse) -> None:
    op = "lstm_forward"
    steps, batch, hidden = _lstm_layer(op, weight_ih, weight_hh, (("x", x, 3), ("h0", h0, 2), ("c0", c0, 2)))
    for name, t in (("h0", h0), ("c0", c0)):
        checks.size_match(op, f"{name} shape and (batch, hidden)", list(t.shape), [batch, hidden])
    if bias is not None:
        checks.array(op, "bias", bias, 1)
        checks.like(op, "bias", bias, "weight_ih", weight_ih)
        checks.size_match(op, "bias size and 4 * hidden", bias.shape[0], 4 * hidden)
    if batch_sizes is not None:
        checks.batch_sizes(op, batch_sizes, steps, batch)


def _lstm_forward_shapes(x, h0, c0, weight_ih, weight_hh, *rest):
    """(hs (T + 1, B, H), cs (T + 1, B, H), gates (T, B, 4H)) of lstm_forward."""
    steps, batch, hidden = x.shape[0], x.shape[1], weight_hh.shape[1]
    return (x.new_empty((steps + 1, batch, hidden)), x.new_empty((steps + 1, batch, hidden)),
            x.new_empty((steps, batch, 4 * hidden)))


_LSTM_FORWARD = OpDef(
    "lstm_forward",
    "(Tensor x, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor? bias, int[]? batch_sizes, "
    "bool reverse) -> (Tensor, Tensor, Tensor)",
    _lstm_forward,
    _lstm_forward_shapes,
    "nn.LSTM's forward of one layer and direction for the whole sequence, keeping what meProp's BPTT needs: "
    "(hs (T + 1, B, H), cs (T + 1, B, H), gates (T, B, 4H) activated); bias = b_ih + b_hh or None; see "
    "meprop.lstm_reference.lstm_forward.",
)


def _table(*defs: OpDef) -> dict[str, OpDef]:
    return {d.name: d for d in defs}


OPS: dict[str, OpDef] = _table(
    OpDef(
        "topk_unified",
        "(Tensor dy, int k) -> Tensor",
        lambda dy, k: _topk("topk_unified", dy, k),
        lambda dy, k: dy.new_empty((k,), dtype=torch.long),
        "idx (k,) int64: the k columns of dy (N, out) with the largest sum_n |dy[n, j]|, in selection order.",
    ),
    OpDef(
        "column_scores",
        "(Tensor dy) -> Tensor",
        lambda dy: checks.matrix("column_scores", "dy", dy),
        lambda dy: dy.new_empty((dy.shape[1],), dtype=accumulate_dtype(dy.dtype)),
        "scores (out,) = sum_n |dy[n, j]| of dy (N, out), in the accumulation dtype: what topk_unified ranks.",
    ),
    OpDef(
        "topk_unified_feedback",
        "(Tensor dy, Tensor memory, int k, float decay, bool bias_grad) -> (Tensor, Tensor, Tensor)",
        _topk_feedback,
        _topk_feedback_shapes,
        "Unified top-k with error feedback, in one pass over dy (N, out): (kept (k,), memory' (out,), db). The ranked "
        "scores are r = sum_n |dy[n, j]| + memory (memory (out,) in the accumulation dtype); kept = the k columns of "
        "largest |r| in selection order; memory' = decay * r with the kept columns 0; db = sum_n dy when bias_grad, "
        "else empty. See meprop.selection.",
    ),
    OpDef(
        "topk_rows",
        "(Tensor dy, int k) -> (Tensor, Tensor)",
        lambda dy, k: _topk("topk_rows", dy, k),
        lambda dy, k: (dy.new_empty((dy.shape[0], k)), dy.new_empty((dy.shape[0], k), dtype=torch.long)),
        "(vals, idx), both (N, k): the k entries of each row of dy (N, out) largest in magnitude.",
    ),
    OpDef(
        "linear_input_grad_unified",
        "(Tensor dy, Tensor weight, Tensor idx) -> Tensor",
        _input_grad_unified,
        lambda dy, weight, idx: dy.new_empty((dy.shape[0], weight.shape[1])),
        "dx (N, in) = dy[:, idx] @ W[idx, :] for idx (k,).",
    ),
    OpDef(
        "linear_weight_grad_unified",
        "(Tensor dy, Tensor x, Tensor idx) -> Tensor",
        _weight_grad_unified,
        lambda dy, x, idx: dy.new_empty((idx.shape[0], x.shape[1])),
        "dW_rows (k, in) = dy[:, idx]^T @ x: the kept rows of the weight gradient.",
    ),
    OpDef(
        "linear_input_grad_rows",
        "(Tensor vals, Tensor idx, Tensor weight) -> Tensor",
        _input_grad_rows,
        lambda vals, idx, weight: vals.new_empty((vals.shape[0], weight.shape[1])),
        "dx (N, in), dx[n] = sum_i vals[n, i] W[idx[n, i], :] for vals, idx (N, k).",
    ),
    OpDef(
        "linear_weight_grad_rows",
        "(Tensor vals, Tensor idx, Tensor x, int out_features, Tensor? rows) -> Tensor",
        _weight_grad_rows,
        lambda vals, idx, x, out_features, rows=None: vals.new_empty(
            (out_features if rows is None else rows.shape[0], x.shape[1])
        ),
        "dW (out_features, in), dW[j] = sum over idx[n, i] == j of vals[n, i] x[n]; with rows (r,), only those rows.",
    ),
    OpDef(
        "linear_backward_unified",
        _BACKWARD_SIGNATURE,
        lambda dy, x, weight, k, idx, *flags: _linear_backward("linear_backward_unified", dy, x, weight, k, idx, 1),
        lambda dy, x, weight, k, idx, i, w, b, rows_only, reuse: _backward_shapes(dy, x, weight, k, i, w, b, rows_only, True),
        "The whole unified backward of y = x W^T + b in one call: (dx (N, in), dW, db (out,), kept (k,)); kept = idx "
        "(k distinct columns, a random-k draw) or the top-k columns of dy; dW dense (out, in), or with rows_only the "
        "kept rows (k, in) with kept ascending; outputs not asked for are empty. reuse_grad: the dense dW may be the "
        "buffer returned for this weight last time (see meprop.functional).",
    ),
    OpDef(
        "linear_backward_rows",
        _BACKWARD_SIGNATURE,
        lambda dy, x, weight, k, idx, *flags: _linear_backward("linear_backward_rows", dy, x, weight, k, idx, 2),
        lambda dy, x, weight, k, idx, i, w, b, rows_only, reuse: _backward_shapes(dy, x, weight, k, i, w, b, rows_only, False),
        "The whole per-example backward in one call: (dx, dW, db, rows); the kept entries are idx (N, k) or the "
        "per-row top k of |dy|; dW dense (out, in), or with rows_only the touched rows (r, in) and rows (r,) their "
        "ascending indices; outputs not asked for are empty.",
    ),
    OpDef(
        "scatter_rows",
        "(Tensor rows, Tensor idx, int out_features) -> Tensor",
        _scatter_rows,
        lambda rows, idx, out_features: rows.new_empty((out_features, rows.shape[1])),
        "(out_features, in) holding rows[i] at row idx[i] (distinct) and zeros elsewhere.",
    ),
    _LSTM_FORWARD,
    _LSTM_BACKWARD,
)

OP_NAMES: tuple[str, ...] = tuple(OPS)


def register_fakes(namespace: str) -> None:
    """Register every op's fake kernel for ``<namespace>::<name>`` (the ops must already be defined)."""
    for op in OPS.values():
        torch.library.register_fake(f"{namespace}::{op.name}")(op.fake)
