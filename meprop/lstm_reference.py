"""Pure-PyTorch reference of meProp's LSTM ops: ``lstm_forward`` (``nn.LSTM``'s step loop, keeping the states
and activated gates) and ``lstm_backward`` (a readable per-step BPTT loop).

One layer and one direction of an ``nn.LSTM`` (gate order i, f, g, o). At step t the gate pre-activations are
``a_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh``; in BPTT their gradient ``da_t (B, 4H)`` keeps only its
top-k entries, and all four products (to ``dx_t``, ``dh_{t-1}``, ``dW_ih``, ``dW_hh``) use the kept entries
only. The elementwise cell path (``dc_{t-1} = dc_t * f_t``) and the bias gradient (``sum_n da_t``) stay dense.

Selection (the unified / per-example rules and the tie order of :mod:`meprop.reference`):

- ``per_gate=True`` (the default of ``meprop.LSTM``, as the paper counts ``k`` of a hidden size of 500):
  each gate keeps ``k`` of its ``H`` entries, ``4k`` in all, in gate order;
- ``per_gate=False``: ``k`` of all ``4H`` entries.
- unified: the same entries for the whole batch at that step, by ``sum_n |da_t[n, j]|``; per-example: per row.

Packed sequences: ``batch_sizes[t]`` rows (a prefix, non-increasing in t) take part in step t; the others carry
their state and its gradient unchanged. An index repeated in a given ``idx`` counts as often as it appears.
"""

from __future__ import annotations

import torch

from . import reference
from .opdefs import OPS, accumulate_dtype

__all__ = ["lstm_backward", "lstm_forward", "lstm_select"]


def lstm_forward(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor | None,
    batch_sizes: list[int] | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``nn.LSTM``'s forward of one layer and direction over ``x (T, B, I)`` from ``h0, c0 (B, H)``.

    ``bias (4H,)``: ``b_ih + b_hh``, or None. ``batch_sizes``: rows taking part in each step (as in
    lstm_backward), or None; rows not taking part carry their state. Returns ``(hs, cs, gates)`` in the inputs'
    dtype (computed in the accumulation dtype): ``hs, cs (T + 1, B, H)`` the states in processing order's
    storage (forward: ``hs[t]`` before step t, ``hs[t + 1]`` after; reverse: ``hs[t + 1]`` before, ``hs[t]``
    after) and ``gates (T, B, 4H)`` the activated gates ``sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)`` (zero in
    rows not taking part).
    """
    OPS["lstm_forward"].check(x, h0, c0, weight_ih, weight_hh, bias, batch_sizes, reverse)
    acc = accumulate_dtype(x.dtype)
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    w_hh = weight_hh.to(acc)
    xw = torch.nn.functional.linear(x.to(acc), weight_ih.to(acc), None if bias is None else bias.to(acc))
    hs, cs = xw.new_empty((steps + 1, batch, hidden)), xw.new_empty((steps + 1, batch, hidden))
    gates = xw.new_empty((steps, batch, 4 * hidden))
    start = steps if reverse else 0
    hs[start], cs[start] = h0.to(acc), c0.to(acc)
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        before, after = (t + 1, t) if reverse else (t, t + 1)
        b = batch if batch_sizes is None else batch_sizes[t]
        a = xw[t, :b] + hs[before, :b] @ w_hh.t()
        i, f, g, o = a.chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        gates[t, :b] = torch.cat([i, f, g, o], dim=1)
        gates[t, b:] = 0
        cs[after, :b] = f * cs[before, :b] + i * g
        hs[after, :b] = o * cs[after, :b].tanh()
        hs[after, b:], cs[after, b:] = hs[before, b:], cs[before, b:]
    return hs.to(x.dtype), cs.to(x.dtype), gates.to(x.dtype)


def lstm_select(da: torch.Tensor, k: int, per_gate: bool, per_example: bool) -> torch.Tensor:
    """The kept entries of one step's gate gradient ``da (B, 4H)``: ``(kk,)`` columns (unified) or ``(B, kk)``
    per row (per-example), ``kk = 4k`` with ``per_gate`` (gate by gate, each in selection order) else ``k``."""
    if not per_gate:
        return reference.topk_rows(da, k)[1] if per_example else reference.topk_unified(da, k)
    hidden = da.shape[1] // 4
    parts = []
    for gate in range(4):
        block = da[:, gate * hidden : (gate + 1) * hidden]
        chosen = reference.topk_rows(block, k)[1] if per_example else reference.topk_unified(block, k)
        parts.append(chosen + gate * hidden)
    return torch.cat(parts, dim=-1)


def lstm_backward(
    dout: torch.Tensor,
    dh_n: torch.Tensor,
    dc_n: torch.Tensor,
    x: torch.Tensor,
    h_prev: torch.Tensor,
    c_prev: torch.Tensor,
    gates: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    batch_sizes: list[int] | None,
    reverse: bool,
    k: int,
    per_gate: bool,
    per_example: bool,
    idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """meProp BPTT of one LSTM layer and direction: ``(dx, dh0, dc0, dW_ih, dW_hh, db)``.

    Args:
        dout: ``(T, B, H)`` gradient of the outputs ``h_t``; dh_n, dc_n: ``(B, H)`` of the final state.
        x: ``(T, B, I)`` inputs; h_prev, c_prev: ``(T, B, H)`` the state before step t (every row);
        gates: ``(T, B, 4H)`` the activated gates ``sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)`` of step t.
        weight_ih ``(4H, I)``, weight_hh ``(4H, H)``.
        batch_sizes: rows taking part in each step (a non-increasing list of T ints), or None (all B).
        reverse: the steps ran from T-1 down to 0 (the backward direction of a bidirectional LSTM).
        k: kept entries per gate (``per_gate``) or of all 4H; ``1 <= k <=`` that width.
        per_example: per-row selection, else unified.
        idx: given kept entries (a random draw): ``(T, kk)`` unified or ``(T, B, kk)`` per-example, indices
            into 4H; None selects the top-k.

    Returns:
        dx ``(T, B, I)`` (zero in rows not taking part), dh0 and dc0 ``(B, H)``, dW_ih ``(4H, I)``,
        dW_hh ``(4H, H)``, db ``(4H,)`` (the gradient of each of b_ih and b_hh), in the inputs' dtype.
    """
    OPS["lstm_backward"].check(
        dout, dh_n, dc_n, x, h_prev, c_prev, gates, weight_ih, weight_hh, batch_sizes, reverse, k, per_gate,
        per_example, idx,
    )
    acc = accumulate_dtype(x.dtype)
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    w_ih, w_hh = weight_ih.to(acc), weight_hh.to(acc)
    dh, dc = dh_n.to(acc).clone(), dc_n.to(acc).clone()
    dx = x.new_zeros(x.shape, dtype=acc)
    dw_ih, dw_hh = torch.zeros_like(w_ih), torch.zeros_like(w_hh)
    db = w_hh.new_zeros(4 * hidden)
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in reversed(order):  # backward: the forward's steps in the opposite order
        b = batch if batch_sizes is None else batch_sizes[t]
        i, f, g, o = gates[t, :b].to(acc).chunk(4, dim=1)
        cp = c_prev[t, :b].to(acc)
        tanh_c = torch.tanh(f * cp + i * g)
        dh_t = dh[:b] + dout[t, :b].to(acc)
        dc_t = dc[:b] + dh_t * o * (1 - tanh_c * tanh_c)
        da = torch.cat([dc_t * g * i * (1 - i), dc_t * cp * f * (1 - f), dc_t * i * (1 - g * g), dh_t * tanh_c * o * (1 - o)], 1)
        db += da.sum(0)
        dc[:b] = dc_t * f
        hp, xt = h_prev[t, :b].to(acc), x[t, :b].to(acc)
        if idx is not None:
            kept = idx[t, :b] if per_example else idx[t]
        else:
            kept = lstm_select(da, k, per_gate, per_example)
        if per_example:  # the sparse products of meprop.reference, in the accumulation dtype
            vals = da.gather(1, kept)
            dh[:b] = reference.linear_input_grad_rows(vals, kept, w_hh)
            dx[t, :b] = reference.linear_input_grad_rows(vals, kept, w_ih)
            dw_hh += reference.linear_weight_grad_rows(vals, kept, hp, 4 * hidden)
            dw_ih += reference.linear_weight_grad_rows(vals, kept, xt, 4 * hidden)
        else:
            dh[:b] = reference.linear_input_grad_unified(da, w_hh, kept)
            dx[t, :b] = reference.linear_input_grad_unified(da, w_ih, kept)
            dw_hh.index_add_(0, kept, reference.linear_weight_grad_unified(da, hp, kept))
            dw_ih.index_add_(0, kept, reference.linear_weight_grad_unified(da, xt, kept))
    dtype = x.dtype
    return dx.to(dtype), dh.to(dtype), dc.to(dtype), dw_ih.to(dtype), dw_hh.to(dtype), db.to(dtype)
