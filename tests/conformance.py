"""Shared by the conformance tests: the backends under test, inputs, tolerances and an independent oracle.

Every (backend, device) pair the machine can run is a case: the reference, the CPU kernels and the Triton
kernels (in the interpreter) on CPU tensors; the reference, the CUDA kernels and the compiled Triton kernels
on a GPU. The oracle computes each op from its formula in float64 (Python loops and einsum), independently
of ``meprop.reference``.
"""

from __future__ import annotations

import math

import pytest
import torch

from meprop import backends

HAS_CUDA = torch.cuda.is_available()
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Relative tolerances (to the largest expected magnitude) of products accumulated in float32 or float64.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _case(name: str, device: str):
    reason = None
    if device == "cuda" and not HAS_CUDA:
        reason = "no CUDA device"
    else:
        problem = backends.get(name).why_not(torch.device(device))
        if problem is not None:
            reason = f"backend {name!r} cannot run on {device} here: {problem[1]}"
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param((name, device), id=f"{name}-{device}", marks=marks)


# The (backend, device) pairs of every conformance test.
BACKEND_DEVICES = [
    _case(name, device)
    for device in ("cpu", "cuda")
    for name in ("reference", "cpu" if device == "cpu" else "cuda", "triton")
]


def dtypes_of(name: str) -> tuple[torch.dtype, ...]:
    """The float dtypes backend ``name`` takes."""
    return tuple(d for d in ALL_DTYPES if d in backends.get(name).dtypes)


def max_k(name: str) -> int:
    return backends.get(name).max_k or (1 << 62)


# --- inputs ---------------------------------------------------------------------------------------------

# Windows of positive bit patterns of the 16-bit types whose values are distinct and whose sums over up to
# 2^12 terms are exact in float32: float16 2^-8 .. 2^4 (12288 values), bfloat16 2^-32 .. 2^32 (8192 values).
_CODE_WINDOW = {torch.float16: (0x1C00, 0x4C00), torch.bfloat16: (0x2F80, 0x4F80)}


def distinct_magnitudes(m: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``m`` distinct positive values of ``dtype`` in random order (integers 1..m for float32/float64)."""
    if dtype in _CODE_WINDOW:
        lo, hi = _CODE_WINDOW[dtype]
        assert m <= hi - lo, f"at most {hi - lo} distinct {dtype} magnitudes"
        return (torch.randperm(hi - lo, generator=gen)[:m] + lo).to(torch.int16).view(dtype)
    return (torch.randperm(m, generator=gen) + 1).to(dtype)


def signs(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen) * 2 - 1


def tie_free_rows(n: int, m: int, dtype: torch.dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """``(n, m)`` whose magnitudes are distinct within each row (each row a shuffle of m distinct values)."""
    mags = distinct_magnitudes(m, dtype, gen)
    order = torch.rand(n, m, generator=gen).argsort(1)
    return (mags[order] * signs((n, m), gen).to(dtype)).to(device)


def tie_free_columns(n: int, m: int, dtype: torch.dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """``(n, m)`` whose column scores ``sum_n |dy|`` are distinct and exact in any summation order: column j
    holds ``+-c_j`` (distinct ``c_j``) in ``ceil(n / 2)`` random rows and zeros elsewhere."""
    mags = distinct_magnitudes(m, dtype, gen)
    keep = torch.rand(n, m, generator=gen).argsort(0) < (n + 1) // 2
    return (mags * keep.to(dtype) * signs((n, m), gen).to(dtype)).to(device)


def gaussian(shape, dtype: torch.dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def distinct_index(m: int, k: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """``k`` distinct indices of ``[0, m)`` in random order."""
    return torch.randperm(m, generator=gen)[:k].to(device)


def row_index(n: int, m: int, k: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """``(n, k)``: per row, ``k`` distinct indices of ``[0, m)`` in random order."""
    return torch.rand(n, m, generator=gen).argsort(1)[:, :k].contiguous().to(device)


# --- the oracle -----------------------------------------------------------------------------------------


def _order(values: list[float], k: int) -> list[int]:
    """The first k positions by the selection rule: NaN first, then larger value, then lower index."""
    return sorted(range(len(values)), key=lambda j: (not math.isnan(values[j]), -values[j], j))[:k]


def oracle(op: str, *args):
    """Op ``op`` computed from its formula, in float64 on CPU (indices int64)."""
    f64 = [a.detach().cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    f64 = [a.cpu() if isinstance(a, torch.Tensor) else a for a in f64]
    if op == "column_scores":
        (dy,) = f64
        return torch.tensor([float(dy[:, j].abs().sum()) for j in range(dy.shape[1])], dtype=torch.float64)
    if op == "topk_unified":
        dy, k = f64
        scores = [float(dy[:, j].abs().sum()) for j in range(dy.shape[1])]
        return torch.tensor(_order(scores, k), dtype=torch.long)
    if op == "topk_unified_feedback":
        return _oracle_feedback(*args)
    if op == "topk_rows":
        dy, k = f64
        idx = torch.tensor([_order(dy[n].abs().tolist(), k) for n in range(dy.shape[0])], dtype=torch.long)
        idx = idx.reshape(dy.shape[0], k)
        return dy.gather(1, idx), idx
    if op == "linear_input_grad_unified":
        dy, w, idx = f64
        return torch.einsum("nk,kc->nc", dy[:, idx], w[idx])
    if op == "linear_weight_grad_unified":
        dy, x, idx = f64
        return torch.einsum("nk,nc->kc", dy[:, idx], x)
    if op == "linear_input_grad_rows":
        vals, idx, w = f64
        return torch.einsum("nk,nkc->nc", vals, w[idx])
    if op == "linear_weight_grad_rows":
        vals, idx, x, out_features, rows = f64
        dw = torch.zeros(out_features, x.shape[1], dtype=torch.float64)
        for n in range(vals.shape[0]):
            for i in range(vals.shape[1]):
                dw[idx[n, i]] += vals[n, i] * x[n]
        return dw if rows is None else dw[rows]
    if op == "scatter_rows":
        rows, idx, out_features = f64
        dense = torch.zeros(out_features, rows.shape[1], dtype=torch.float64)
        for i in range(idx.shape[0]):
            dense[idx[i]] = rows[i]
        return dense
    if op in ("linear_backward_unified", "linear_backward_rows"):
        return _oracle_backward(op, *args)
    if op == "lstm_backward":
        return _oracle_lstm(*f64)
    if op == "lstm_forward":
        return _oracle_lstm_forward(*f64)
    raise KeyError(op)


def _oracle_feedback(dy, memory, k, decay, bias_grad):
    """topk_unified_feedback from its formula. The exact float64 column sums are rounded once to the memory's
    dtype and added there (the kernels' one rounding: their sums of tie-free inputs are exact)."""
    dy, memory = dy.detach().cpu(), memory.detach().cpu()
    d64 = dy.double()
    scores = torch.tensor([float(d64[:, j].abs().sum()) for j in range(dy.shape[1])], dtype=torch.float64)
    ranked = scores.to(memory.dtype) + memory
    kept = torch.tensor(_order([abs(v) for v in ranked.double().tolist()], k), dtype=torch.long)
    following = ranked * decay
    following[kept] = 0
    db = d64.sum(0) if bias_grad else torch.zeros(0, dtype=torch.float64)
    return kept, following, db


def _oracle_lstm_forward(x, h0, c0, w_ih, w_hh, bias, sizes, reverse):
    """lstm_forward row by row in float64 with torch.nn.LSTMCell's formulas (an independent step loop)."""
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    hs, cs = torch.zeros(steps + 1, batch, hidden, dtype=torch.float64), torch.zeros(steps + 1, batch, hidden, dtype=torch.float64)
    gates = torch.zeros(steps, batch, 4 * hidden, dtype=torch.float64)
    start = steps if reverse else 0
    hs[start], cs[start] = h0, c0
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        before, after = (t + 1, t) if reverse else (t, t + 1)
        for n in range(batch):
            if sizes is not None and n >= sizes[t]:
                hs[after, n], cs[after, n] = hs[before, n], cs[before, n]
                continue
            a = w_ih @ x[t, n] + w_hh @ hs[before, n] + (0 if bias is None else bias)
            i, f, g, o = a.split(hidden)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            gates[t, n] = torch.cat([i, f, g, o])
            cs[after, n] = f * cs[before, n] + i * g
            hs[after, n] = o * torch.tanh(cs[after, n])
    return hs, cs, gates


def _oracle_lstm(dout, dh_n, dc_n, x, h_prev, c_prev, gates, w_ih, w_hh, sizes, reverse, k, per_gate, per_example, idx):
    """lstm_backward from its formulas: BPTT in float64 with a 0/1 mask of the kept gate-gradient entries."""
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    dh, dc = dh_n.clone(), dc_n.clone()
    dx, dw_ih, dw_hh = torch.zeros_like(x), torch.zeros_like(w_ih), torch.zeros_like(w_hh)
    db = torch.zeros(4 * hidden, dtype=torch.float64)
    groups = [range(g * hidden, (g + 1) * hidden) for g in range(4)] if per_gate else [range(4 * hidden)]
    for t in (range(steps) if reverse else range(steps - 1, -1, -1)):
        b = batch if sizes is None else sizes[t]
        i, f, g, o = (gates[t, :b, q * hidden : (q + 1) * hidden] for q in range(4))
        cp = c_prev[t, :b]
        tc = torch.tanh(f * cp + i * g)
        dht = dh[:b] + dout[t, :b]
        dct = dc[:b] + dht * o * (1 - tc**2)
        da = torch.cat([dct * g * i * (1 - i), dct * cp * f * (1 - f), dct * i * (1 - g**2), dht * tc * o * (1 - o)], 1)
        db += da.sum(0)
        dc[:b] = dct * f
        mask = torch.zeros_like(da)
        unified = da.abs().sum(0).tolist()
        for n in range(b):
            if idx is not None:
                for j in (idx[t, n] if per_example else idx[t]).tolist():
                    mask[n, j] += 1  # a repeated index counts as often as it appears
                continue
            scores = da[n].abs().tolist() if per_example else unified
            for cols in groups:
                for pos in _order([scores[j] for j in cols], k):
                    mask[n, cols[pos]] = 1
        kept = da * mask
        dh[:b] = kept @ w_hh
        dx[t, :b] = kept @ w_ih
        dw_hh += kept.T @ h_prev[t, :b]
        dw_ih += kept.T @ x[t, :b]
    return dx, dh, dc, dw_ih, dw_hh, db


def _oracle_backward(op, dy, x, w, k, idx, input_grad, weight_grad, bias_grad, rows_only, reuse_grad):
    """(dx, dW, db, kept or rows) of a fused backward, from the oracles of its parts; None where not asked."""
    out = dy.shape[1]
    if op == "linear_backward_unified":
        kept = oracle("topk_unified", dy, k) if idx is None else idx.cpu()
        dx = oracle("linear_input_grad_unified", dy, w, kept) if input_grad else None
        if rows_only:
            kept = kept.sort().values
        rows = oracle("linear_weight_grad_unified", dy, x, kept)
        dw = (rows if rows_only else oracle("scatter_rows", rows, kept, out)) if weight_grad else None
        extra = kept
    else:
        if idx is None:
            vals, idx = oracle("topk_rows", dy, k)
        else:
            idx = idx.cpu()
            vals = dy.detach().cpu().double().gather(1, idx)
        dx = oracle("linear_input_grad_rows", vals, idx, w) if input_grad else None
        rows = torch.unique(idx) if rows_only else None
        dw = oracle("linear_weight_grad_rows", vals, idx, x, out, rows) if weight_grad else None
        extra = rows if weight_grad and rows_only else torch.zeros(0, dtype=torch.long)
    db = dy.detach().cpu().double().sum(0) if bias_grad else None
    return dx, dw, db, extra


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, device) -> None:
    """``got`` (``dtype``, on ``device``) equals the float64 oracle ``want`` to the dtype's tolerance,
    relative to the largest expected magnitude; NaN where the oracle has NaN."""
    assert got.dtype == dtype and got.device.type == torch.device(device).type, (got.dtype, got.device)
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    got = got.detach().cpu().double()
    scale = want[torch.isfinite(want)].abs().max().item() if torch.isfinite(want).any() else 0.0
    tol = RTOL[dtype] * max(scale, 1e-30)
    torch.testing.assert_close(got, want, rtol=0, atol=tol, equal_nan=True)


def assert_zero_outside(dense: torch.Tensor, kept_rows) -> None:
    """Every row of ``dense`` not in ``kept_rows`` is exactly zero (+0.0 bits)."""
    mask = torch.ones(dense.shape[0], dtype=torch.bool)
    mask[torch.as_tensor(kept_rows, dtype=torch.long).cpu()] = False
    rest = dense.detach().cpu()[mask]
    assert torch.equal(rest, torch.zeros_like(rest)), "a row that was not selected is not exactly zero"


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape and dtype; values within the dtype's tolerance relative to the largest expected magnitude."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape)
    rtol = RTOL[expected.dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True)
