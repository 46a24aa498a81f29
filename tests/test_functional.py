"""meprop.functional.linear: every mode and backend against the reference path and dense autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conformance import ALL_DTYPES as DTYPES
from conformance import assert_close, tie_free_columns, tie_free_rows

import meprop
from meprop import backends, functional, reference

KERNEL_BACKENDS = [b for b in backends.available("cpu") if b != "reference"]


def grads(backend, x, w, b, dy, **kw):
    """(dx, dW, db) of meprop.functional.linear for output gradient dy."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    functional.linear(x, w, b, backend=backend, **kw).backward(dy)
    return x.grad, w.grad, b.grad


def tie_free_dy(mode, shape, dtype, gen):
    n = math.prod(shape[:-1])
    make = tie_free_columns if mode == "unified" else tie_free_rows
    return make(n, shape[-1], dtype, gen).reshape(shape)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", functional.MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference(backend, mode, dtype, gen):
    if dtype not in backends.get(backend).dtypes:
        pytest.skip(f"backend {backend!r} does not take {dtype}")
    for lead, i, o, k in [((6,), 9, 12, 1), ((3, 5), 20, 33, 7), ((2, 2, 4), 8, 40, 39)]:
        x = torch.randn(*lead, i, generator=gen).to(dtype)
        w, b = torch.randn(o, i, generator=gen).to(dtype), torch.randn(o, generator=gen).to(dtype)
        dy = tie_free_dy(mode, (*lead, o), dtype, gen)
        outs = {}
        for name in (backend, "reference"):
            g = torch.Generator().manual_seed(7)  # the random modes draw the same indices
            outs[name] = grads(name, x, w, b, dy, k=k, mode=mode, generator=g)
        for got, want in zip(outs[backend], outs["reference"]):
            assert_close(got, want)


@pytest.mark.parametrize("backend", backends.available("cpu"))
@pytest.mark.parametrize("mode", functional.MODES)
def test_semantics_against_masked_dense_gradient(backend, mode, gen):
    """The gradients are those of dense backprop with dy masked to the selected entries."""
    x, w, b = torch.randn(10, 8, generator=gen), torch.randn(16, 8, generator=gen), torch.randn(16, generator=gen)
    dy = tie_free_dy(mode, (10, 16), torch.float32, gen)
    k = 5
    dx, dw, db = grads(backend, x, w, b, dy, k=k, mode=mode, generator=torch.Generator().manual_seed(3))
    if mode == "unified":
        mask = torch.zeros(16, dtype=torch.bool)
        mask[dy.abs().sum(0).topk(k).indices] = True
        mask = mask.expand(10, 16)
    elif mode == "per_example":
        mask = torch.zeros(10, 16, dtype=torch.bool).scatter_(1, dy.abs().topk(k, dim=1).indices, True)
    else:  # random: the kept set is recovered from the weight gradient's non-zero rows / dx's support
        mask = None
    if mask is not None:
        masked = dy * mask
        assert_close(dx, masked @ w)
        assert_close(dw, masked.t() @ x)
    else:
        touched = dw.abs().sum(1) != 0
        assert touched.sum().item() == k if mode == "random_unified" else touched.sum().item() >= k
    assert_close(db, dy.sum(0))


@pytest.mark.parametrize("backend", backends.available("cpu"))
@pytest.mark.parametrize("mode", functional.MODES)
@pytest.mark.parametrize("k", [17, 100, 1.0, None])
def test_k_at_least_out_is_exactly_dense(backend, mode, k, gen):
    x, w, b = torch.randn(4, 3, 9, generator=gen), torch.randn(17, 9, generator=gen), torch.randn(17, generator=gen)
    dy = torch.randn(4, 3, 17, generator=gen)
    got = grads(backend, x, w, b, dy, k=k, mode=mode)
    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, w, b))
    F.linear(x2, w2, b2).backward(dy)
    for g, want in zip(got, (x2.grad, w2.grad, b2.grad)):
        assert torch.equal(g, want)


def test_ratio_k():
    assert functional.resolve_k(0.1, 500) == 50
    assert functional.resolve_k(0.001, 500) == 1
    assert functional.resolve_k(1.0, 500) is None
    assert functional.resolve_k(499, 500) == 499
    assert functional.resolve_k(500, 500) is None


@pytest.mark.parametrize("bad", [0, -3, True, False, 1.5, 0.0, 2.0, "8", torch.tensor(3)])
def test_bad_k_is_a_value_error(bad):
    x, w = torch.randn(2, 3), torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match="k must"):
        functional.linear(x, w, k=bad)


def test_bad_inputs():
    w = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        functional.linear(torch.randn(2, 3), w, k=2, mode="topk")
    with pytest.raises(TypeError, match="floating-point"):
        functional.linear(torch.ones(2, 3, dtype=torch.long), w, k=2)
    with pytest.raises(TypeError, match="float64 but weight is torch.float32"):
        functional.linear(torch.randn(2, 3, dtype=torch.float64), w, k=2)
    with pytest.raises(ValueError, match="is on meta but weight is on cpu"):
        functional.linear(torch.randn(2, 3, device="meta"), w, k=2)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        functional.linear(torch.randn(2, 3), w, k=2, backend="gpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this case"):
        functional.linear(torch.randn(2, 3), w, k=2, backend="cuda")


def test_nan_in_dy_propagates_instead_of_being_dropped():
    for mode in ("unified", "per_example"):
        x, w = torch.randn(4, 6), torch.randn(10, 6)
        dy = torch.randn(4, 10)
        dy[1, 3] = float("nan")
        dx, dw, _ = grads("reference", x, w, torch.zeros(10), dy, k=2, mode=mode)
        dx2, dw2, _ = grads(backends.resolve(None, torch.device("cpu")).name, x, w, torch.zeros(10), dy, k=2, mode=mode)
        for g in (dx, dx2):
            assert torch.isnan(g[1]).all()
        for g in (dw, dw2):
            assert torch.isnan(g[3]).all()


def test_only_needed_gradients_are_computed(gen):
    x = torch.randn(5, 4, generator=gen)  # does not require grad
    w = torch.randn(6, 4, generator=gen, requires_grad=True)
    y = functional.linear(x, w, None, k=2)
    y.backward(torch.randn(5, 6, generator=gen))
    assert w.grad is not None and x.grad is None
    with torch.no_grad():
        assert torch.equal(functional.linear(x, w, k=2), F.linear(x, w))


def test_random_modes_follow_the_generator(gen):
    x, w, b = torch.randn(8, 5, generator=gen), torch.randn(20, 5, generator=gen), torch.zeros(20)
    dy = torch.randn(8, 20, generator=gen)
    for mode in ("random_unified", "random_per_example"):
        a = grads("reference", x, w, b, dy, k=4, mode=mode, generator=torch.Generator().manual_seed(1))
        b1 = grads("reference", x, w, b, dy, k=4, mode=mode, generator=torch.Generator().manual_seed(1))
        c = grads("reference", x, w, b, dy, k=4, mode=mode, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a[1], b1[1]) and not torch.equal(a[1], c[1])
        per_row = (a[0] != 0).sum().item()
        assert per_row > 0


@pytest.mark.parametrize("backend", backends.available("cpu"))
@pytest.mark.parametrize("mode", ["unified", "per_example", "random_unified"])
def test_sparse_weight_gradient_equals_dense(backend, mode, gen):
    x, w, b = torch.randn(7, 3, 6, generator=gen), torch.randn(30, 6, generator=gen), torch.randn(30, generator=gen)
    dy = torch.randn(7, 3, 30, generator=gen)
    dense = grads(backend, x, w, b, dy, k=4, mode=mode, generator=torch.Generator().manual_seed(5))
    sparse = grads(backend, x, w, b, dy, k=4, mode=mode, generator=torch.Generator().manual_seed(5), sparse_grad=True)
    assert sparse[1].is_sparse
    returned = meprop.linear_backward(dy, x, w, k=4, mode=mode, backend=backend, sparse_grad=True,
                                      generator=torch.Generator().manual_seed(5))[1]
    assert returned.is_coalesced() and torch.equal(returned.to_dense(), sparse[1].to_dense())
    assert sparse[1]._nnz() <= 30 and (mode == "per_example" or sparse[1]._nnz() == 4)
    assert_close(sparse[1].to_dense(), dense[1])
    assert_close(sparse[0], dense[0])


def test_reference_products_are_exact_gradients_for_a_fixed_index_set(gen):
    """With S fixed, meProp's unified gradients are the true gradients of <dy[:, S], (x W^T)[:, S]>."""
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    dy = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    idx = torch.tensor([7, 2, 4])
    ((x @ w.t())[:, idx] * dy[:, idx]).sum().backward()
    assert_close(reference.linear_input_grad_unified(dy, w.detach(), idx), x.grad)
    assert_close(reference.scatter_rows(reference.linear_weight_grad_unified(dy, x.detach(), idx), idx, 9), w.grad)


def test_reference_ops_pass_gradcheck(gen):
    f64 = dict(dtype=torch.float64, requires_grad=True)
    dy, x, w = torch.randn(5, 7, **f64), torch.randn(5, 4, **f64), torch.randn(7, 4, **f64)
    idx = torch.tensor([5, 0, 3])
    vals, ridx = torch.randn(5, 2, **f64), torch.tensor([[0, 6], [1, 2], [6, 5], [3, 4], [0, 1]])
    rows = torch.randn(3, 4, **f64)
    checks = [
        (lambda a, b: reference.linear_input_grad_unified(a, b, idx), (dy, w)),
        (lambda a, b: reference.linear_weight_grad_unified(a, b, idx), (dy, x)),
        (lambda a, b: reference.linear_input_grad_rows(a, ridx, b), (vals, w)),
        (lambda a, b: reference.linear_weight_grad_rows(a, ridx, b, 7), (vals, x)),
        (lambda a: reference.scatter_rows(a, idx, 7), (rows,)),
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args)


def test_linear_backward_is_public():
    x, w = torch.randn(3, 4), torch.randn(6, 4)
    dx, dw, db = meprop.linear_backward(torch.ones(3, 6), x, w, k=2, backend="reference", bias_grad=False)
    assert dx.shape == (3, 4) and dw.shape == (6, 4) and db is None
