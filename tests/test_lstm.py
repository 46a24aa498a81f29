"""meprop.LSTM: a drop-in nn.LSTM, and its sparse BPTT against an independent oracle.

The oracle is an unrolled LSTM in plain PyTorch autograd whose gate pre-activations (the output of the two
linear maps, before the biases) carry a gradient hook keeping the top-k entries; it shares no code with
meprop. Inputs are float64 Gaussians (no ties in the selection, almost surely).
"""

from __future__ import annotations

import pytest
import torch
from conformance import BACKEND_DEVICES
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import meprop
from meprop import backends, lstm_reference
from meprop.lstm import _LSTMLayer, _random_idx

MODES = ("unified", "per_example", "random_unified", "random_per_example")


def _pair(seed, *args, k=2, **kwargs):
    """An nn.LSTM and a meprop.LSTM made from the same random state."""
    torch.manual_seed(seed)
    dense = nn.LSTM(*args, **kwargs)
    torch.manual_seed(seed)
    return dense, meprop.LSTM(*args, k=k, **kwargs)


# --- drop-in -------------------------------------------------------------------------------------------


def test_same_parameters_initialisation_and_state_dict():
    dense, sparse = _pair(0, 5, 4, num_layers=2, bidirectional=True)
    assert isinstance(sparse, nn.LSTM)
    assert [n for n, _ in sparse.named_parameters()] == [n for n, _ in dense.named_parameters()]
    for (_, p), (_, q) in zip(sparse.named_parameters(), dense.named_parameters()):
        assert torch.equal(p, q)
    other = nn.LSTM(5, 4, num_layers=2, bidirectional=True)
    sparse.load_state_dict(other.state_dict())
    assert torch.equal(sparse.weight_hh_l1_reverse, other.weight_hh_l1_reverse)
    back = nn.LSTM(5, 4, num_layers=2, bidirectional=True)
    back.load_state_dict(sparse.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), other.state_dict().values()))
    assert "k=2" in repr(sparse) and "k_scope='gate'" in repr(sparse)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(batch_first=True), dict(num_layers=2), dict(bidirectional=True), dict(bias=False),
     dict(num_layers=2, bidirectional=True, batch_first=True)],
    ids=["plain", "batch_first", "2_layers", "bidirectional", "no_bias", "2_layers_bi_batch_first"],
)
def test_forward_equals_nn_lstm(options):
    dense, sparse = _pair(1, 6, 5, **options)
    x = torch.randn(3, 7, 6, requires_grad=True)  # (B, T, I) with batch_first, else (T, B, I)
    directions = 2 if options.get("bidirectional") else 1
    hx = tuple(torch.randn(options.get("num_layers", 1) * directions, 3 if options.get("batch_first") else 7, 5)
               for _ in range(2))
    for state in (None, hx):
        want, (wh, wc) = dense(x, state)
        got, (gh, gc) = sparse(x, state)
        assert got.requires_grad
        for a, b in ((got, want), (gh, wh), (gc, wc)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_forward_packed_and_unbatched_equal_nn_lstm():
    dense, sparse = _pair(2, 4, 3, num_layers=2, bidirectional=True)
    x = torch.randn(6, 5, 4, requires_grad=True)
    lengths = torch.tensor([3, 6, 1, 4, 6])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    hx = (torch.randn(4, 5, 3), torch.randn(4, 5, 3))
    want, (wh, wc) = dense(packed, hx)
    got, (gh, gc) = sparse(packed, hx)
    assert torch.equal(got.batch_sizes, want.batch_sizes)
    for a, b in ((got.data, want.data), (gh, wh), (gc, wc)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    got.data.sum().backward()  # gradients flow through the packing
    assert x.grad is not None and x.grad[4:, 0].abs().sum() == 0  # padding has no gradient
    single = torch.randn(6, 4, requires_grad=True)
    torch.testing.assert_close(sparse(single)[0], dense(single)[0], rtol=1e-5, atol=1e-6)


def test_dense_k_gives_exactly_nn_lstm_gradients():
    x = torch.randn(5, 3, 4)
    for k, scope in ((None, "gate"), (6, "gate"), (100, "gate"), (24, "all"), (1.0, "gate")):
        dense, sparse = _pair(3, 4, 6, bidirectional=True)
        sparse.k_scope = scope
        sparse.k = k
        grads = []
        for model in (dense, sparse):
            xi = x.clone().requires_grad_()
            out, (h, c) = model(xi)
            (out.square().sum() + h.sum() + 2 * c.sum()).backward()
            grads.append([xi.grad] + [p.grad for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads)), (k, scope)


# --- the oracle ----------------------------------------------------------------------------------------


def _keep_hook(k, per_gate, per_example, given=None):
    """A gradient hook on the pre-activations z (b, 4H) keeping the top-k entries (or the given ones)."""

    def hook(grad):
        b, width4 = grad.shape
        if given is not None:
            mask = torch.zeros_like(grad)
            if per_example:
                for n in range(b):
                    mask[n, given[n]] = 1.0
            else:
                mask[:, given] = 1.0
            return grad * mask
        groups = grad.view(b, 4, width4 // 4) if per_gate else grad.view(b, 1, width4)
        mask = torch.zeros_like(groups)
        if per_example:
            top = groups.abs().topk(k, dim=2).indices
            mask.scatter_(2, top, 1.0)
        else:
            top = groups.abs().sum(0).topk(k, dim=1).indices  # (groups, k)
            for gate in range(groups.shape[1]):
                mask[:, gate, top[gate]] = 1.0
        return (groups * mask).view(b, width4)

    return hook


def oracle_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, k, per_gate, per_example, idx=None):
    """Unrolled LSTM (sequences sorted by length, longest first); returns (out (T, B, H), h_n, c_n)."""
    steps, batch, _ = x.shape
    h, c = h0, c0
    outs = [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        b = sum(int(n) > t for n in lengths)
        z = x[t, :b] @ w_ih.T + h[:b] @ w_hh.T
        given = None if idx is None else (idx[t, :b] if per_example else idx[t])
        z.register_hook(_keep_hook(k, per_gate, per_example, given))
        a = z if b_ih is None else z + b_ih + b_hh
        i, f, g, o = a.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c[:b] + i * g
        h_new = o * c_new.tanh()
        outs[t] = torch.cat([h_new, torch.zeros_like(h[b:])])
        h, c = torch.cat([h_new, h[b:]]), torch.cat([c_new, c[b:]])
    return torch.stack(outs), h, c


def _case(seed, steps=5, batch=4, n_in=7, hidden=6, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    tensors = dict(x=r(steps, batch, n_in), h0=r(batch, hidden), c0=r(batch, hidden), w_ih=r(4 * hidden, n_in),
                   w_hh=r(4 * hidden, hidden), b_ih=r(4 * hidden), b_hh=r(4 * hidden))
    return tensors, r(steps, batch, hidden), r(batch, hidden), r(batch, hidden)


def _grads(fn, tensors, dout, dh, dc):
    leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
    out, h, c = fn(**leaves)
    torch.autograd.backward([out, h, c], [dout, dh, dc])
    return {name: t.grad for name, t in leaves.items()}


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    return request.param


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", ["gate", "all"])
@pytest.mark.parametrize("packing", ["full", "reverse", "packed", "packed_reverse"])
def test_topk_gradients_equal_the_oracle(backend_device, mode, scope, packing):
    name, device = backend_device
    if name == "triton" and packing in ("reverse", "packed"):
        pytest.skip("the interpreter is slow: Triton is tried on the full forward and the packed reverse cases")
    dtype = torch.float64 if torch.float64 in backends.get(name).dtypes else torch.float32
    tensors, dout, dh, dc = _case(hash((mode, scope, packing)) % 1000, dtype=dtype)
    steps, batch, hidden = dout.shape
    per_gate, per_example = scope == "gate", mode.endswith("per_example")
    k = 2 if per_gate else 5
    reverse = packing.endswith("reverse")
    lengths = [5, 4, 4, 2] if packing.startswith("packed") else [steps] * batch
    sizes = [sum(n > t for n in lengths) for t in range(steps)] if packing.startswith("packed") else None
    idx = None
    if mode.startswith("random"):
        idx = _random_idx(steps, batch, hidden, k, per_gate, per_example, torch.Generator().manual_seed(4), "cpu")
    want = _grads(lambda **t: oracle_layer(**t, lengths=lengths, reverse=reverse, k=k, per_gate=per_gate,
                                           per_example=per_example, idx=idx), tensors, dout, dh, dc)

    def ours(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        gen = torch.Generator().manual_seed(4) if idx is not None else None
        mv = lambda t: t.to(device)  # noqa: E731
        out, h, c = _LSTMLayer.apply(mv(x), mv(h0), mv(c0), mv(w_ih), mv(w_hh), mv(b_ih), mv(b_hh), sizes, reverse,
                                     k, per_gate, mode, name, gen)
        return out.cpu(), h.cpu(), c.cpu()

    got = _grads(ours, tensors, dout, dh, dc)
    full = _grads(lambda **t: oracle_layer(**t, lengths=lengths, reverse=reverse, k=hidden if per_gate else 4 * hidden,
                                           per_gate=per_gate, per_example=False), tensors, dout, dh, dc)
    assert not torch.allclose(want["w_hh"], full["w_hh"])  # the selection changes the gradient
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for key in want:
        scale = want[key].abs().max().item()
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=tol * max(scale, 1.0), msg=key)
    if sizes is not None:  # rows that do not take part in a step get no input gradient
        for t, b in enumerate(sizes):
            assert torch.equal(got["x"][t, b:], torch.zeros_like(got["x"][t, b:]))


def test_cpu_kernels_write_every_element_of_large_outputs():
    """Outputs of 1 MB and more come from reused blocks (large_alloc.h): a second call, packed with an empty
    step, must overwrite all of the first call's values (its zeros included)."""
    if backends.get("cpu").error:
        pytest.skip(backends.get("cpu").error)
    cpu, ref = backends.get("cpu"), backends.get("reference")
    steps, batch, n_in, hidden = 8, 64, 512, 128  # dx, dW_ih 1 MB; gates 2 MB
    gen = torch.Generator().manual_seed(3)
    for sizes, reverse, k in ((None, False, 3), ([64, 40, 40, 9, 9, 9, 1, 0], True, 2), (None, True, 128)):
        g = lambda *shape: torch.randn(*shape, generator=gen) * 0.3  # noqa: E731
        forward = (g(steps, batch, n_in), g(batch, hidden), g(batch, hidden), g(4 * hidden, n_in),
                   g(4 * hidden, hidden), g(4 * hidden), sizes, reverse)
        for got, want in zip(cpu.lstm_forward(*forward), ref.lstm_forward(*forward)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        hs, cs, gates = ref.lstm_forward(*forward)
        h_prev, c_prev = (hs[1:], cs[1:]) if reverse else (hs[:steps], cs[:steps])
        backward = (g(steps, batch, hidden), g(batch, hidden), g(batch, hidden), forward[0], h_prev, c_prev, gates,
                    forward[3], forward[4], sizes, reverse, k, True, False, None)
        for got, want in zip(cpu.lstm_backward(*backward), ref.lstm_backward(*backward)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_memory_profiler_sees_the_cpu_kernels_large_outputs():
    """Outputs from reused blocks count in torch.profiler's memory events like the CPU allocator's own."""
    if backends.get("cpu").error:
        pytest.skip(backends.get("cpu").error)
    from torch.profiler import ProfilerActivity, profile

    steps, batch, n_in, hidden = 8, 64, 16, 128  # gates: 1 MB
    args = (torch.randn(steps, batch, n_in), torch.zeros(batch, hidden), torch.zeros(batch, hidden),
            torch.randn(4 * hidden, n_in), torch.randn(4 * hidden, hidden), None, None, False)
    backends.get("cpu").lstm_forward(*args)  # a freed block for the next call to reuse
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        outputs = backends.get("cpu").lstm_forward(*args)
        del outputs
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    gates_bytes = steps * batch * 4 * hidden * 4
    assert gates_bytes in sizes and -gates_bytes in sizes


def test_module_gradients_equal_the_oracle_two_layers_bidirectional_packed():
    torch.manual_seed(5)
    model = meprop.LSTM(4, 6, num_layers=2, bidirectional=True, k=2, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    lengths = [5, 3, 2]
    packed = pack_padded_sequence(x, torch.tensor(lengths))
    out, (h, c) = model(packed)
    weights = torch.randn(out.data.shape, dtype=torch.float64)
    ((out.data * weights).sum() + h.square().sum() + c.sum()).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    zeros = torch.zeros(3, 6, dtype=torch.float64)
    layer_input, hs, cs = x, [], []
    for layer in range(2):
        outs = []
        for suffix in (f"_l{layer}", f"_l{layer}_reverse"):
            p = [params[f"{w}{suffix}"] for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            o, hn, cn = oracle_layer(layer_input, zeros, zeros, *p, lengths, suffix.endswith("reverse"), 2, True, False)
            outs.append(o)
            hs.append(hn)
            cs.append(cn)
        layer_input = torch.cat(outs, 2)
    want_out = pack_padded_sequence(layer_input, torch.tensor(lengths)).data
    torch.testing.assert_close(want_out, out.data.detach())
    ((want_out * weights).sum() + torch.stack(hs).square().sum() + torch.stack(cs).sum()).backward()
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-10, msg=n)


def test_convert_swaps_nn_lstm_sharing_parameters():
    torch.manual_seed(7)
    model = nn.Sequential(nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 3))
    weight = model[0].weight_hh_l0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted = meprop.convert(model, k=2, lstm=True, backend="reference")
    assert converted is model and type(model[0]) is meprop.LSTM and type(model[1]) is meprop.Linear
    assert model[0].weight_hh_l0 is weight and model[0].backend == "reference" and model[0].batch_first
    out, _ = model[0](torch.randn(2, 5, 4, requires_grad=True))
    model[1](out).sum().backward()
    optimizer.step()  # the optimizer holds the same parameter objects
    assert weight.grad is not None
    assert type(meprop.convert(nn.LSTM(3, 4), k=2, lstm=True)) is meprop.LSTM
    assert type(meprop.convert(nn.Sequential(nn.LSTM(3, 4)), k=2)[0]) is nn.LSTM  # lstm=False leaves it


def test_random_draws_are_distinct_per_gate():
    idx = _random_idx(3, 2, 10, 4, True, True, torch.Generator().manual_seed(0), "cpu")
    assert idx.shape == (3, 2, 16)
    for gate in range(4):
        part = idx[..., gate * 4 : (gate + 1) * 4]
        assert ((part >= gate * 10) & (part < (gate + 1) * 10)).all()
        assert (part.sort(-1).values.diff(dim=-1) > 0).all()


# --- errors --------------------------------------------------------------------------------------------


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match=r"meprop.LSTM\(4, 6\): k must be >= 1"):
        meprop.LSTM(4, 6, k=0)
    with pytest.raises(ValueError, match=r"meprop.LSTM\(4, 6\): k must be a positive int"):
        meprop.LSTM(4, 6, k="3")
    with pytest.raises(ValueError, match="k_scope must be one of"):
        meprop.LSTM(4, 6, k=2, k_scope="cell")
    with pytest.raises(ValueError, match="mode must be one of"):
        meprop.LSTM(4, 6, k=2, mode="top")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        meprop.LSTM(4, 6, k=2, backend="tpu")
    with pytest.raises(NotImplementedError, match="proj_size"):
        meprop.LSTM(4, 6, k=2, proj_size=3)
    model = meprop.LSTM(4, 6, k=2)
    with pytest.raises(TypeError, match=r"meprop.LSTM\(4, 6\): input is torch.float64 but the weights are torch.float32"):
        model(torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True))
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        model.weight_ih_l0.requires_grad_(True)
        model(torch.ones(3, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input is on meta but the weights are on cpu"):
        model(torch.randn(3, 2, 4, device="meta"))
    with pytest.raises(ValueError, match="input must be 2-D"):
        model(torch.randn(4, requires_grad=True))


def test_op_checks_name_the_op_and_argument():
    tensors, dout, dh, dc = _case(0, dtype=torch.float32)
    hs = torch.zeros(5, 4, 6)
    args = [dout, dh, dc, tensors["x"], hs, hs, torch.zeros(5, 4, 24), tensors["w_ih"], tensors["w_hh"], None, False,
            2, True, False, None]
    lstm_reference.lstm_backward(*args)
    bad = list(args)
    bad[11] = 7
    with pytest.raises(ValueError, match=r"meprop.lstm_backward: k must lie in \[1, 6\], got 7"):
        lstm_reference.lstm_backward(*bad)
    bad = list(args)
    bad[3] = tensors["x"].double()
    with pytest.raises(TypeError, match="meprop.lstm_backward: x is torch.float64 but weight_ih is torch.float32"):
        lstm_reference.lstm_backward(*bad)
    bad = list(args)
    bad[9] = [4, 4, 5, 1, 1]
    with pytest.raises(ValueError, match="meprop.lstm_backward: batch_sizes must be non-increasing"):
        lstm_reference.lstm_backward(*bad)
    bad = list(args)
    bad[14] = torch.zeros(5, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="meprop.lstm_backward: idx shape"):
        lstm_reference.lstm_backward(*bad)
    bad[14] = torch.full((5, 8), 24)
    with pytest.raises(IndexError, match="meprop.lstm_backward: idx values must lie in"):
        lstm_reference.lstm_backward(*bad)


@pytest.mark.parametrize("per_example", [False, True])
def test_every_backend_at_full_width_equals_nn_lstm(backend_device, per_example):
    """The sparse path itself, keeping every entry (k = H per gate), gives nn.LSTM's gradients."""
    name, device = backend_device
    torch.manual_seed(6)
    dense = nn.LSTM(5, 4).to(device)
    x = torch.randn(6, 3, 5, device=device)
    dout = torch.randn(6, 3, 4, device=device)
    xa = x.clone().requires_grad_()
    out, _ = dense(xa)
    out.backward(dout)
    params = [p.detach().clone().requires_grad_() for p in dense.parameters()]
    xb = x.clone().requires_grad_()
    zeros = torch.zeros(3, 4, device=device)
    mode = "per_example" if per_example else "unified"
    out, _, _ = _LSTMLayer.apply(xb, zeros, zeros, *params, None, False, 4, True, mode, name, None)
    out.backward(dout)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for p, q in zip(params, dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
