"""Every op of every backend against the formula oracle, and every backend's checks against each other.

Parametrised over (backend, device) x op x dtype from the op table (``meprop.opdefs.OPS``): indices are
compared exactly on tie-free inputs (and on inputs with exact ties, NaN and inf, whose order the selection
rule fixes), values to the dtype's tolerance; outputs come from NaN-poisoned memory where the backend's
allocator allows it, so an unwritten element shows; every weight-gradient row that was not selected must be
exactly zero.
"""

from __future__ import annotations

import contextlib
import itertools
import zlib

import pytest
import torch
from conformance import (
    BACKEND_DEVICES,
    assert_matches,
    assert_zero_outside,
    distinct_index,
    dtypes_of,
    gaussian,
    max_k,
    oracle,
    row_index,
    tie_free_columns,
    tie_free_rows,
)

from meprop import backends
from meprop.opdefs import OP_NAMES, accumulate_dtype

# (N, out, in): a single row and column, odd sizes, sizes across the kernels' tile and chunk edges.
SHAPES = [(1, 2, 1), (7, 5, 13), (33, 70, 100), (64, 257, 17), (130, 96, 300)]


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    return request.param


def _ks(out: int, limit: int) -> list[int]:
    return sorted({k for k in (1, max(1, out // 3), out - 1, out) if 1 <= k <= min(out, limit)})


@contextlib.contextmanager
def poisoned(name: str, device: str, nbytes: int):
    """Outputs allocated inside start as NaN: the Triton launchers' ``new_empty`` is filled with NaN; a freed
    NaN block of ``nbytes`` is left for the CPU heap or the CUDA caching allocator to hand out next."""
    if name == "triton":
        original = torch.Tensor.new_empty

        def new_empty(self, *size, **kwargs):
            out = original(self, *size, **kwargs)
            return out.fill_(float("nan") if out.is_floating_point() else -7)

        torch.Tensor.new_empty = new_empty
        try:
            yield
        finally:
            torch.Tensor.new_empty = original
        return
    if name != "reference":
        block = torch.full((max(nbytes, 8) // 4,), float("nan"), device=device)
        del block
    yield


def _cases(op: str, dtype, device, gen, limit):
    """The argument tuples op ``op`` is tried on."""
    for n, out, n_in in SHAPES:
        if op == "column_scores":
            yield (tie_free_columns(n, out, dtype, gen, device),)
            yield (gaussian((n, out), dtype, gen, device),)
            continue
        if op == "topk_unified_feedback":
            yield from _feedback_cases(n, out, dtype, gen, device, limit)
            continue
        if op in ("topk_unified", "topk_rows"):
            make = tie_free_columns if op == "topk_unified" else tie_free_rows
            dy = make(n, out, dtype, gen, device)
            for k in _ks(out, limit):
                yield dy, k
            continue
        if op in ("linear_backward_unified", "linear_backward_rows"):
            yield from _backward_cases(op, n, out, n_in, dtype, gen, device, limit)
            continue
        if op == "lstm_backward":
            if n == SHAPES[1][0]:  # one LSTM shape: the step loop costs more than the other ops' cases
                yield from _lstm_cases(dtype, gen, device)
            continue
        if op == "lstm_forward":
            if n == SHAPES[1][0]:
                yield from _lstm_forward_cases(dtype, gen, device)
            continue
        dy, x, w = (
            gaussian((n, out), dtype, gen, device),
            gaussian((n, n_in), dtype, gen, device),
            gaussian((out, n_in), dtype, gen, device),
        )
        for k in _ks(out, out):
            idx = distinct_index(out, k, gen, device)
            if op == "linear_input_grad_unified":
                yield dy, w, idx
            elif op == "linear_weight_grad_unified":
                yield dy, x, idx
            elif op == "scatter_rows":
                yield gaussian((k, n_in), dtype, gen, device), idx, out
            else:
                ridx, vals = row_index(n, out, k, gen, device), gaussian((n, k), dtype, gen, device)
                if op == "linear_input_grad_rows":
                    yield vals, ridx, w
                else:
                    yield vals, ridx, x, out, None
                    rows = torch.randperm(out, generator=gen)[: max(1, out // 2)].to(device)  # any order, any rows
                    yield vals, ridx, x, out, rows


def _feedback_cases(n, out, dtype, gen, device, limit):
    """Tie-free dy with a zero memory (the first step) and with the exact scores of another tie-free dy as the
    memory (so that it reorders the selection); decays 1, 0.5 and an inexact 0.3; with and without db."""
    acc = accumulate_dtype(dtype)
    dy = tie_free_columns(n, out, dtype, gen, device)
    memories = (torch.zeros(out, dtype=acc), oracle("column_scores", tie_free_columns(n, out, dtype, gen)).to(acc))
    for i, k in enumerate(_ks(out, limit)):
        for j, memory in enumerate(memories):
            yield dy, memory.to(device), k, (1.0, 0.5, 0.3)[(i + j) % 3], (i + j) % 2 == 0


def _backward_cases(op, n, out, n_in, dtype, gen, device, limit):
    """Fused backward cases: the selection of every k, a given (random) selection, each output on its own."""
    unified = op == "linear_backward_unified"
    dy = (tie_free_columns if unified else tie_free_rows)(n, out, dtype, gen, device)
    x, w = gaussian((n, n_in), dtype, gen, device), gaussian((out, n_in), dtype, gen, device)
    for k in _ks(out, limit):
        for rows_only in (False, True):
            yield dy, x, w, k, None, True, True, True, rows_only, False
        given = distinct_index(out, k, gen, device) if unified else row_index(n, out, k, gen, device)
        yield dy, x, w, k, given, True, True, False, False, False
        for only in range(3):
            yield (dy, x, w, k, None, *(i == only for i in range(3)), False, False)


def lstm_args(steps, batch, n_in, hidden, dtype, gen, device):
    """Arguments of lstm_backward (dout, dh_n, dc_n, x, h_prev, c_prev, gates, weight_ih, weight_hh): Gaussian
    values, the gates activated (sigmoid, tanh) as the forward saves them."""
    g = lambda *shape: gaussian(shape, torch.float64, gen)  # noqa: E731
    act = g(steps, batch, 4 * hidden).sigmoid()
    act[..., 2 * hidden : 3 * hidden] = act[..., 2 * hidden : 3 * hidden] * 2 - 1
    tensors = (g(steps, batch, hidden), g(batch, hidden), g(batch, hidden), g(steps, batch, n_in),
               g(steps, batch, hidden), g(steps, batch, hidden), act, g(4 * hidden, n_in), g(4 * hidden, hidden))
    return tuple(t.to(dtype).to(device) for t in tensors)


def _lstm_cases(dtype, gen, device):
    """Per gate and over all 4H, unified and per example, forward and reverse, packed, and given indices."""
    steps, batch, n_in, hidden = 4, 5, 7, 6
    tensors = lstm_args(steps, batch, n_in, hidden, dtype, gen, device)
    packed = [5, 4, 4, 1]
    for per_gate, per_example, reverse, sizes, k in [
        (True, False, False, None, 2), (True, True, True, packed, 1), (True, False, True, packed, 6),
        (True, True, False, None, 6), (False, False, True, None, 3), (False, True, False, packed, 23),
    ]:
        yield (*tensors, sizes, reverse, k, per_gate, per_example, None)
    for per_example in (False, True):
        shape = (steps, batch, 8) if per_example else (steps, 8)
        given = torch.randint(0, 4 * hidden, shape, generator=gen).to(device)  # repeats allowed
        yield (*tensors, [5, 3, 3, 2], True, 2, True, per_example, given)


def _lstm_forward_cases(dtype, gen, device):
    """Forward and reverse, with and without bias, packed (a step with no rows too), an empty hidden state."""
    steps, batch, n_in, hidden = 4, 5, 7, 13
    g = lambda *shape: (gaussian(shape, torch.float64, gen) * 0.5).to(dtype).to(device)  # noqa: E731
    for reverse, sizes, bias in [(False, None, True), (True, [5, 4, 4, 1], True), (False, [5, 3, 1, 0], False),
                                 (True, None, False)]:
        yield (g(steps, batch, n_in), g(batch, hidden), g(batch, hidden), g(4 * hidden, n_in), g(4 * hidden, hidden),
               g(4 * hidden) if bias else None, sizes, reverse)


def _check_backward(op: str, got, args, want, dtype, device) -> None:
    names = ("dx", "dW", "db")
    asked = args[5:8]
    for name, g, wanted, on in zip(names, got[:3], want[:3], asked):
        if not on:
            assert g.numel() == 0, f"{name} was not asked for"
            continue
        assert_matches(g, wanted, dtype, device)
    kept = got[3]
    assert kept.dtype == torch.long and torch.equal(kept.cpu(), want[3]), (kept, want[3])
    if asked[1] and not args[8]:
        touched = kept if op == "linear_backward_unified" else torch.unique(args[4] if args[4] is not None else oracle("topk_rows", args[0], args[3])[1])
        assert_zero_outside(got[1], touched.cpu())


def _check(op: str, got, args, dtype, device) -> None:
    want = oracle(op, *args)
    if op in ("linear_backward_unified", "linear_backward_rows"):
        _check_backward(op, got, args, want, dtype, device)
        return
    if op in ("lstm_backward", "lstm_forward"):
        for g, w in zip(got, want):
            assert_matches(g, w, dtype, device)
        return
    if op == "topk_unified_feedback":
        kept, memory, db = got
        assert kept.dtype == torch.long and torch.equal(kept.cpu(), want[0]), (kept, want[0])
        assert memory.dtype == args[1].dtype and torch.equal(memory.cpu(), want[1]), (memory, want[1])
        if args[4]:
            assert_matches(db, want[2], dtype, device)
        else:
            assert db.numel() == 0, "db was not asked for"
        return
    if op == "column_scores":
        assert_matches(got, want, accumulate_dtype(dtype), device)  # float32 sums of 16-bit inputs
    elif op == "topk_unified":
        assert got.dtype == torch.long and got.device.type == torch.device(device).type
        assert torch.equal(got.cpu(), want), (got, want)
    elif op == "topk_rows":
        vals, idx = got
        assert idx.dtype == torch.long and torch.equal(idx.cpu(), want[1])
        assert vals.dtype == dtype and torch.equal(vals.cpu().double(), want[0])
    elif op == "scatter_rows":
        assert got.dtype == dtype and torch.equal(got.cpu().double(), want)
        assert_zero_outside(got, args[1])
    else:
        assert_matches(got, want, dtype, device)
        if op == "linear_weight_grad_rows" and args[4] is None:
            assert_zero_outside(got, torch.unique(args[1].cpu()))


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_op_matches_oracle(backend_device, op, dtype):
    name, device = backend_device
    if dtype not in dtypes_of(name):
        pytest.skip(f"backend {name!r} does not take {dtype}")
    ops = backends.get(name)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{op} {dtype}".encode()))
    for args in _cases(op, dtype, device, gen, max_k(name)):
        with poisoned(name, device, 8 * sum(a.numel() for a in args if isinstance(a, torch.Tensor)) + 4096):
            got = getattr(ops, op)(*args)
        _check(op, got, args, dtype, device)


def test_every_op_is_tried():
    gen = torch.Generator().manual_seed(0)
    for op in OP_NAMES:
        assert next(iter(_cases(op, torch.float32, "cpu", gen, 256)), None) is not None, op


def test_selection_ties_nan_and_inf(backend_device):
    name, device = backend_device
    ops = backends.get(name)
    gen = torch.Generator().manual_seed(5)
    dy = torch.randint(-3, 4, (9, 40), generator=gen).float()
    dy[0, 7] = dy[0, 30] = dy[3, 5] = float("nan")
    dy[1, 3], dy[1, 20], dy[3, 6] = float("inf"), -float("inf"), -float("inf")
    dy[2] = 0.0
    dy[2, ::3] = -0.0
    dy[4, 10], dy[4, 11] = 2.0, -2.0  # a +-x tie goes by index
    dy = dy.to(device)
    scores = ops.column_scores(dy)
    torch.testing.assert_close(scores.cpu().double(), oracle("column_scores", dy), rtol=0, atol=0, equal_nan=True)
    for k in (1, 2, 5, 39, 40):
        assert torch.equal(ops.topk_unified(dy, k).cpu(), oracle("topk_unified", dy, k)), k
        vals, idx = ops.topk_rows(dy, k)
        want_vals, want_idx = oracle("topk_rows", dy, k)
        assert torch.equal(idx.cpu(), want_idx), k
        torch.testing.assert_close(vals.cpu().double(), want_vals, rtol=0, atol=0, equal_nan=True)
    zeros = torch.zeros(0, 9, device=device)  # no rows: every score is 0, so the lowest indices
    assert ops.topk_unified(zeros, 4).tolist() == [0, 1, 2, 3]
    assert ops.column_scores(zeros).tolist() == [0.0] * 9
    assert ops.topk_rows(zeros, 4)[1].shape == (0, 4)


def test_long_rows_and_heavy_ties(backend_device):
    """Rows far longer than k (several blocks and merge chunks), and rows of few distinct magnitudes."""
    name, device = backend_device
    ops = backends.get(name)
    gen = torch.Generator().manual_seed(6)
    long_rows = tie_free_rows(5, 3000, torch.float32, gen, device)
    long_rows[2, 2345] = float("nan")
    heavy = torch.randint(-2, 3, (6, 3000), generator=gen).float().to(device)
    heavy[1] = 0.0
    for dy in (long_rows, heavy):
        for k in (1, 16, min(255, max_k(name))):
            vals, idx = ops.topk_rows(dy, k)
            assert torch.equal(idx.cpu(), oracle("topk_rows", dy, k)[1]), k
            assert torch.equal(ops.topk_unified(dy, k).cpu(), oracle("topk_unified", dy, k)), k


def test_products_sum_repeated_indices(backend_device):
    """An index repeated within a row (per-example) or in the unified set counts as often as it appears."""
    name, device = backend_device
    ops = backends.get(name)
    gen = torch.Generator().manual_seed(7)
    x, w = gaussian((6, 11), torch.float32, gen, device), gaussian((4, 11), torch.float32, gen, device)
    ridx = torch.tensor([[2, 0], [2, 2], [0, 2], [2, 3], [1, 2], [3, 3]], device=device)
    vals = gaussian((6, 2), torch.float32, gen, device)
    dy = gaussian((6, 4), torch.float32, gen, device)
    uidx = torch.tensor([1, 3, 1], device=device)
    assert_matches(
        ops.linear_input_grad_rows(vals, ridx, w),
        oracle("linear_input_grad_rows", vals, ridx, w),
        torch.float32,
        device,
    )
    got = ops.linear_weight_grad_rows(vals, ridx, x, 4, None)
    assert_matches(got, oracle("linear_weight_grad_rows", vals, ridx, x, 4, None), torch.float32, device)
    got = ops.linear_input_grad_unified(dy, w, uidx)
    assert_matches(got, oracle("linear_input_grad_unified", dy, w, uidx), torch.float32, device)
    got = ops.linear_weight_grad_unified(dy, x, uidx)
    assert_matches(got, oracle("linear_weight_grad_unified", dy, x, uidx), torch.float32, device)


def test_non_finite_inputs_stay_in_their_rows(backend_device):
    """inf/NaN in x or W reach only the gradients of the entries that use them: unselected rows stay zero."""
    name, device = backend_device
    ops = backends.get(name)
    gen = torch.Generator().manual_seed(8)
    x, w = gaussian((5, 6), torch.float32, gen), gaussian((10, 6), torch.float32, gen)
    x[2, 1], w[7, 3], w[9, 0] = float("inf"), float("nan"), -float("inf")
    ridx = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 9], [1, 2]])
    vals = gaussian((5, 2), torch.float32, gen)
    x, w, ridx, vals = x.to(device), w.to(device), ridx.to(device), vals.to(device)
    dw = ops.linear_weight_grad_rows(vals, ridx, x, 10, None)
    assert_matches(dw, oracle("linear_weight_grad_rows", vals, ridx, x, 10, None), torch.float32, device)
    assert_zero_outside(dw, [0, 1, 2, 3, 4, 5, 9])
    dx = ops.linear_input_grad_rows(vals, ridx, w)  # row 7 (NaN) is never selected
    assert_matches(dx, oracle("linear_input_grad_rows", vals, ridx, w), torch.float32, device)
    assert torch.isfinite(dx[[0, 1, 2, 4]]).all() and torch.isinf(dx[3]).any()


def test_strided_inputs(backend_device):
    name, device = backend_device
    ops = backends.get(name)
    gen = torch.Generator().manual_seed(9)
    dy = gaussian((40, 30), torch.float32, gen, device).t()[5:30]  # (25, 40), transposed storage
    x = gaussian((25, 60), torch.float32, gen, device)[:, ::2]  # (25, 30), strided columns
    w = gaussian((40, 60), torch.float32, gen, device)[:, 1::2]  # (40, 30)
    idx = distinct_index(40, 12, gen, device)[::2]  # a strided index
    assert not (dy.is_contiguous() or x.is_contiguous() or w.is_contiguous() or idx.is_contiguous())
    assert torch.equal(ops.topk_unified(dy, 6).cpu(), oracle("topk_unified", dy, 6))
    assert_matches(ops.column_scores(dy), oracle("column_scores", dy), torch.float32, device)
    assert_matches(
        ops.linear_input_grad_unified(dy, w, idx),
        oracle("linear_input_grad_unified", dy, w, idx),
        torch.float32,
        device,
    )
    assert_matches(
        ops.linear_weight_grad_unified(dy, x, idx),
        oracle("linear_weight_grad_unified", dy, x, idx),
        torch.float32,
        device,
    )
    vals, ridx = ops.topk_rows(dy, 6)
    vals, ridx = vals.t().contiguous().t(), ridx.t().contiguous().t()  # column-major (N, k)
    assert_matches(
        ops.linear_input_grad_rows(vals, ridx, w),
        oracle("linear_input_grad_rows", vals, ridx, w),
        torch.float32,
        device,
    )
    got = ops.linear_weight_grad_rows(vals, ridx, x, 40, None)
    assert_matches(got, oracle("linear_weight_grad_rows", vals, ridx, x, 40, None), torch.float32, device)


def test_empty_shapes(backend_device):
    """No rows (N = 0), no input features (in = 0) and no kept entries (k = 0) in every product."""
    name, device = backend_device
    ops = backends.get(name)
    for (n, n_in), dtype in itertools.product(((0, 4), (3, 0), (0, 0)), dtypes_of(name)):
        dy, x, w = (torch.randn(s).to(dtype).to(device) for s in ((n, 6), (n, n_in), (6, n_in)))
        for idx in (torch.tensor([2, 5], device=device), torch.zeros(0, dtype=torch.long, device=device)):
            k = idx.shape[0]
            assert_matches(
                ops.linear_input_grad_unified(dy, w, idx), torch.zeros(n, n_in, dtype=torch.float64), dtype, device
            )
            rows = ops.linear_weight_grad_unified(dy, x, idx)
            assert_matches(rows, torch.zeros(k, n_in, dtype=torch.float64), dtype, device)
            assert_matches(ops.scatter_rows(rows, idx, 6), torch.zeros(6, n_in, dtype=torch.float64), dtype, device)
        vals, ridx = torch.randn(n, 2).to(dtype).to(device), torch.zeros(n, 2, dtype=torch.long, device=device)
        assert ops.linear_input_grad_rows(vals, ridx, w).shape == (n, n_in)
        got = ops.linear_weight_grad_rows(vals, ridx, x, 6, None)
        assert_matches(got, oracle("linear_weight_grad_rows", vals, ridx, x, 6, None), dtype, device)
        assert ops.topk_rows(dy, 3)[0].shape == (n, 3)


# --- the checks: every backend rejects the same inputs with the same exception and message ---------------


def _bad_calls(device):
    """(op, args, exception type, whether the check reads index values) for single-fault inputs."""
    t = lambda *shape, dtype=torch.float32: torch.randn(*shape).to(dtype).to(device)  # noqa: E731
    i = lambda *values: torch.tensor(values, device=device)  # noqa: E731
    dy, x, w = t(4, 6), t(4, 5), t(6, 5)
    vals, ridx = t(4, 2), torch.zeros(4, 2, dtype=torch.long, device=device)
    flags = (True, True, True, False, False)
    return [
        ("column_scores", (t(2, 3, 4),), ValueError, False),
        ("column_scores", (dy.int(),), TypeError, False),
        ("topk_unified", (dy, 0), ValueError, False),
        ("topk_unified_feedback", (dy, t(6), 0, 0.5, True), ValueError, False),
        ("topk_unified_feedback", (dy, t(6).double(), 2, 0.5, True), TypeError, False),
        ("topk_unified_feedback", (dy.half(), t(6).half(), 2, 0.5, True), TypeError, False),
        ("topk_unified_feedback", (dy, t(2, 3), 2, 0.5, False), ValueError, False),
        ("topk_unified_feedback", (dy, t(5), 2, 0.5, True), ValueError, False),
        ("topk_unified_feedback", (dy, t(6), 2, 0.0, True), ValueError, False),
        ("topk_unified_feedback", (dy, t(6), 2, 1.5, True), ValueError, False),
        ("topk_unified", (dy, 7), ValueError, False),
        ("topk_rows", (dy, -1), ValueError, False),
        ("topk_rows", (t(2, 3, 4), 1), ValueError, False),
        ("topk_unified", (dy.int(), 2), TypeError, False),
        ("topk_rows", (dy.to(torch.complex64), 2), TypeError, False),
        ("linear_input_grad_unified", (dy, w.double(), i(0)), TypeError, False),
        ("linear_input_grad_unified", (dy, w[:5], i(0)), ValueError, False),
        ("linear_input_grad_unified", (dy, w, i(0).int()), TypeError, False),
        ("linear_input_grad_unified", (dy, w, i([0])), ValueError, False),
        ("linear_input_grad_unified", (dy, w, i(0, 6)), IndexError, True),
        ("linear_input_grad_unified", (dy, w, i(-1)), IndexError, True),
        ("linear_weight_grad_unified", (dy, x[:3], i(0)), ValueError, False),
        ("linear_weight_grad_unified", (dy, x.half(), i(0)), TypeError, False),
        ("linear_weight_grad_unified", (dy, x, i(6)), IndexError, True),
        ("linear_input_grad_rows", (vals, torch.zeros(4, 3, dtype=torch.long, device=device), w), ValueError, False),
        ("linear_input_grad_rows", (vals, ridx, w.double()), TypeError, False),
        ("linear_input_grad_rows", (vals, ridx.float(), w), TypeError, False),
        ("linear_input_grad_rows", (vals, ridx + 6, w), IndexError, True),
        ("linear_weight_grad_rows", (vals, ridx, x, -1, None), ValueError, False),
        ("linear_weight_grad_rows", (vals, ridx, x[:3], 6, None), ValueError, False),
        ("linear_weight_grad_rows", (vals, ridx + 6, x, 6, None), IndexError, True),
        ("linear_weight_grad_rows", (vals, ridx, x, 6, i(1, 1)), ValueError, True),
        ("linear_weight_grad_rows", (vals, ridx, x, 6, i(0, 6)), IndexError, True),
        ("scatter_rows", (t(2, 5), i(1, 1), 6), ValueError, True),
        ("scatter_rows", (t(2, 5), i(1, 9), 6), IndexError, True),
        ("scatter_rows", (t(2, 5), i(1), 6), ValueError, False),
        ("scatter_rows", (t(2, 5), i(0, 1), -2), ValueError, False),
        ("linear_backward_unified", (dy, x, w, 0, None, *flags), ValueError, False),
        ("linear_backward_unified", (dy, x[:3], w, 2, None, *flags), ValueError, False),
        ("linear_backward_unified", (dy, x, w.double(), 2, None, *flags), TypeError, False),
        ("linear_backward_unified", (dy, x, w[:, :4], 2, None, *flags), ValueError, False),
        ("linear_backward_unified", (dy, x, w, 2, i(1, 1), *flags), ValueError, True),
        ("linear_backward_unified", (dy, x, w, 3, i(1, 2), *flags), ValueError, False),
        ("linear_backward_rows", (dy, x, w, 3, ridx, *flags), ValueError, False),
        ("linear_backward_rows", (dy, x.double(), w, 2, None, *flags), TypeError, False),
        ("linear_backward_rows", (dy, x, w, 2, ridx + 6, *flags), IndexError, True),
        *_bad_lstm_calls(device),
    ]


def _bad_lstm_calls(device):
    """Bad arguments of lstm_backward: (op, args, exception type, whether the check reads index values)."""
    gen = torch.Generator().manual_seed(11)
    args = lstm_args(3, 2, 4, 5, torch.float32, gen, device)
    ok = (None, False, 2, True, False, None)

    def call(*, replace=(), tail=ok):
        a = list(args)
        for pos, value in replace:
            a[pos] = value
        return tuple(a) + tuple(tail)

    i = lambda *shape, fill=0: torch.full(shape, fill, dtype=torch.long, device=device)  # noqa: E731
    return [
        ("lstm_backward", call(tail=(None, False, 6, True, False, None)), ValueError, False),
        ("lstm_backward", call(tail=(None, False, 2, False, False, i(3, 3))), ValueError, False),
        ("lstm_backward", call(replace=[(3, args[3].double())]), TypeError, False),
        ("lstm_backward", call(replace=[(0, args[0][:, :1])]), ValueError, False),
        ("lstm_backward", call(replace=[(8, args[8][:, :4])]), ValueError, False),
        ("lstm_backward", call(replace=[(6, args[6][0])]), ValueError, False),
        ("lstm_backward", call(tail=([2, 1], False, 2, True, False, None)), ValueError, False),
        ("lstm_backward", call(tail=([1, 2, 2], False, 2, True, False, None)), ValueError, False),
        ("lstm_backward", call(tail=(None, False, 2, True, False, i(3, 8).int())), TypeError, False),
        ("lstm_backward", call(tail=(None, False, 2, True, False, i(3, 8, fill=20))), IndexError, True),
    ]


def test_bad_arguments_raise_like_the_reference(backend_device):
    name, device = backend_device
    ops, reference = backends.get(name), backends.get("reference")
    for op, args, exc_type, reads_values in _bad_calls(device):
        if reads_values and device != "cpu":
            continue  # on CUDA, index values are checked by asynchronous device assertions
        with pytest.raises(exc_type) as want:
            getattr(reference, op)(*args)
        with pytest.raises(exc_type) as got:
            getattr(ops, op)(*args)
        assert str(got.value) == str(want.value), (op, str(got.value), str(want.value))
        assert str(got.value).startswith(f"meprop.{op}: "), str(got.value)


def test_opcheck_every_op(backend_device):
    """torch.library.opcheck on each op of the backend's namespace.

    The ops compute gradients and have no derivative of their own: their Autograd kernel raises for a
    backward through them (checked here), which test_autograd_registration accepts on inputs that require
    grad; the tracing tests run on inputs that do not."""
    name, device = backend_device
    if name == "reference":
        pytest.skip("the reference is plain PyTorch functions, not torch.library ops")
    ops = backends.get(name)
    gen = torch.Generator().manual_seed(10)
    dy, x, w = (gaussian(s, torch.float32, gen, device) for s in ((9, 11), (9, 7), (11, 7)))
    idx = distinct_index(11, 4, gen, device)
    vals, ridx = gaussian((9, 3), torch.float32, gen, device), row_index(9, 11, 3, gen, device)
    rows = gaussian((4, 7), torch.float32, gen, device)
    args = {
        "column_scores": (dy,),
        "topk_unified": (dy, 4),
        "topk_rows": (dy, 3),
        "topk_unified_feedback": (dy, gaussian((11,), torch.float32, gen, device).abs(), 4, 0.5, True),
        "linear_input_grad_unified": (dy, w, idx),
        "linear_weight_grad_unified": (dy, x, idx),
        "linear_input_grad_rows": (vals, ridx, w),
        "linear_weight_grad_rows": (vals, ridx, x, 11, torch.unique(ridx)),
        "scatter_rows": (rows, idx, 11),
        "linear_backward_unified": (dy, x, w, 4, None, True, True, True, False, False),
        "linear_backward_rows": (dy, x, w, 3, None, True, True, True, False, False),
        "lstm_backward": (*lstm_args(3, 2, 4, 5, torch.float32, gen, device), [2, 2, 1], True, 2, True, False, None),
        "lstm_forward": next(_lstm_forward_cases(torch.float32, gen, device)),
    }
    assert set(args) == set(OP_NAMES)
    # torch.compile cannot trace Triton ops running in the interpreter (CPU tensors): skip that part there.
    utils = ("test_schema", "test_faketensor")
    if not (name == "triton" and device == "cpu"):
        utils += ("test_aot_dispatch_dynamic",)
    for op in OP_NAMES:
        torch.library.opcheck(getattr(ops, op), args[op], test_utils=utils)
        grad_args = tuple(
            a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args[op]
        )
        torch.library.opcheck(getattr(ops, op), grad_args, test_utils=("test_autograd_registration",))
    out = ops.linear_input_grad_unified(dy.requires_grad_(), w, idx)
    with pytest.raises(RuntimeError, match="not implemented|no autograd formula"):  # names the op
        out.sum().backward()
