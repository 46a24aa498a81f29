"""meprop.Linear and meprop.convert as drop-ins for nn.Linear."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import meprop


def test_forward_and_state_dict_match_nn_linear():
    torch.manual_seed(0)
    dense = nn.Linear(12, 7)
    layer = meprop.Linear(12, 7, k=3)
    layer.load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, 12)
    assert torch.equal(layer(x), dense(x))
    assert layer.weight.shape == (7, 12)
    back = nn.Linear(12, 7)
    back.load_state_dict(layer.state_dict())
    assert torch.equal(back.weight, dense.weight) and torch.equal(back.bias, dense.bias)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_repr_shows_k_and_mode():
    text = repr(meprop.Linear(512, 512, k=32))
    assert "in_features=512" in text and "k=32" in text and "mode='unified'" in text
    text = repr(meprop.Linear(4, 8, bias=False, k=0.5, mode="per_example", backend="reference", sparse_grad=True))
    assert "k=0.5" in text and "per_example" in text and "reference" in text and "sparse_grad=True" in text


def test_constructor_validates_and_names_the_layer():
    with pytest.raises(ValueError, match=r"meprop.Linear\(4, 8\): k must be >= 1"):
        meprop.Linear(4, 8, k=0)
    with pytest.raises(ValueError, match=r"meprop.Linear\(4, 8\): k must be a positive int"):
        meprop.Linear(4, 8, k=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        meprop.Linear(4, 8, k=2, mode="nope")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        meprop.Linear(4, 8, k=2, backend="gpu")
    with pytest.raises(TypeError):
        meprop.Linear(4, 8, 2)  # k is keyword-only


def test_device_and_dtype_arguments():
    layer = meprop.Linear(3, 5, dtype=torch.float64, device="cpu", k=2)
    assert layer.weight.dtype == torch.float64
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.dtype == torch.float64 and layer.weight.grad.dtype == torch.float64


def test_convert_nested_model_shares_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 10),
        nn.ReLU(),
        nn.ModuleList([nn.Sequential(nn.Linear(10, 10), nn.Tanh())]),
        nn.MultiheadAttention(10, 2),
        nn.Linear(10, 3),
    )
    weights = [m.weight for m in model.modules() if type(m) is nn.Linear]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = meprop.convert(model, k=4, mode="per_example", skip_last=True)
    assert converted is model
    assert isinstance(model[0], meprop.Linear) and isinstance(model[2][0][0], meprop.Linear)
    assert type(model[4]) is nn.Linear  # skip_last
    assert type(model[3].out_proj) is not meprop.Linear  # subclasses are left alone
    assert model[0].weight is weights[0] and model[2][0][0].weight is weights[1]
    assert model[0].mode == "per_example"
    x = torch.randn(5, 6)
    model[4](model[2][0](model[1](model[0](x)))).sum().backward()
    optimizer.step()  # the optimizer built before convert still owns the same parameters


def test_convert_a_bare_linear_and_keeps_training_flag():
    lin = nn.Linear(4, 4).eval()
    new = meprop.convert(lin, k=2)
    assert isinstance(new, meprop.Linear) and not new.training and new.weight is lin.weight


def _train(model, steps=60):
    torch.manual_seed(1)
    x = torch.randn(256, 20)
    y = (x[:, :5].sum(1) > 0).long() + (x[:, 5] > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", meprop.MODES)
def test_small_mlp_trains(mode):
    torch.manual_seed(0)
    model = nn.Sequential(meprop.Linear(20, 64, k=8, mode=mode), nn.ReLU(), meprop.Linear(64, 3, k=2, mode=mode))
    losses = _train(model)
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def test_sparse_grad_trains_with_sgd_adagrad_sparse_adam_and_adam_refuses():
    for opt_cls in (torch.optim.SGD, torch.optim.Adagrad):
        torch.manual_seed(0)
        layer = meprop.Linear(20, 3, k=2, sparse_grad=True)
        opt = opt_cls(layer.parameters(), lr=0.1)
        x = torch.randn(64, 20)
        y = x[:, :3].argmax(1)
        first = None
        for _ in range(30):
            loss = nn.functional.cross_entropy(layer(x), y)
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            assert layer.weight.grad.is_sparse
            opt.step()
        assert loss.item() < first
    torch.manual_seed(0)
    layer = meprop.Linear(20, 3, k=2, sparse_grad=True)
    sparse_adam, adam = torch.optim.SparseAdam([layer.weight], lr=0.05), torch.optim.Adam([layer.bias], lr=0.05)
    x = torch.randn(64, 20)
    y = x[:, :3].argmax(1)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(layer(x), y)
        losses.append(loss.item())
        sparse_adam.zero_grad()
        adam.zero_grad()
        loss.backward()
        sparse_adam.step()
        adam.step()
    assert losses[-1] < 0.5 * losses[0]
    layer = meprop.Linear(20, 3, k=2, sparse_grad=True)
    layer(torch.randn(4, 20)).sum().backward()
    with pytest.raises(RuntimeError, match="(?i)sparse"):
        torch.optim.Adam(layer.parameters()).step()


def test_import_without_extension_falls_back_to_reference():
    script = textwrap.dedent(
        """
        import importlib.abc, sys, warnings
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "meprop._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import meprop
        assert any("blocked for the test" in str(w.message) for w in caught), [str(w.message) for w in caught]
        import torch
        assert meprop.backends.resolve(None, torch.device("cpu")).name == "reference"
        layer = meprop.Linear(8, 6, k=2)
        x = torch.randn(3, 8, requires_grad=True)
        layer(x).sum().backward()
        assert (layer.weight.grad.abs().sum(1) != 0).sum() == 2
        try:
            meprop.Linear(8, 6, k=2, backend="cpu")(x)
        except RuntimeError as exc:
            assert "failed to load" in str(exc)
        else:
            raise AssertionError("backend='cpu' must fail without the extension")
        print("fallback ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
