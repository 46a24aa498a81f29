"""``lstm_backward`` on the Triton backend: the step loop in Python, each step's selection and products on the
Triton ops of :mod:`.ops` (semantics: ``meprop.lstm_reference``); the elementwise gate gradient in PyTorch.
Computed in float32 (the Triton kernels' accumulation type) and returned in the inputs' dtype."""

from typing import Optional

import torch

from . import ops
from ._runtime import library_op


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
