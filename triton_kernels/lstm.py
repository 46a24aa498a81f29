"""The LSTM ops on the Triton backend (semantics: ``meprop.lstm_reference``), the step loop in Python.

``lstm_forward``: each step's recurrent GEMM in PyTorch, the cell (gate activations, c_t, h_t) one Triton kernel.
``lstm_backward``: each step's selection and products on the Triton ops of :mod:`.ops`; the elementwise gate
gradient in PyTorch. Computed in float32 (the Triton kernels' accumulation type), returned in the inputs' dtype."""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import ops
from ._runtime import launch, library_op

_CELL_BLOCK = 256


@triton.jit
def lstm_cell_kernel(gates_ptr, h_prev_ptr, c_prev_ptr, h_ptr, c_ptr, batch, b, hidden, BLOCK: tl.constexpr):
    """One program per BLOCK (row, unit) pairs of gates (batch, 4H): rows < b activate their pre-activations in
    place and write c and h; rows >= b carry their state and get zero gates."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = e < batch * hidden
    n, j = e // hidden, e % hidden
    live = inside & (n < b)
    g = gates_ptr + n * 4 * hidden + j
    i = tl.sigmoid(tl.load(g, mask=live, other=0.0))
    f = tl.sigmoid(tl.load(g + hidden, mask=live, other=0.0))
    a = tl.load(g + 2 * hidden, mask=live, other=0.0)
    gg = 2.0 * tl.sigmoid(2.0 * a) - 1.0  # tanh
    o = tl.sigmoid(tl.load(g + 3 * hidden, mask=live, other=0.0))
    cp = tl.load(c_prev_ptr + e, mask=inside, other=0.0)
    hp = tl.load(h_prev_ptr + e, mask=inside, other=0.0)
    c = f * cp + i * gg
    h = o * (2.0 * tl.sigmoid(2.0 * c) - 1.0)
    tl.store(g, tl.where(live, i, 0.0), mask=inside)
    tl.store(g + hidden, tl.where(live, f, 0.0), mask=inside)
    tl.store(g + 2 * hidden, tl.where(live, gg, 0.0), mask=inside)
    tl.store(g + 3 * hidden, tl.where(live, o, 0.0), mask=inside)
    tl.store(c_ptr + e, tl.where(live, c, cp), mask=inside)
    tl.store(h_ptr + e, tl.where(live, h, hp), mask=inside)


@library_op("lstm_forward")
def lstm_forward(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: Optional[torch.Tensor],
    batch_sizes: Optional[list[int]],
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn.LSTM's forward of one layer and direction (see meprop.opdefs): a Python loop over the steps."""
    f32 = torch.float32
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    w_hh_t = weight_hh.to(f32).t()
    gates = torch.nn.functional.linear(x.to(f32), weight_ih.to(f32), None if bias is None else bias.to(f32))
    hs = torch.empty((steps + 1, batch, hidden), dtype=f32, device=x.device)
    cs = torch.empty_like(hs)
    start = steps if reverse else 0
    hs[start], cs[start] = h0.to(f32), c0.to(f32)
    grid = (triton.cdiv(batch * hidden, _CELL_BLOCK),)
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        before, after = (t + 1, t) if reverse else (t, t + 1)
        b = batch if batch_sizes is None else batch_sizes[t]
        if b > 0:
            gates[t, :b].addmm_(hs[before, :b], w_hh_t)
        if batch * hidden > 0:
            launch(lstm_cell_kernel)[grid](gates[t], hs[before], cs[before], hs[after], cs[after], batch, b, hidden,
                                          BLOCK=_CELL_BLOCK)
    dtype = x.dtype
    return hs.to(dtype), cs.to(dtype), gates.to(dtype)


def _select(da: torch.Tensor, k: int, per_gate: bool, per_example: bool) -> torch.Tensor:
    """The kept entries of da (b, 4H): (kept,) unified or (b, kept) per example, gate by gate with per_gate."""
    groups = 4 if per_gate else 1
    width = da.shape[1] // groups
    parts = []
    for gate in range(groups):
        block = da[:, gate * width : (gate + 1) * width].contiguous()
        chosen = ops.topk_rows(block, k)[1] if per_example else ops.topk_unified(block, k)
        parts.append(chosen + gate * width)
    return torch.cat(parts, dim=-1)


@library_op("lstm_backward")
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
    batch_sizes: Optional[list[int]],
    reverse: bool,
    k: int,
    per_gate: bool,
    per_example: bool,
    idx: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """meProp BPTT of one layer and direction (see meprop.opdefs): a Python loop over the steps."""
    f32 = torch.float32
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    w_ih, w_hh = weight_ih.to(f32).contiguous(), weight_hh.to(f32).contiguous()
    dh, dc = dh_n.to(f32).clone(), dc_n.to(f32).clone()
    dx = torch.zeros(x.shape, dtype=f32, device=x.device)
    dw_ih, dw_hh = torch.zeros_like(w_ih), torch.zeros_like(w_hh)
    db = torch.zeros(4 * hidden, dtype=f32, device=x.device)
    for t in range(steps) if reverse else range(steps - 1, -1, -1):  # the forward's steps in the opposite order
        b = batch if batch_sizes is None else batch_sizes[t]
        if b == 0:
            continue
        i, f, g, o = gates[t, :b].to(f32).chunk(4, dim=1)
        cp = c_prev[t, :b].to(f32)
        tanh_c = torch.tanh(f * cp + i * g)
        dh_t = dh[:b] + dout[t, :b].to(f32)
        dc_t = dc[:b] + dh_t * o * (1 - tanh_c * tanh_c)
        da = torch.cat([dc_t * g * i * (1 - i), dc_t * cp * f * (1 - f), dc_t * i * (1 - g * g),
                        dh_t * tanh_c * o * (1 - o)], 1)
        db += da.sum(0)
        dc[:b] = dc_t * f
        hp, xt = h_prev[t, :b].to(f32).contiguous(), x[t, :b].to(f32).contiguous()
        if idx is not None:
            kept = (idx[t, :b] if per_example else idx[t]).contiguous()
        else:
            kept = _select(da, k, per_gate, per_example)
        if per_example:
            vals = da.gather(1, kept)
            dh[:b] = ops.linear_input_grad_rows(vals, kept, w_hh)
            dx[t, :b] = ops.linear_input_grad_rows(vals, kept, w_ih)
            dw_hh += ops.linear_weight_grad_rows(vals, kept, hp, 4 * hidden, None)
            dw_ih += ops.linear_weight_grad_rows(vals, kept, xt, 4 * hidden, None)
        else:
            dh[:b] = ops.linear_input_grad_unified(da, w_hh, kept)
            dx[t, :b] = ops.linear_input_grad_unified(da, w_ih, kept)
            dw_hh.index_add_(0, kept, ops.linear_weight_grad_unified(da, hp, kept))
            dw_ih.index_add_(0, kept, ops.linear_weight_grad_unified(da, xt, kept))
    dtype = x.dtype
    return dx.to(dtype), dh.to(dtype), dc.to(dtype), dw_ih.to(dtype), dw_hh.to(dtype), db.to(dtype)
