"""``meprop.LSTM``: a drop-in ``nn.LSTM`` whose BPTT keeps only the top-k entries of each step's gate gradient.

Each layer and direction is one call of the op ``lstm_forward`` (``nn.LSTM``'s forward: one input GEMM for the
whole sequence, then per step the recurrent GEMM and the cell, saving the activated gates and states) and, in
backward, one call of ``lstm_backward`` (semantics of both: :mod:`meprop.lstm_reference`) on the chosen backend.

``k`` counts per gate by default (``k_scope="gate"``: each of the gates i, f, g, o keeps ``k`` of its ``H``
entries, ``4k`` in all), as the paper states ``k`` against the hidden size (top-10 of an LSTM of 500, "k
divided by the vector dimension"); ``k_scope="all"`` keeps ``k`` of all ``4H``. ``k >=`` that width, or
None, runs ``nn.LSTM`` itself: exactly its gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import backends, functional

__all__ = ["LSTM", "K_SCOPES"]

K_SCOPES = ("gate", "all")


def _random_idx(steps, batch, hidden, k, per_gate, per_example, generator, device):
    """A uniform draw of the kept entries of every step (the random-k baseline), in lstm_backward's layout."""
    groups, width = (4, hidden) if per_gate else (1, 4 * hidden)
    shape = (steps, batch, groups, width) if per_example else (steps, groups, width)
    keys = torch.rand(shape, generator=generator, device=device)
    idx = keys.topk(k, dim=-1).indices.sort(dim=-1).values
    idx = idx + torch.arange(groups, device=device).unsqueeze(-1) * width
    return idx.flatten(-2)


class _LSTMLayer(torch.autograd.Function):
    """One layer and direction: ``nn.LSTM``'s forward (one ``lstm_forward`` call), meProp's BPTT (one
    ``lstm_backward`` call)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, k, per_gate, mode, backend, generator):
        bias = None if b_ih is None else b_ih + b_hh
        hs, cs, gates = backends.get(backend).lstm_forward(x, h0, c0, w_ih, w_hh, bias, batch_sizes, reverse)
        steps = x.shape[0]
        out, h_prev, c_prev = (hs[:steps], hs[1:], cs[1:]) if reverse else (hs[1:], hs[:steps], cs[:steps])
        last = 0 if reverse else steps
        ctx.save_for_backward(x, w_ih, w_hh, h_prev, c_prev, gates)
        ctx.options = (batch_sizes, reverse, k, per_gate, mode, backend, generator, b_ih is not None)
        return out, hs[last].clone(), cs[last].clone()

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        x, w_ih, w_hh, h_prev, c_prev, gates = ctx.saved_tensors
        batch_sizes, reverse, k, per_gate, mode, backend, generator, has_bias = ctx.options
        steps, batch, hidden = h_prev.shape
        dout = torch.zeros_like(h_prev) if dout is None else dout.contiguous()
        dh_n = h_prev.new_zeros((batch, hidden)) if dh_n is None else dh_n.contiguous()
        dc_n = h_prev.new_zeros((batch, hidden)) if dc_n is None else dc_n.contiguous()
        per_example = mode in ("per_example", "random_per_example")
        idx = None
        if mode.startswith("random"):
            idx = _random_idx(steps, batch, hidden, k, per_gate, per_example, generator, x.device)
        run = backends.get(backend).lstm_backward
        dx, dh0, dc0, dw_ih, dw_hh, db = run(
            dout, dh_n, dc_n, x, h_prev, c_prev, gates, w_ih, w_hh, batch_sizes, reverse, k, per_gate, per_example, idx
        )
        need = ctx.needs_input_grad
        db_ih = db if has_bias and need[5] else None
        db_hh = (db.clone() if db_ih is not None else db) if has_bias and need[6] else None
        return (dx if need[0] else None, dh0 if need[1] else None, dc0 if need[2] else None,
                dw_ih if need[3] else None, dw_hh if need[4] else None, db_ih, db_hh,
                None, None, None, None, None, None, None)


class LSTM(nn.LSTM):
    """``nn.LSTM`` whose backward keeps only the top-k entries of each step's gate gradient (meProp's BPTT).

    Same parameters, names, initialisation, forward and ``state_dict`` as ``nn.LSTM``; inputs ``(T, B, I)``,
    ``(B, T, I)`` with ``batch_first``, ``(T, I)`` unbatched, or a ``PackedSequence``; ``(h0, c0)`` each
    ``(num_layers * directions, B, H)``. ``proj_size`` is not supported (NotImplementedError).

    Args:
        *args, **kwargs: those of ``nn.LSTM`` (input_size, hidden_size, num_layers, bias, batch_first,
            dropout, bidirectional, device, dtype).
        k: kept entries per step (int >= 1, or a ratio in (0, 1] of the width); None or ``k >=`` the width
            runs ``nn.LSTM`` itself (exactly its gradients).
        k_scope: ``"gate"`` (default: each gate keeps ``k`` of its ``H`` entries, as the paper counts ``k``)
            or ``"all"`` (``k`` of all ``4H``); the width is ``H`` or ``4H``.
        mode: ``"unified"`` (the same entries for the whole batch at a step), ``"per_example"``,
            ``"random_unified"`` or ``"random_per_example"``.
        backend: None (automatic) or one of ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``.
        generator: random source for the random modes.
    """

    def __init__(self, *args, k, k_scope: str = "gate", mode: str = "unified", backend: str | None = None,
                 generator: torch.Generator | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.proj_size > 0:
            raise NotImplementedError(f"{self._where}: proj_size > 0 is not supported (use proj_size=0)")
        if k_scope not in K_SCOPES:
            raise ValueError(f"{self._where}: k_scope must be one of {K_SCOPES}, got {k_scope!r}")
        self.k_scope = k_scope
        functional.check_options(mode, backend, self._where)
        self.mode, self.backend, self.generator = mode, backend, generator
        self.k = k

    @property
    def _where(self) -> str:
        return f"meprop.LSTM({self.input_size}, {self.hidden_size})"

    @property
    def k(self):
        """Kept entries as given (int, ratio or None); checked when set."""
        return self._k

    @k.setter
    def k(self, value) -> None:
        width = self.hidden_size if self.k_scope == "gate" else 4 * self.hidden_size
        self._resolved = functional.resolve_k(value, width, self._where)
        self._k = value

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, **options) -> LSTM:
        """A meprop.LSTM sharing ``lstm``'s parameter objects (so existing optimizers keep working)."""
        layer = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias, batch_first=lstm.batch_first,
                    dropout=lstm.dropout, bidirectional=lstm.bidirectional, proj_size=lstm.proj_size, device="meta",
                    **options)
        for name in lstm._flat_weights_names:
            setattr(layer, name, getattr(lstm, name))
        layer.train(lstm.training)
        return layer

    def _check(self, x: torch.Tensor, hx) -> None:
        weight = self.weight_ih_l0
        for name, t in (("input", x), ("h0", None if hx is None else hx[0]), ("c0", None if hx is None else hx[1])):
            if t is None:
                continue
            if not t.is_floating_point():
                raise TypeError(f"{self._where}: {name} must be a floating-point tensor, got {t.dtype}")
            if t.dtype != weight.dtype:
                raise TypeError(f"{self._where}: {name} is {t.dtype} but the weights are {weight.dtype}")
            if t.device != weight.device:
                raise ValueError(f"{self._where}: {name} is on {t.device} but the weights are on {weight.device}")

    def forward(self, input, hx=None):
        k = self._resolved
        needs_grad = torch.is_grad_enabled() and (
            any(p.requires_grad for p in self._flat_weights if p is not None)
            or (input.data if isinstance(input, PackedSequence) else input).requires_grad
        )
        if k is None or not needs_grad:
            return super().forward(input, hx)
        return self._sparse_forward(input, hx, k)

    def _sparse_forward(self, input, hx, k):
        directions = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        unbatched = not packed and input.dim() == 2
        if packed:
            data, sizes = input.data, input.batch_sizes
            batch_sizes = sizes.tolist()
            steps, batch = len(batch_sizes), batch_sizes[0]
            # The packed rows' places in a (T, B) grid: step t holds rows [0, batch_sizes[t]).
            places = torch.cat([torch.arange(b, device=data.device) + t * batch for t, b in enumerate(batch_sizes)])
            x = data.new_zeros((steps * batch, data.shape[1])).index_copy(0, places, data).view(steps, batch, -1)
            if hx is not None:
                hx = self.permute_hidden(hx, input.sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{self._where}: input must be 2-D (unbatched) or 3-D, got shape {list(input.shape)}")
            batch_sizes = None
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
            if unbatched and hx is not None:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            batch = x.shape[1]
        self._check(x, hx)
        if hx is None:
            zeros = x.new_zeros((self.num_layers * directions, batch, self.hidden_size))
            hx = (zeros, zeros)
        per_gate = self.k_scope == "gate"
        backend = backends.resolve(self.backend, x.device, x.dtype, k).name
        layer_input, h_n, c_n = x.contiguous(), [], []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                slot = layer * directions + direction
                out, h, c = _LSTMLayer.apply(
                    layer_input, hx[0][slot], hx[1][slot], getattr(self, "weight_ih" + suffix),
                    getattr(self, "weight_hh" + suffix), getattr(self, "bias_ih" + suffix, None),
                    getattr(self, "bias_hh" + suffix, None), batch_sizes, direction == 1, k, per_gate, self.mode,
                    backend, self.generator,
                )
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if directions == 1 else torch.cat(outs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if packed:
            output = PackedSequence(layer_input.reshape(steps * batch, -1).index_select(0, places), sizes,
                                    input.sorted_indices, input.unsorted_indices)
            return output, self.permute_hidden((h_n, c_n), input.unsorted_indices)
        if unbatched:
            return layer_input.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        return output, (h_n, c_n)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, k={self.k}, k_scope={self.k_scope!r}, mode={self.mode!r}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text
