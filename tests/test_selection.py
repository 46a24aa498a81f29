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


def test_linear_error_feedback_carries_the_dropped_columns():
    torch.manual_seed(0)
    layer = meprop.Linear(4, 6, k=2, error_feedback=True).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g1 = torch.randn(3, 6, dtype=torch.float64) * (torch.arange(6) + 1.0)
    g2 = torch.randn(3, 6, dtype=torch.float64) * (6.0 - torch.arange(6))
    torch.autograd.grad(layer(x), (x, layer.weight), g1)
    kept1 = g1.abs().sum(0).topk(2).indices
    memory = g1.clone().index_fill_(1, kept1, 0)
    assert torch.equal(layer.feedback, memory)
    dx, dw = torch.autograd.grad(layer(x), (x, layer.weight), g2)
    total = g2 + memory
    kept2 = total.abs().sum(0).topk(2).indices
    odx, odw = masked_linear_grads(x, layer.weight, total, kept2)
    torch.testing.assert_close(dx, odx)
    torch.testing.assert_close(dw, odw)
    torch.testing.assert_close(layer.feedback, total.clone().index_fill_(1, kept2, 0))
    # another batch shape: the memory starts again
    torch.autograd.grad(layer(x[:2]), (layer.weight,), g2[:2])
    assert layer.feedback.shape == (2, 6)


def test_feedback_buffer_in_state_dict_both_ways():
    layer = meprop.Linear(4, 6, k=2, error_feedback=True)
    layer(torch.randn(3, 4)).sum().backward()
    state = layer.state_dict()
    assert state["feedback"].shape == (3, 6)
    other = meprop.Linear(4, 6, k=2, error_feedback=True)
    other.load_state_dict(state)  # any stored shape
    assert torch.equal(other.feedback, layer.feedback)
    other.load_state_dict(nn.Linear(4, 6).state_dict())  # a plain layer's state: empty memory
    assert other.feedback.numel() == 0
    conv = meprop.Conv2d(2, 4, 1, k=1, error_feedback=True)
    conv(torch.randn(2, 2, 3, 3)).sum().backward()
    assert conv.state_dict()["feedback"].shape == (2, 4, 3, 3)


def test_conv_adaptive_and_error_feedback_match_oracle():
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 8, 3, padding=1).double()
    layer = meprop.Conv2d.from_conv(dense, k=meprop.Adaptive(0.6), error_feedback=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    scale = (torch.arange(8) + 1.0)[None, :, None, None]
    g1, g2 = torch.randn(2, 8, 5, 5, dtype=torch.float64) * scale, torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.autograd.grad(layer(x), (layer.weight,), g1)
    s1 = g1.abs().sum((0, 2, 3))
    k1 = int(select(s1, meprop.Adaptive(0.6)).numel())
    assert layer.last_k == k1
    total = g2 + g1.clone().index_fill_(1, s1.topk(k1).indices, 0)
    (dw,) = torch.autograd.grad(layer(x), (layer.weight,), g2)
    kept = select(total.abs().sum((0, 2, 3)), meprop.Adaptive(0.6))
    mask = torch.zeros(8, dtype=torch.float64).index_fill_(0, kept, 1)[None, :, None, None]
    y = dense(x)
    (odw,) = torch.autograd.grad(y, (dense.weight,), total * mask)
    torch.testing.assert_close(dw, odw)
