"""Adaptive k and error feedback (meprop.selection) on Linear and Conv2d, against plain PyTorch oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import meprop
from meprop.selection import select


def test_select_adaptive_is_the_smallest_prefix_reaching_the_mass():
    scores = torch.tensor([1.0, 8.0, 4.0, 2.0, 5.0])  # total 20; sorted 8, 5, 4, 2, 1
    assert select(scores, meprop.Adaptive(0.6)).tolist() == [1, 4]  # 13 >= 12
    assert select(scores, meprop.Adaptive(0.65)).tolist() == [1, 4]  # 13 >= 13
    assert select(scores, meprop.Adaptive(0.66)).tolist() == [1, 4, 2]
    assert select(scores, meprop.Adaptive(1.0)).numel() == 5
    assert select(scores, meprop.Adaptive(0.99, max_k=2)).numel() == 2
    assert select(scores, meprop.Adaptive(0.1, min_k=3)).numel() == 3
    assert select(torch.zeros(4), meprop.Adaptive(0.9)).numel() == 1
    assert select(scores, 2).tolist() == [1, 4]


def test_adaptive_arguments_are_checked():
    for bad in (0, 1.5, True, "x"):
        with pytest.raises(ValueError, match="meprop.Adaptive: mass"):
            meprop.Adaptive(bad)
    with pytest.raises(ValueError, match="max_k"):
        meprop.Adaptive(0.9, max_k=0)
    with pytest.raises(ValueError, match="min_k"):
        meprop.Adaptive(0.9, min_k=0)
    with pytest.raises(ValueError, match="need mode='unified'"):
        meprop.Linear(4, 8, k=meprop.Adaptive(0.5), mode="per_example")
    with pytest.raises(ValueError, match="need mode='unified'"):
        meprop.Linear(4, 8, k=2, error_feedback=True, mode="per_example")


def masked_linear_grads(x, w, dy_sel, kept):
    """Oracle: dense products of the dy restricted to ``kept`` columns."""
    mask = torch.zeros(w.shape[0], dtype=dy_sel.dtype).index_fill_(0, kept, 1)
    d = dy_sel * mask
    return d @ w, d.t() @ x


@pytest.mark.parametrize("backend", [None, "reference"])
def test_linear_adaptive_k_matches_oracle_and_records_last_k(backend):
    torch.manual_seed(0)
    layer = meprop.Linear(6, 10, k=meprop.Adaptive(0.7), backend=backend).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 10, dtype=torch.float64) * (torch.arange(10) + 1.0) ** 2
    dx, dw, db = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)
    scores = g.abs().sum(0)
    order = scores.argsort(descending=True)
    need = int((scores[order].cumsum(0) >= 0.7 * scores.sum()).nonzero()[0]) + 1
    assert layer.last_k == need and 1 < need < 10
    odx, odw = masked_linear_grads(x, layer.weight, g, order[:need])
    torch.testing.assert_close(dx, odx)
    torch.testing.assert_close(dw, odw)
    torch.testing.assert_close(db, g.sum(0))


def scaled_signs(rows, scales, *trailing):
    """Random signs times fixed per-column magnitudes: ``(rows, len(scales), *trailing)`` with the exact column
    scores ``rows * prod(trailing) * scales`` (tie-free selections by construction)."""
    shape = (rows, len(scales), *trailing)
    signs = torch.randint(0, 2, shape).to(torch.float64) * 2 - 1
    return signs * torch.tensor(scales, dtype=torch.float64).view(1, -1, *([1] * len(trailing)))


def test_linear_error_feedback_carries_the_dropped_scores():
    torch.manual_seed(0)
    layer = meprop.Linear(4, 6, k=2, error_feedback=True).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g1 = scaled_signs(3, [1, 2, 3, 4, 5, 6])  # scores 3 * scales: keeps 5, 4
    g2 = scaled_signs(3, [5, 3, 1, 2.5, 1, 0.5])  # alone it would keep 0, 1
    torch.autograd.grad(layer(x), (x, layer.weight), g1)
    assert layer.last_k == 2
    torch.testing.assert_close(layer.feedback, torch.tensor([1.5, 3, 4.5, 6, 0, 0], dtype=torch.float64))  # decay 0.5
    dx, dw, db = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g2)
    # ranked: 3 * [5, 3, 1, 2.5, 1, .5] + [1.5, 3, 4.5, 6, 0, 0] = [16.5, 12, 7.5, 13.5, 3, 1.5]: keeps 0 and 3
    odx, odw = masked_linear_grads(x, layer.weight, g2, torch.tensor([3, 0]))
    torch.testing.assert_close(dx, odx)
    torch.testing.assert_close(dw, odw)
    torch.testing.assert_close(db, g2.sum(0))  # the bias gradient stays dense
    assert (dw[[1, 2, 4, 5]] == 0).all() and (dw[[0, 3]] != 0).all()
    torch.testing.assert_close(layer.feedback, torch.tensor([0, 6, 3.75, 0, 1.5, 0.75], dtype=torch.float64))
    torch.autograd.grad(layer(x[:2]), (layer.weight,), g2[:2])  # another batch size: the memory carries on
    assert layer.feedback.shape == (6,)


def _backend_case(name):
    problem = meprop.backends.get(name).why_not(torch.device("cpu"))
    return pytest.param(name, marks=[pytest.mark.skip(reason=problem[1])] if problem else [])


@pytest.mark.parametrize("backend", [_backend_case(name) for name in ("reference", "cpu", "triton")])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_error_feedback_over_steps_matches_oracle(backend, bias):
    """Four steps of float32 error feedback (the fused op topk_unified_feedback) against the memory's formula
    and masked dense products; the memory stays float32 for a bfloat16 layer too."""
    torch.manual_seed(1)
    layer = meprop.Linear(5, 7, bias=bias, k=3, error_feedback=0.3, backend=backend)
    x = torch.randn(4, 5, requires_grad=True)
    memory = torch.zeros(7, dtype=torch.float64)
    for step in range(4):
        scales = (torch.randperm(7) + 1).double().tolist()
        g = scaled_signs(4, scales).float()  # scores 4 * scales: exact
        grads = torch.autograd.grad(layer(x), (x, layer.weight, *([layer.bias] if bias else [])), g)
        ranked = 4 * torch.tensor(scales, dtype=torch.float64) + memory
        kept = ranked.argsort(descending=True)[:3]  # no ties: ranked values are distinct here
        odx, odw = masked_linear_grads(x.double(), layer.weight.double(), g.double(), kept)
        torch.testing.assert_close(grads[0].double(), odx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[1].double(), odw, rtol=1e-5, atol=1e-5)
        assert (grads[1][ranked.argsort(descending=True)[3:]] == 0).all(), step
        if bias:
            torch.testing.assert_close(grads[2], g.sum(0))
        memory = (0.3 * ranked).index_fill_(0, kept, 0)
        assert layer.feedback.dtype == torch.float32
        torch.testing.assert_close(layer.feedback.double(), memory, rtol=1e-6, atol=1e-6)
        memory = layer.feedback.double()  # (the layer's float32 rounding carries on)
    low = meprop.Linear(5, 7, k=3, error_feedback=True, dtype=torch.bfloat16, backend=backend)
    if backend != "triton" or torch.bfloat16 in meprop.backends.get("triton").dtypes:
        low(x.detach().bfloat16()).sum().backward()
        assert low.feedback.dtype == torch.float32 and low.feedback.shape == (7,)


@pytest.mark.parametrize("k", [2, meprop.Adaptive(0.6)], ids=["feedback", "adaptive"])
def test_controlled_double_backward_holds_the_selection_fixed(k):
    """create_graph=True: the same first-order gradients and memory as without it, and a gradient penalty
    differentiates dx = (dy masked to the kept columns) W exactly (float64 oracle)."""
    layers = [meprop.Linear(5, 6, k=k, error_feedback=True, dtype=torch.float64) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = torch.autograd.grad(layers[0](x), (x, layers[0].weight), g)
    graph = torch.autograd.grad(layers[1](x), (x, layers[1].weight), g, create_graph=True)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(a, b)
    assert torch.equal(layers[0].feedback, layers[1].feedback) and layers[0].last_k == layers[1].last_k
    assert not layers[1].feedback.requires_grad
    graph[0].square().sum().backward()
    kept = g.abs().sum(0).argsort(descending=True)[: layers[1].last_k]  # the first step: memory 0
    mask = torch.zeros(6, dtype=torch.float64).index_fill_(0, kept, 1.0)
    w = layers[1].weight.detach().clone().requires_grad_()
    ((g * mask) @ w).square().sum().backward()
    torch.testing.assert_close(layers[1].weight.grad, w.grad)
    assert layers[1].weight.grad.abs().sum() > 0


def test_feedback_buffer_in_state_dict_both_ways():
    layer = meprop.Linear(4, 6, k=2, error_feedback=True)
    assert layer.state_dict()["feedback"].numel() == 0  # empty before the first backward
    layer(torch.randn(3, 4)).sum().backward()
    state = layer.state_dict()
    assert state["feedback"].shape == (6,)
    other = meprop.Linear(4, 6, k=2, error_feedback=True)
    other.load_state_dict(state)
    assert torch.equal(other.feedback, layer.feedback)
    other.load_state_dict(nn.Linear(4, 6).state_dict())  # a plain layer's state: empty memory
    assert other.feedback.numel() == 0
    conv = meprop.Conv2d(2, 4, 1, k=1, error_feedback=True)
    conv(torch.randn(2, 2, 3, 3)).sum().backward()
    assert conv.state_dict()["feedback"].shape == (4,)
    with pytest.raises(ValueError, match="error_feedback needs mode='unified'"):
        meprop.Conv2d(2, 4, 1, k=1, error_feedback=True, mode="random_unified")
    for bad in (0.0, 1.5, "yes"):
        with pytest.raises(ValueError, match=r"meprop.Linear\(4, 6\): error_feedback must be a bool or a decay"):
            meprop.Linear(4, 6, k=2, error_feedback=bad)
    assert "error_feedback=0.5" in repr(layer)


def test_conv_adaptive_and_error_feedback_match_oracle():
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 8, 3, padding=1).double()
    layer = meprop.Conv2d.from_conv(dense, k=meprop.Adaptive(0.6), error_feedback=1.0)  # no decay
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    g1 = scaled_signs(2, [1, 2, 3, 4, 5, 6, 7, 8], 5, 5)  # scores 50 * scales, total 1800: 1080 needs 7, 6, 5, 4
    g2 = scaled_signs(2, [6, 1, 2.5, 1, 7.5, 1, 1, 1], 5, 5)  # alone: 4, 0 (675 >= 630)
    torch.autograd.grad(layer(x), (layer.weight,), g1)
    assert layer.last_k == 4
    memory = torch.tensor([50, 100, 150, 200, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(layer.feedback, memory)
    (dw,) = torch.autograd.grad(layer(x), (layer.weight,), g2)
    # ranked: 50 * [7, 3, 5.5, 5, 7.5, 1, 1, 1] (total 1550): 375 + 350 + 275 = 1000 >= 930 keeps 4, 0, 2
    assert layer.last_k == 3
    mask = torch.zeros(8, dtype=torch.float64).index_fill_(0, torch.tensor([0, 2, 4]), 1)[None, :, None, None]
    (odw,) = torch.autograd.grad(dense(x), (dense.weight,), g2 * mask)
    torch.testing.assert_close(dw, odw)
    torch.testing.assert_close(layer.feedback, 50 * torch.tensor([0, 3, 0, 5, 0, 1, 1, 1], dtype=torch.float64))