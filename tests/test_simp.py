"""meSimp: selection counting, real shrinking of the weight matrices, optimizer state slicing, schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import meprop
from meprop import reference
from meprop.simp import Cycle, Simplifier


def _mlp(mode="per_example", k=3, sizes=(6, 8, 7, 4), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return meprop.convert(nn.Sequential(*layers), k=k, mode=mode, skip_last=True)


def _hidden_grads(model, x, grad_out):
    """Run forward/backward with a given output gradient; return the dy of each hidden linear layer."""
    captured = {}
    hidden = [m for m in model if isinstance(m, meprop.Linear)]

    def capture(position):
        def hook(module, inputs, output):
            output.register_hook(lambda grad: captured.__setitem__(position, grad.clone()))

        return hook

    handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(hidden)]
    model(x).backward(grad_out)
    for h in handles:
        h.remove()
    return [captured[i] for i in range(len(hidden))]


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_counts_match_reference_selection(mode):
    model = _mlp(mode)
    simp = Simplifier(model, torch.optim.Adam(model.parameters()))
    expected = [torch.zeros(8, dtype=torch.int64), torch.zeros(7, dtype=torch.int64)]
    for step in range(3):
        x = torch.randn(5, 6)
        grad_out = torch.randn(5, 4)
        model.zero_grad()
        # the Simplifier's hook sees the same dy; recompute it on an identical copy to get the expectation
        twin = _mlp(mode)
        twin.load_state_dict(model.state_dict())
        for position, dy in enumerate(_hidden_grads(twin, x, grad_out)):
            if mode == "per_example":
                _, idx = reference.topk_rows(dy, 3)
                expected[position] += torch.bincount(idx.flatten(), minlength=dy.shape[1])
            else:
                expected[position][reference.topk_unified(dy, 3)] += dy.shape[0]
        model(x).backward(grad_out)
    assert simp.examples == 15
    assert all(torch.equal(c, e) for c, e in zip(simp.counts, expected))
    assert all(int(c.sum()) == 15 * 3 for c in simp.counts)  # k selections per example


def test_prune_really_shrinks_and_matches_masking():
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    for _ in range(3):  # some Adam state to slice
        optimizer.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        optimizer.step()
    simp = Simplifier(model, optimizer, threshold=0.5)
    old = {name: p.detach().clone() for name, p in model.named_parameters()}
    old_state = {name: {key: v.clone() for key, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    keep0, keep2 = torch.tensor([0, 2, 3, 7]), torch.tensor([1, 2, 4, 5, 6])
    simp.examples = 10
    simp.counts[0][keep0] = 5  # exactly the threshold: kept
    simp.counts[0][1] = 4  # below: removed
    simp.counts[1][keep2] = 9
    x = torch.randn(5, 6)
    with torch.no_grad():  # the reference: the old model with the removed neurons masked out
        h = torch.relu(x @ old["0.weight"].T + old["0.bias"])
        h[:, [i for i in range(8) if i not in keep0.tolist()]] = 0
        h = torch.relu(h @ old["2.weight"].T + old["2.bias"])
        h[:, [i for i in range(7) if i not in keep2.tolist()]] = 0
        expected = h @ old["4.weight"].T + old["4.bias"]

    assert simp.prune() == [4, 5]

    assert model[0].weight.shape == (4, 6) and model[0].out_features == 4
    assert model[2].weight.shape == (5, 4) and (model[2].in_features, model[2].out_features) == (4, 5)
    assert model[4].weight.shape == (4, 5) and model[4].in_features == 5
    assert torch.equal(model[0].weight, old["0.weight"][keep0])
    assert torch.equal(model[2].weight, old["2.weight"][keep2][:, keep0])
    assert torch.equal(model[4].weight, old["4.weight"][:, keep2])
    assert torch.allclose(model.eval()(x), expected, atol=1e-6)
    # the optimizer holds exactly the model's new parameters, with state cut the same way
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert len(optimizer.state) == len(list(model.parameters()))
    cuts = {"0.weight": lambda t: t[keep0], "0.bias": lambda t: t[keep0], "2.weight": lambda t: t[keep2][:, keep0],
            "2.bias": lambda t: t[keep2], "4.weight": lambda t: t[:, keep2], "4.bias": lambda t: t}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], cuts[name](old_state[name][key])), (name, key)
        assert torch.equal(state["step"], old_state[name]["step"])
    assert simp.examples == 0 and [c.numel() for c in simp.counts] == [4, 5] and all(int(c.sum()) == 0 for c in simp.counts)


def test_pruned_model_keeps_training_and_counting():
    torch.manual_seed(1)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = _mlp(k=3, sizes=(6, 32, 32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = Simplifier(model, optimizer, threshold=0.2)

    def epoch():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model.train()(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    first = epoch()
    sizes = simp.prune()
    assert sizes[0] < 32 and sizes[1] < 32  # k=3 of 32: most neurons are kept by < 20% of examples
    losses = [epoch() for _ in range(60)]
    assert losses[-1] < first * 0.7
    assert simp.examples == 64 * 60 and simp.counts[0].numel() == sizes[0]


def test_prune_keeps_at_least_one_neuron():
    model = _mlp()
    simp = Simplifier(model, torch.optim.SGD(model.parameters(), lr=0.1), threshold=1.0)
    simp.examples = 10
    simp.counts[0][5] = 3
    simp.counts[1][2] = 1
    assert simp.prune() == [1, 1]
    model(torch.randn(2, 6)).sum().backward()  # still a working model


def test_state_dict_round_trip():
    model = _mlp()
    simp = Simplifier(model, torch.optim.Adam(model.parameters()))
    model(torch.randn(3, 6)).sum().backward()
    saved = simp.state_dict()
    other = Simplifier(_mlp(), torch.optim.Adam(model.parameters()))
    other.load_state_dict(saved)
    assert other.examples == 3 and all(torch.equal(a, b) for a, b in zip(other.counts, simp.counts))
    small = _mlp(sizes=(6, 5, 7, 4))
    with pytest.raises(ValueError, match="hidden sizes"):
        Simplifier(small, torch.optim.Adam(small.parameters())).load_state_dict(saved)


def test_bad_arguments():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="threshold"):
        Simplifier(model, opt, threshold=1.5)
    with pytest.raises(ValueError, match="mode"):
        Simplifier(_mlp(mode="random_unified"), opt)
    dense = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="meprop.Linear"):
        Simplifier(dense, opt)
    with pytest.raises(ValueError, match="hidden"):
        Simplifier(nn.Sequential(meprop.Linear(3, 2, k=1)), opt)
    with pytest.raises(ValueError, match="cycle_epochs"):
        Cycle(cycle_epochs=0)


def test_cycle_schedule():
    cycle = Cycle()  # the seed's: 5-epoch cycles, 8 prunes per epoch in even cycles
    assert [e for e in range(20) if cycle.prunes_in(e)] == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert [e for e in range(20) if cycle.resets_optimizer_before(e)] == [5, 10, 15]
    steps = cycle.prune_steps(1100)
    assert len(steps) == 8 and max(steps) == 1099 and min(steps) == 137
    assert cycle.prune_steps(3) == {0, 1, 2}
