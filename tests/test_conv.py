"""meprop.Conv2d: gradients against an independent oracle, drop-in behaviour, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import meprop


@pytest.fixture(autouse=True, params=["shifts", "onednn"])
def cpu_path(request, monkeypatch):
    """Every test runs on both CPU backward paths (the shifted-copies GEMMs and the oneDNN convolutions)."""
    monkeypatch.setattr(meprop.conv, "SHIFTS_MIN_INPUT", 0 if request.param == "shifts" else 2**62)
    return request.param


def oracle_grads(dense: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, k: int):
    """Autograd through nn.Conv2d with a hook masking dy to its top-k channels (by sum |dy|); dense db."""
    x = x.detach().clone().requires_grad_()
    kept = {}

    def hook(dy):
        scores = dy.abs().sum((0, 2, 3))
        mask = torch.zeros_like(scores).index_fill_(0, scores.topk(k).indices, 1)
        kept["idx"] = scores.topk(k).indices
        return dy * mask[None, :, None, None]

    out = dense(x)
    out.register_hook(hook)
    dx, dw = torch.autograd.grad(out, (x, dense.weight), g)
    return dx, dw, g.sum((0, 2, 3)), kept["idx"]


def tie_free(shape, gen):
    """Channel scores that differ clearly: every channel of dy scaled by a distinct factor."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    scale = torch.randperm(shape[1], generator=gen).to(torch.float64) + 1.0
    return g * scale[None, :, None, None]


GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=2, dilation=2),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(0, 1)),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=1, bias=False),
    dict(kernel_size=(3, 2), padding=(2, 0), dilation=(1, 2)),
]


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: ",".join(f"{k}={v}" for k, v in g.items()))
def test_gradients_match_the_masking_oracle(backend, geometry):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    dense = nn.Conv2d(5, 9, **geometry).double()
    layer = meprop.Conv2d.from_conv(dense, k=3, backend=backend)
    x = torch.randn(4, 5, 9, 10, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, dense(x))
    g = tie_free(y.shape, gen)
    params = (x, layer.weight) + ((layer.bias,) if layer.bias is not None else ())
    grads = torch.autograd.grad(y, params, g)
    dx, dw, db, kept = oracle_grads(dense, x, g, 3)
    torch.testing.assert_close(grads[0], dx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[1], dw, rtol=1e-10, atol=1e-10)
    dropped = torch.ones(9, dtype=torch.bool).index_fill_(0, kept, False)
    assert torch.count_nonzero(grads[1][dropped]) == 0  # every unselected row exactly zero
    if layer.bias is not None:
        torch.testing.assert_close(grads[2], db)
    assert layer.last_k == 3


def test_float32_default_backend_matches_reference():
    gen = torch.Generator().manual_seed(3)
    layer = meprop.Conv2d(6, 16, 3, padding=1, k=4)
    ref = meprop.Conv2d(6, 16, 3, padding=1, k=4, backend="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 6, 8, 8, generator=gen)
    g = tie_free((3, 16, 8, 8), gen).float()
    a = torch.autograd.grad(layer(x.requires_grad_()), (x, layer.weight, layer.bias), g)
    b = torch.autograd.grad(ref(x), (x, ref.weight, ref.bias), g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


def test_dense_when_k_covers_every_channel():
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 4, 3)
    layer = meprop.Conv2d.from_conv(dense, k=4)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    g = torch.randn(2, 4, 4, 4)
    a = torch.autograd.grad(layer(x), (x, layer.weight), g)
    b = torch.autograd.grad(dense(x), (x, dense.weight), g)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_state_dict_both_ways_and_shared_parameters():
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    layer = meprop.Conv2d(3, 8, 3, stride=2, padding=1, k=2)
    layer.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(layer(x), dense(x)) and torch.equal(layer(x[0]), dense(x[0]))  # batched and unbatched
    back = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    back.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"weight", "bias"} and torch.equal(back.weight, dense.weight)
    shared = meprop.Conv2d.from_conv(dense, k=2)
    assert shared.weight is dense.weight and shared.bias is dense.bias
    assert "k=2" in repr(shared) and isinstance(shared, nn.Conv2d)


def test_random_unified_keeps_k_channels():
    layer = meprop.Conv2d(2, 6, 1, k=2, mode="random_unified", generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 2, 4, 4)
    layer(x).sum().backward()
    assert (layer.weight.grad.flatten(1).abs().sum(1) > 0).sum() == 2


def test_errors_name_meprop_and_the_argument():
    with pytest.raises(ValueError, match=r"meprop.Conv2d\(4, 8\): groups=2 is not supported"):
        meprop.Conv2d(4, 8, 3, groups=2, k=2)
    with pytest.raises(ValueError, match=r"meprop.Conv2d\(4, 8\): k must be >= 1"):
        meprop.Conv2d(4, 8, 3, k=0)
    with pytest.raises(ValueError, match="per-example selection is not provided"):
        meprop.Conv2d(4, 8, 3, k=2, mode="per_example")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        meprop.Conv2d(4, 8, 3, k=2, backend="triton")
    with pytest.raises(ValueError, match="max_k=9 is larger than the layer's 8 outputs"):
        meprop.Conv2d(4, 8, 3, k=meprop.Adaptive(0.9, max_k=9))


def test_functional_conv2d_matches_the_module():
    torch.manual_seed(0)
    layer = meprop.Conv2d(3, 6, 3, padding=1, k=2)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    g = torch.randn(2, 6, 5, 5)
    a = torch.autograd.grad(layer(x), (x, layer.weight), g)
    b = torch.autograd.grad(meprop.conv.conv2d(x, layer.weight, layer.bias, 1, 1, k=2), (x, layer.weight), g)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_channels_last_tensors_match_the_oracle_and_keep_their_layout():
    gen = torch.Generator().manual_seed(4)
    cl = torch.channels_last
    dense = nn.Conv2d(5, 9, 3, padding=1).double().to(memory_format=cl)
    layer = meprop.Conv2d.from_conv(dense, k=3)
    x = torch.randn(4, 5, 8, 8, dtype=torch.float64, generator=gen).contiguous(memory_format=cl).requires_grad_()
    g = tie_free((4, 9, 8, 8), gen).contiguous(memory_format=cl)
    dx, dw, db = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)
    odx, odw, odb, _ = oracle_grads(dense, x, g, 3)
    torch.testing.assert_close(dx, odx)
    torch.testing.assert_close(dw, odw)
    torch.testing.assert_close(db, odb)
    assert dx.is_contiguous(memory_format=cl)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_chunks_of_examples_match_the_oracle(monkeypatch, layout):
    """The shifted-dy GEMMs and the channel scores over chunks of 2, 2 and 1 examples (budgets shrunk)."""
    n, c_out, k, h, w = 5, 9, 3, 7, 6
    monkeypatch.setattr(meprop.conv, "SHIFTS_BUDGET", 2 * k * 9 * h * w * 8)  # 2 examples of k 3x3 taps, fp64
    monkeypatch.setattr(meprop.conv, "SCORES_BUDGET", 2 * c_out * h * w * 8)
    gen = torch.Generator().manual_seed(5)
    dense = nn.Conv2d(4, c_out, 3, padding=1).double().to(memory_format=layout)
    layer = meprop.Conv2d.from_conv(dense, k=k)
    x = torch.randn(n, 4, h, w, dtype=torch.float64, generator=gen).contiguous(memory_format=layout).requires_grad_()
    g = tie_free((n, c_out, h, w), gen).contiguous(memory_format=layout)
    dx, dw, db = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)
    odx, odw, odb, _ = oracle_grads(dense, x, g, k)
    torch.testing.assert_close(dx, odx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, odw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(db, odb)
    assert dx.is_contiguous(memory_format=layout)
