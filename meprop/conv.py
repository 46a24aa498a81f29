"""``meprop.Conv2d``: a drop-in ``nn.Conv2d`` whose backward keeps only ``k`` output channels.

Unified selection (design notes, section 8): for the output gradient ``dy (N, C_out, H, W)`` the channel score
is ``s_c = sum_{n,h,w} |dy[n, c, h, w]|``; the ``k`` channels ``S`` with the largest scores are kept (ties by
lower index). ``dx`` is the input gradient of the convolution by ``W[S]`` of ``dy[:, S]``, ``dW[S]`` its weight
gradient, the other rows of ``dW`` are zero, ``db = sum_{n,h,w} dy`` is dense. The work is that of a
convolution with ``k`` output channels, not a dense product with a mask:

- ``backend=None``, ``"cpu"`` or ``"cuda"``: ATen kernels on the compacted operands ``dy[:, S]``
  (``(N, k, H, W)``) and ``W[S]`` (``(k, C_in, kh, kw)``); no meprop C++ op is added. On CPU with stride 1
  (NCHW or channels-last) and at least ``SHIFTS_MIN_INPUT`` input values per example: two GEMMs against shifted copies of the small ``dy[:, S]`` (one strided copy per
  kernel tap, a chunk of examples at a time), ``dx[n] = W[S]^T cols[n]`` and ``dW[S] = sum_n cols[n] x[n]^T``,
  so ``x`` and ``dx`` stay in their own layout. Otherwise (CUDA, stride > 1, small inputs): ``dx`` is the transposed
  convolution of ``dy[:, S]`` by ``W[S]``, ``dW[S]`` ``convolution_backward``'s weight gradient, both in the
  channels-last layout (oneDNN / cuDNN kernels for a ``k``-channel convolution).
- ``backend="reference"``: the same products written over the im2col view, in pure PyTorch: ``cols =
  unfold(x)`` ``(N, C_in kh kw, L)``, ``dW[S] = dy[:, S] cols^T``, ``dx = fold(W[S]^T dy[:, S])``.

``mode="random_unified"`` draws ``S`` uniformly (the random-k baseline). Per-example selection (a channel set
per example) is not provided: it splits the batch into ``N`` convolutions with different weight subsets, each
of ``k`` channels, whose kernels run far below the rate of one batched convolution, so it is slower than the
dense backward on this CPU (see the README). ``k`` may be a :class:`meprop.Adaptive`, and ``error_feedback``
carries the dropped channels' scores into the next selection (:mod:`meprop.selection`). Only ``groups=1``.
Second derivatives through the sparse backward are not supported.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import functional, selection
from .opdefs import accumulate_dtype

__all__ = ["Conv2d", "conv2d", "conv2d_backward"]

CONV_MODES = ("unified", "random_unified")
CONV_BACKENDS = ("reference", "cpu", "cuda")


def _compacted_aten(grad_output, kept, x, w, stride, padding, dilation, need_dx, need_dw):
    dy = _gather_channels(grad_output, kept)
    # oneDNN runs these k-channel convolutions several times faster in the channels-last layout than in NCHW
    # (measured: batch 64, 64 channels, 32x32, k=8), so the operands are converted and dx converted back.
    layout = torch.channels_last
    dy, xl = dy.contiguous(memory_format=layout), x.contiguous(memory_format=layout)
    dx = dw = None
    if need_dx:  # the transposed convolution of dy[:, S] by W[S]
        grown = [
            (o - 1) * s - 2 * p + d * (kk - 1) + 1
            for o, s, p, d, kk in zip(dy.shape[2:], stride, padding, dilation, w.shape[2:])
        ]
        extra = [i - g for i, g in zip(x.shape[2:], grown)]
        dx = F.conv_transpose2d(dy, w, None, stride, padding, extra, 1, dilation)
        dx = dx.contiguous(memory_format=layout if x.is_contiguous(memory_format=layout) else torch.contiguous_format)
    if need_dw:
        _, dw, _ = torch.ops.aten.convolution_backward(
            dy, xl, w, None, stride, padding, dilation, False, [0, 0], 1, [False, True, False]
        )
    return dx, dw


# Bytes of shifted dy copies built at once by _compacted_shifts (a chunk of examples; at least one example).
SHIFTS_BUDGET = 4 << 20
# Smallest input per example (C_in * H * W) for which the CPU backward takes _compacted_shifts: below it the
# layout conversions of the oneDNN path are cheap and its convolutions win (benchmarks/conv2d_paths.py;
# results/conv2d-paths-cpu.json: 1x28x28 and 32x14x14 are faster through oneDNN, 64x32x32 through the shifts).
SHIFTS_MIN_INPUT = 16384


def _takes_shifts(x: torch.Tensor, stride) -> bool:
    """Whether the backward of ``x (N, C_in, H, W)`` runs _compacted_shifts: CPU, stride 1, NCHW or channels-last,
    at least ``SHIFTS_MIN_INPUT`` values per example."""
    return (x.device.type == "cpu" and list(stride) == [1, 1] and x.shape[1:].numel() >= SHIFTS_MIN_INPUT
            and (x.is_contiguous() or _channels_last(x)))


def _shift_into(cols, dy, padding, dilation):
    """Fill ``cols (n, k, kh, kw, H_in, W_in)`` with ``cols[n, c, a, b, u, v] = dy[n, c, u + ph - a dh, v + pw - b dw]``
    where that position lies inside ``dy (n, k, H_out, W_out)``: for a stride-1 convolution, the entry of ``dy``
    that meets input position ``(u, v)`` through kernel tap ``(a, b)``. One strided copy per tap; the entries
    outside ``dy`` are not written (they stay zero for every chunk of the same geometry)."""
    kernel, size, out = cols.shape[2:4], cols.shape[4:], dy.shape[2:]
    for a in range(kernel[0]):
        oa = padding[0] - a * dilation[0]
        u0, u1 = max(0, -oa), min(size[0], out[0] - oa)
        for b in range(kernel[1]):
            ob = padding[1] - b * dilation[1]
            v0, v1 = max(0, -ob), min(size[1], out[1] - ob)
            if u0 < u1 and v0 < v1:
                cols[:, :, a, b, u0:u1, v0:v1] = dy[:, :, u0 + oa : u1 + oa, v0 + ob : v1 + ob]


def _compacted_shifts(grad_output, kept, x, w, padding, dilation, need_dx, need_dw):
    # Stride 1: both gradients are GEMMs against the shifted copies of the small dy[:, S] (k channels), so the
    # large x and dx are read and written in their own layout, NCHW or channels-last (no conversions, no
    # im2col of x): dx[n] = W[S]^T (C_in, k kh kw) @ cols[n], dW[S] (k kh kw, C_in) = sum_n cols[n] @ x[n]^T.
    # A chunk of examples at a time: its kept channels are gathered into one small buffer and their shifted
    # copies into another (zeroed once), both reused for every chunk (fresh buffers as large as dy[:, S] cost
    # more in first-touch page faults than the copies); the shift buffer is laid out (chunk, k kh kw, H W) for
    # NCHW and (chunk, H W, kh kw k) for channels-last.
    n, c_in = x.shape[:2]
    k, kernel, size = w.shape[0], w.shape[2:], x.shape[2:]
    area, taps = size[0] * size[1], k * kernel[0] * kernel[1]
    last = _channels_last(x)
    dy = grad_output.permute(0, 2, 3, 1) if _channels_last(grad_output) else grad_output  # gathered along `dim`
    dim = 3 if dy is not grad_output else 1
    # taps ordered (k, kh, kw) for NCHW, (kh, kw, k) for channels-last (copies of k contiguous channels)
    wt = w.permute(1, 2, 3, 0) if last else w.permute(1, 0, 2, 3)
    wt = wt.reshape(c_in, taps)
    xs = x.permute(0, 2, 3, 1).reshape(n, area, c_in)  # a view in both layouts
    dx = torch.empty_like(x) if need_dx else None
    if need_dx:
        dxs = dx.permute(0, 2, 3, 1).view(n, area, c_in) if last else dx.view(n, c_in, area)
    dws = torch.zeros((taps, c_in), dtype=accumulate_dtype(dy.dtype), device=dy.device) if need_dw else None
    chunk = min(n, max(1, SHIFTS_BUDGET // (taps * area * dy.element_size())))
    gathered = dy.new_empty((chunk, *dy.shape[1:dim], k, *dy.shape[dim + 1 :]))
    if last:
        flat = dy.new_zeros((chunk, *size, *kernel, k))
        buf = flat.permute(0, 5, 3, 4, 1, 2)  # (chunk, k, kh, kw, H, W) view
    else:
        flat = buf = dy.new_zeros((chunk, k, *kernel, *size))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        part = torch.index_select(dy[s : s + m], dim, kept, out=gathered[:m])
        _shift_into(buf[:m], part.permute(0, 3, 1, 2) if dim == 3 else part, padding, dilation)
        cols = flat[:m].view(m, area, taps).transpose(1, 2) if last else flat[:m].view(m, taps, area)
        if need_dx:
            if last:
                torch.matmul(cols.transpose(1, 2), wt.t(), out=dxs[s : s + m])
            else:
                torch.matmul(wt, cols, out=dxs[s : s + m])
        if need_dw:
            dws += torch.bmm(cols, xs[s : s + m]).sum(0, dtype=dws.dtype)
    if need_dw:
        dws = dws.to(dy.dtype)
        dws = dws.view(*kernel, k, c_in).permute(2, 3, 0, 1) if last else dws.view(k, *kernel, c_in).permute(0, 3, 1, 2)
    return dx, dws


def _compacted_unfold(grad_output, kept, x, w, stride, padding, dilation, need_dx, need_dw):
    dy = _gather_channels(grad_output, kept)
    acc = accumulate_dtype(dy.dtype)
    n, k = dy.shape[:2]
    kernel = w.shape[2:]
    g = dy.reshape(n, k, -1).to(acc)  # (N, k, L)
    dx = dw = None
    if need_dw:
        cols = F.unfold(x.to(acc), kernel, dilation, padding, stride)  # (N, C_in kh kw, L)
        dw = torch.einsum("nkl,ncl->kc", g, cols).reshape(w.shape).to(dy.dtype)
    if need_dx:
        dcols = torch.einsum("kc,nkl->ncl", w.reshape(k, -1).to(acc), g)
        dx = F.fold(dcols, x.shape[2:], kernel, dilation, padding, stride).to(dy.dtype)
    return dx, dw


def conv2d_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    kept: torch.Tensor,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    *,
    backend: str | None = None,
    input_grad: bool = True,
    weight_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The convolution gradients of ``grad_output (N, C_out, H, W)`` restricted to the channels ``kept (k,)``.

    Returns ``(dx, dW)``: ``dx`` shaped like ``input (N, C_in, H_in, W_in)``, ``dW (C_out, C_in, kh, kw)`` with
    only the ``kept`` rows non-zero (None where not asked for). ``backend``: None / ``"cpu"`` / ``"cuda"`` (ATen's
    convolution kernels on the compacted operands) or ``"reference"`` (the im2col products).
    """
    kept = kept.sort().values
    w = weight.index_select(0, kept)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if backend == "reference":
        dx, dw_kept = _compacted_unfold(grad_output, kept, input, w, stride, padding, dilation, input_grad, weight_grad)
    elif _takes_shifts(input, stride):
        dx, dw_kept = _compacted_shifts(grad_output, kept, input, w, padding, dilation, input_grad, weight_grad)
    else:
        dx, dw_kept = _compacted_aten(grad_output, kept, input, w, stride, padding, dilation, input_grad, weight_grad)
    dw = None
    if weight_grad:
        dw = weight.new_zeros(weight.shape).index_copy_(0, kept, dw_kept.to(weight.dtype))
    return (dx if input_grad else None), dw


# Bytes of |dy| that channel_scores holds at once (a chunk of examples; at least one example).
SCORES_BUDGET = 2 << 20


def channel_scores(dy: torch.Tensor) -> torch.Tensor:
    """``s_c = sum_{n,h,w} |dy[n, c, h, w]|`` of ``dy (N, C, H, W)``, shape ``(C,)``, in the accumulation dtype.

    |dy| of a chunk of examples at a time goes into one small buffer (a temporary as large as dy costs more in
    first-touch page faults than the whole read); channels-last chunks are summed as ``(n H W, C)`` columns,
    NCHW ones over the contiguous positions first."""
    d = dy.detach()
    last = _channels_last(d)
    rows = d.permute(0, 2, 3, 1).reshape(d.shape[0], -1, d.shape[1]) if last else d.reshape(*d.shape[:2], -1)
    chunk = max(1, SCORES_BUDGET // (rows[0].numel() * d.element_size()))
    buf = torch.empty_like(rows[:chunk])
    scores = torch.zeros(d.shape[1], dtype=accumulate_dtype(dy.dtype), device=d.device)
    for s in range(0, d.shape[0], chunk):
        part = torch.abs(rows[s : s + chunk], out=buf[: d.shape[0] - s])
        scores += part.sum((0, 1), dtype=scores.dtype) if last else part.sum(-1, dtype=scores.dtype).sum(0)
    return scores


def _gather_channels(dy: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``dy[:, kept]`` of ``dy (N, C, H, W)``, shape ``(N, k, H, W)``, in ``dy``'s layout (index_select on dim 1 of a
    channels-last tensor would first copy all of it to NCHW)."""
    if _channels_last(dy):
        return dy.permute(0, 2, 3, 1).index_select(3, kept).permute(0, 3, 1, 2)
    return dy.index_select(1, kept)


def _channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _bias_grad(dy: torch.Tensor) -> torch.Tensor:
    acc = accumulate_dtype(dy.dtype)
    if _channels_last(dy):
        return dy.permute(0, 2, 3, 1).reshape(-1, dy.shape[1]).sum(0, dtype=acc).to(dy.dtype)
    return dy.reshape(dy.shape[0], dy.shape[1], -1).sum(-1, dtype=acc).sum(0).to(dy.dtype)


class _SparseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, k, mode, backend, stride, padding, dilation, generator, owner):
        ctx.save_for_backward(input, weight)
        ctx.k, ctx.mode, ctx.backend, ctx.generator, ctx.owner = k, mode, backend, generator, owner
        ctx.conv = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        return F.conv2d(input, weight, bias, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        owner = ctx.owner
        feedback = owner is not None and owner.error_feedback
        dy = grad_output
        memory = None
        if ctx.mode == "random_unified":
            kept = torch.randperm(dy.shape[1], generator=ctx.generator, device=dy.device)[: ctx.k]
        else:
            scores = channel_scores(dy)
            if feedback:
                kept, memory = owner._feedback_select(scores, ctx.k, "meprop.Conv2d")
            else:
                kept = selection.select(scores, ctx.k, "meprop.Conv2d")
        if owner is not None:
            owner._record_selection(kept.numel(), memory)
        off = functional._autocast_on(dy.device.type)
        with torch.autocast(dy.device.type, enabled=False) if off else contextlib.nullcontext():
            dx, dw = conv2d_backward(
                dy, input, weight, kept, *ctx.conv, backend=ctx.backend, input_grad=need_dx, weight_grad=need_dw
            )
        db = _bias_grad(grad_output)
        return dx, dw, db if need_db and ctx.has_bias else None, *([None] * 8)


def _check_options(mode, backend, k, where) -> None:
    if mode not in CONV_MODES:
        raise ValueError(
            f"{where}: mode must be one of {CONV_MODES}, got {mode!r} (per-example selection is not provided "
            "for convolutions: it is slower than the dense backward, see meprop.conv)"
        )
    if backend is not None and backend not in CONV_BACKENDS:
        raise ValueError(f"{where}: backend must be None or one of {CONV_BACKENDS}, got {backend!r}")
    if mode == "random_unified" and isinstance(k, selection.Adaptive):
        raise ValueError(f"{where}: an Adaptive k needs mode='unified' (random selections have no scores)")


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    k,
    mode: str = "unified",
    backend: str | None = None,
    generator: torch.Generator | None = None,
    _owner=None,
) -> torch.Tensor:
    """``torch.nn.functional.conv2d`` (``groups=1``, int padding) whose backward keeps ``k`` output channels.

    Args:
        input: ``(N, C_in, H, W)``; weight: ``(C_out, C_in, kh, kw)``; bias: ``(C_out,)`` or None.
        stride, padding, dilation: ints or pairs, as for ``F.conv2d``.
        k: kept channels (int >= 1, a ratio in (0, 1] or a :class:`meprop.Adaptive`); ``k >= C_out`` or None:
            the dense backward.
        mode: ``"unified"`` or ``"random_unified"``; backend: None, ``"cpu"``, ``"cuda"`` or ``"reference"``.

    Returns:
        ``(N, C_out, H_out, W_out)``, equal to ``F.conv2d(input, weight, bias, stride, padding, dilation)``.
    """
    where = "meprop.conv2d" if _owner is None else _owner._where
    pair = torch.nn.modules.utils._pair
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    if _owner is None:
        _check_options(mode, backend, k, where)
        k = selection.resolve(k, weight.shape[0], where)
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if k is None or not needs_grad:
        return F.conv2d(input, weight, bias, stride, padding, dilation)
    if input.dim() != 4 or weight.dim() != 4 or input.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{where}: expected input (N, C_in, H, W) and weight (C_out, C_in, kh, kw), got "
            f"{tuple(input.shape)} and {tuple(weight.shape)} (groups=1 only)"
        )
    return _SparseConv2d.apply(input, weight, bias, k, mode, backend, stride, padding, dilation, generator, _owner)


class Conv2d(selection.FeedbackMixin, nn.Conv2d):
    """``nn.Conv2d`` (``groups=1``) whose backward keeps only ``k`` output channels (see :mod:`meprop.conv`).

    Same parameters, initialisation, forward and ``state_dict`` as ``nn.Conv2d`` (plus the ``feedback`` buffer
    with ``error_feedback``); inputs ``(N, C_in, H, W)`` or ``(C_in, H, W)``.

    Args:
        k: kept channels: int >= 1, a ratio in (0, 1], a :class:`meprop.Adaptive`; ``k >= out_channels`` or
            None: dense backward. The ``k`` of the last backward is ``last_k``.
        mode: ``"unified"`` (default) or ``"random_unified"``.
        backend: None (automatic), ``"cpu"``, ``"cuda"`` or ``"reference"``.
        error_feedback: carry the dropped channels' scores into the next selection (True or a memory decay in
            (0, 1]; :mod:`meprop.selection`).
        generator: random source of ``"random_unified"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        k,
        mode: str = "unified",
        backend: str | None = None,
        error_feedback: bool | float = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if groups != 1:
            raise ValueError(
                f"meprop.Conv2d({in_channels}, {out_channels}): groups={groups} is not supported (groups=1 only); "
                "leave grouped / depthwise convolutions dense (convert's exclude_modules)"
            )
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._init_feedback(error_feedback, device, dtype)
        self.generator = generator
        _check_options(mode, backend, k, self._where)
        if error_feedback and mode != "unified":
            raise ValueError(f"{self._where}: error_feedback needs mode='unified', got {mode!r}")
        self.mode, self.backend = mode, backend
        self.k = k

    @property
    def _where(self) -> str:
        return f"meprop.Conv2d({self.in_channels}, {self.out_channels})"

    @property
    def k(self):
        """Kept channels as given (int, ratio, Adaptive or None); checked when set."""
        return self._k

    @k.setter
    def k(self, value) -> None:
        self._resolved = selection.resolve(value, self.out_channels, self._where)
        _check_options(self.mode, self.backend, value, self._where)
        self._k = value

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options) -> Conv2d:
        """A meprop.Conv2d sharing ``conv``'s parameter objects (so existing optimizers keep working)."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
            **options,
        )
        layer.weight, layer.bias = conv.weight, conv.bias
        if layer.error_feedback:
            layer.feedback = torch.zeros(0, device=conv.weight.device, dtype=conv.weight.dtype)
        return layer

    def _geometry(self):
        """The input padding to apply explicitly (or None) and the padding passed to the convolution."""
        if self.padding_mode != "zeros":
            return self._reversed_padding_repeated_twice, (0, 0)
        if isinstance(self.padding, str):
            pads = self._reversed_padding_repeated_twice  # (left, right, top, bottom)
            if pads[0] == pads[1] and pads[2] == pads[3]:
                return None, (pads[2], pads[0])
            return pads, (0, 0)
        return None, self.padding

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input, weight, bias = functional._autocast(input, self.weight, self.bias)
        unbatched = input.dim() == 3
        if unbatched:
            input = input.unsqueeze(0)
        pads, padding = self._geometry()
        if pads is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, pads, mode=mode)
        out = conv2d(
            input,
            weight,
            bias,
            self.stride,
            padding,
            self.dilation,
            k=self._resolved,
            mode=self.mode,
            backend=self.backend,
            generator=self.generator,
            _owner=self,
        )
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, k={self.k}, mode={self.mode!r}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        if self.error_feedback:
            text += f", error_feedback={self.feedback_decay}"
        return text
