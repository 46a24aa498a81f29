"""AL components and models: gradient isolation, local losses, shortcut and early-exit inference, meProp."""

import math

import pytest
import torch
import torch.nn.functional as F

from al import (
    ALCNN,
    ALLSTM,
    ALMLP,
    ALSeedLSTM,
    ALSeedTransformer,
    ALTransformer,
    BackpropModel,
    build_model,
    prediction_entropy,
)
from al_helpers import text_batch


def vision_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), None, torch.randint(0, 10, (n,), generator=g)


CASES = {
    "mlp": (lambda: ALMLP(hidden=32, num_components=3, label_dim=16), vision_batch),
    "cnn": (lambda: ALCNN(channels=(4, 8, 8), label_dim=16), vision_batch),
    "lstm": (lambda: ALLSTM(50, 3, embedding_dim=8, hidden=8, num_components=3, label_dim=16, dropout=0.0),
             text_batch),
    "transformer": (lambda: ALTransformer(50, 3, embedding_dim=8, d_model=16, nhead=2, feedforward=32,
                                          num_components=3, max_len=16, dropout=0.0, label_dim=16), text_batch),
    "seed_lstm": (lambda: ALSeedLSTM(50, 3, embedding_dim=8, hidden=6, num_components=3, dropout=0.0, label_dim=16),
                  text_batch),
    "seed_transformer": (lambda: ALSeedTransformer(50, 3, embedding_dim=8, nhead=2, feedforward=16, num_components=3,
                                                   dropout=0.0, label_dim=16), text_batch),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    make, batch = CASES[request.param]
    return make(), batch()


def test_each_local_loss_reaches_only_its_component(case):
    model, (x, mask, labels) = case
    for j in range(model.num_components):
        model.zero_grad(set_to_none=True)
        steps = list(model.local_steps(x, labels, mask))
        for step in steps:
            assert not step.s.requires_grad and not step.t.requires_grad
        steps[j].loss.backward()
        for i, component in enumerate(model.components):
            grads = [p.grad for p in component.parameters()]
            if i == j:
                assert any(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads), f"component {j}'s loss reached component {i}"


def test_component_step_leaves_other_components_gradients_alone(case):
    model, (x, mask, labels) = case
    sentinels = {}
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
        sentinels[p] = p.grad.clone()
    optimizers = model.make_optimizers(lambda params: torch.optim.SGD(params, lr=0.01))
    for j, (step, optimizer) in enumerate(zip(model.local_steps(x, labels, mask), optimizers)):
        optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        optimizer.step()
        for i, component in enumerate(model.components):
            if i > j:  # not yet stepped: their sentinel gradients are untouched
                for p in component.parameters():
                    assert torch.equal(p.grad, sentinels[p])


def test_component_losses_depend_only_on_detached_inputs(case):
    """Perturbing later components changes no earlier component's losses or outputs."""
    model, (x, mask, labels) = case
    model.eval()  # no dropout / batch-norm statistics updates
    before = list(model.local_steps(x, labels, mask))
    with torch.no_grad():
        for p in model.components[-1].parameters():
            p.add_(torch.randn_like(p))
    after = list(model.local_steps(x, labels, mask))
    for b, a in zip(before[:-1], after[:-1]):
        assert torch.equal(b.s, a.s) and torch.equal(b.t, a.t)
        assert torch.equal(b.associated_loss, a.associated_loss)
        assert torch.equal(b.autoencoder_loss, a.autoencoder_loss)


def test_first_autoencoder_loss_is_cross_entropy_and_later_ones_mse(case):
    model, (x, mask, labels) = case
    steps = list(model.local_steps(x, labels, mask))
    first = model.components[0]
    t1 = first.label_encoder(F.one_hot(labels, model.num_classes).float())
    torch.testing.assert_close(steps[0].autoencoder_loss, F.cross_entropy(first.label_decoder(t1), labels))
    second = model.components[1]
    torch.testing.assert_close(
        steps[1].autoencoder_loss, F.mse_loss(second.label_decoder(second.label_encoder(steps[0].t)), steps[0].t)
    )
    torch.testing.assert_close(steps[1].associated_loss, F.mse_loss(second.bridge(steps[1].s, mask), steps[1].t))


def test_local_losses_fall(case):
    model, (x, mask, labels) = case
    optimizers = model.make_optimizers(lambda params: torch.optim.Adam(params, lr=1e-3))
    history = [model.train_step(x, labels, optimizers, mask) for _ in range(40)]
    for i in range(model.num_components):
        for kind in (0, 1):
            start = history[0][i][kind]
            end = sum(h[i][kind] for h in history[-5:]) / 5
            assert end < 0.95 * start, f"component {i} loss {kind}: {start:.4g} -> {end:.4g}"


def test_shortcut_and_early_exit(case):
    model, (x, mask, labels) = case
    model.eval()
    n, classes, depth_max = labels.shape[0], model.num_classes, model.num_components
    with torch.no_grad():
        full = model(x, mask)
        assert full.shape == (n, classes)
        # scores at every depth, computed independently of early_exit
        per_depth, s = [], x
        for i, component in enumerate(model.components):
            s = component.encoder(s, mask)
            t = component.bridge(s, mask)
            for c in reversed(model.components[: i + 1]):
                t = c.label_decoder(t)
            per_depth.append(t)
        torch.testing.assert_close(per_depth[-1], full)

        logits, depth = model.early_exit(x, 0.0, mask)  # never confident enough: full depth
        assert depth.dtype == torch.long and depth.shape == (n,) and (depth == depth_max).all()
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)

        logits, depth = model.early_exit(x, math.log(classes) + 1, mask)  # always confident: depth 1
        assert (depth == 1).all()
        torch.testing.assert_close(logits, per_depth[0], rtol=1e-5, atol=1e-5)

        entropies = torch.stack([prediction_entropy(p) for p in per_depth[:-1]])  # (L-1, n)
        threshold = float(entropies.median())
        logits, depth = model.early_exit(x, threshold, mask)
        for row in range(n):
            below = (entropies[:, row] < threshold).nonzero()
            expected = int(below[0]) + 1 if below.numel() else depth_max
            assert int(depth[row]) == expected
            torch.testing.assert_close(logits[row], per_depth[expected - 1][row], rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_text_predictions():
    """Extra padding columns leave the LSTM and Transformer predictions unchanged (masked everywhere)."""
    x, mask, labels = text_batch()
    wider_x = torch.cat([x, torch.zeros(x.shape[0], 4, dtype=x.dtype)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(x.shape[0], 4, dtype=torch.bool)], dim=1)
    for name in ("lstm", "transformer", "seed_lstm", "seed_transformer"):
        torch.manual_seed(0)
        model = CASES[name][0]().eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x, mask), model(wider_x, wider_mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,arch", [("mlp", "compact"), ("cnn", "compact"), ("lstm", "compact"),
                                       ("transformer", "compact"), ("lstm", "seed"), ("transformer", "seed")])
def test_backprop_baseline_uses_same_encoders(name, arch):
    options = {"num_classes": 3} if name in ("lstm", "transformer") else {}
    if name in ("lstm", "transformer"):
        options.update(vocab_size=50, embedding_dim=8)
    al_model = build_model(name, "al", arch=arch, **options)
    bp_model = build_model(name, "bp", arch=arch, **options)
    assert isinstance(bp_model, BackpropModel)
    al_encoders = [type(c.encoder) for c in al_model.components]
    assert [type(e) for e in bp_model.encoders] == al_encoders
    x, mask, labels = text_batch(classes=3) if name in ("lstm", "transformer") else vision_batch()
    assert bp_model(x, mask).shape == (x.shape[0], bp_model.num_classes)


def test_meprop_linear_layers_with_k():
    import meprop

    torch.manual_seed(0)
    model = build_model("mlp", "al", k=4, hidden=32, num_components=2, label_dim=16)
    converted = [m for m in model.modules() if isinstance(m, meprop.Linear)]
    assert len(converted) >= 7 and all(m.k == 4 for m in converted)
    x, mask, labels = vision_batch()
    model.zero_grad()
    steps = list(model.local_steps(x, labels, mask))
    steps[1].loss.backward()
    assert all(p.grad is None for p in model.components[0].parameters())
    # the encoder's 32-unit layer kept only 4 output-gradient rows of its weight
    weight_grad = model.components[1].encoder.module[0].weight.grad
    assert int((weight_grad.abs().sum(dim=1) > 0).sum()) == 4
    optimizers = model.make_optimizers(lambda params: torch.optim.Adam(params, lr=3e-3))
    first = model.train_step(x, labels, optimizers)
    for _ in range(30):
        last = model.train_step(x, labels, optimizers)
    assert last[0][1] < first[0][1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_components"):
        ALMLP(num_components=0)
    with pytest.raises(ValueError, match="model must be"):
        build_model("rnn", "al")
    model = ALMLP(hidden=8, num_components=2)
    with pytest.raises(ValueError, match="optimizers"):
        model.train_step(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]), [])
    with pytest.raises(ValueError, match="arch"):
        build_model("mlp", "al", arch="seed")
    with pytest.raises(ValueError, match="divisible"):
        ALSeedTransformer(50, 3, embedding_dim=50, nhead=4)
    with pytest.raises(ValueError, match="max_len"):
        ALTransformer(50, 3, max_len=4)(torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool))


def _seed_lstm_oracle(model, ids, mask):
    """The seed LSTM's bridge inputs computed one sequence at a time, unpadded: the embedding's mean vector,
    then each BiLSTM's h_fwd + h_bwd, every LSTM after the first starting from the previous one's final state."""
    embedding = model.components[0].encoder.module
    lstms = [c.encoder.lstm for c in model.components[1:]]
    rows = []
    for i in range(ids.shape[0]):
        seq = embedding(ids[i, mask[i]].unsqueeze(0))
        pooled, state, inputs = [seq.mean(dim=1)], None, seq
        for lstm in lstms:
            inputs, state = lstm(inputs, state)
            pooled.append(state[0][0] + state[0][1])
        rows.append(pooled)
    return [torch.cat([row[j] for row in rows]) for j in range(len(lstms) + 1)]


def test_seed_lstm_hands_its_final_state_on_and_bridges_from_h_fwd_plus_h_bwd():
    torch.manual_seed(0)
    model = CASES["seed_lstm"][0]().eval()
    ids, mask, labels = text_batch()
    expected = _seed_lstm_oracle(model, ids, mask)
    with torch.no_grad():
        s = ids
        for j, component in enumerate(model.components):
            s = component.encoder(s, mask)
            torch.testing.assert_close(component.bridge.pool(s, mask), expected[j], rtol=1e-5, atol=1e-6)
        # the bridge: tanh(Linear(h_fwd + h_bwd)); the label path: tanh encoders, linear decoders
        last = model.components[-1]
        torch.testing.assert_close(last.bridge(s, mask), torch.tanh(last.bridge.linear(expected[-1])))
    assert isinstance(last.label_encoder[1], torch.nn.Tanh) and isinstance(last.label_decoder, torch.nn.Linear)
    assert isinstance(model.components[0].label_decoder, torch.nn.Linear)  # class scores: no tanh on them


def test_seed_transformer_has_no_positions_and_uses_the_embedding_width():
    """Without positional encoding the prediction does not depend on the order of the tokens."""
    torch.manual_seed(0)
    model = CASES["seed_transformer"][0]().eval()
    layer = model.components[1].encoder.layer
    assert layer.self_attn.embed_dim == 8 and layer.linear1.out_features == 16 and layer.self_attn.num_heads == 2
    assert not any("position" in name for name, _ in model.named_parameters())
    ids, mask, _ = text_batch()
    order = torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(1))
    full = mask.all(dim=1)  # rows without padding can be permuted freely
    with torch.no_grad():
        torch.testing.assert_close(model(ids[full][:, order], mask[full]), model(ids[full], mask[full]),
                                   rtol=1e-4, atol=1e-5)


def test_autoencoders_get_their_own_learning_rate():
    model = CASES["seed_transformer"][0]()
    optimizers = model.make_adam(1e-3, 5e-4)
    assert len(optimizers) == model.num_components
    for optimizer, component in zip(optimizers, model.components):
        x_path, label_path = optimizer.param_groups
        assert x_path["lr"] == 1e-3 and label_path["lr"] == 5e-4
        assert {id(p) for p in label_path["params"]} == {id(p) for p in (*component.label_encoder.parameters(),
                                                                          *component.label_decoder.parameters())}
        assert len(x_path["params"]) + len(label_path["params"]) == len(list(component.parameters()))
