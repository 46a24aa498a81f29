"""meprop.convert on real model types: Linear, Conv2d, Hugging Face Conv1D; name patterns; errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import meprop


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)
    )


def test_convert_cnn_linear_and_conv_and_logs(caplog):
    model = cnn()
    with caplog.at_level("INFO", logger="meprop"):
        meprop.convert(model, k=2)
    assert meprop.converted(model) == {"0": "Conv2d", "4": "Linear"}
    assert type(model[2]) is nn.Conv2d  # grouped: left dense, and logged
    assert "groups=2, left dense" in caplog.text and "-> meProp" in caplog.text
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    assert model[0].last_k == 2 and model[4].last_k is None  # Linear with an int k records nothing


def test_target_and_exclude_patterns_peft_style():
    model = nn.ModuleDict({"enc": nn.ModuleDict({"query": nn.Linear(4, 4), "value": nn.Linear(4, 4)}),
                           "head": nn.Linear(4, 2)})
    meprop.convert(model, k=2, target_modules=["query", "head"], exclude_modules=["head"])
    assert meprop.converted(model) == {"enc.query": "Linear"}
    model = nn.ModuleDict({"a1": nn.Linear(4, 4), "b1": nn.Linear(4, 4)})
    meprop.convert(model, k=2, target_modules=r"a\d")  # a str is a full-match regular expression
    assert meprop.converted(model) == {"a1": "Linear"}


def test_convert_errors_are_clear():
    with pytest.raises(ValueError, match="target_modules entry 'nope' matches no convertible module"):
        meprop.convert(cnn(), k=2, target_modules=["nope"])
    with pytest.raises(ValueError, match="exclude_modules entry 'x.*' matches no convertible module"):
        meprop.convert(cnn(), k=2, exclude_modules="x.*")
    with pytest.raises(ValueError, match=r"Linear 4: k=9 is not smaller than its 5 outputs"):
        meprop.convert(cnn(), k=9, target_modules=["4"])
    with pytest.raises(ValueError, match=r"Conv2d 2: groups=2 is not supported"):
        meprop.convert(cnn(), k=2, target_modules=["2"])
    with pytest.raises(ValueError, match=r"Conv2d 0: option\(s\) \['sparse_grad'\] do not apply"):
        meprop.convert(cnn(), k=2, sparse_grad=True)
    with pytest.raises(ValueError, match="Adaptive max_k=7 is larger than the layer's 5 outputs"):
        meprop.convert(nn.Linear(3, 5), k=meprop.Adaptive(max_k=7))


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_converted_gradients_match_linear_on_transposed_weight():
    model = tiny_gpt2()
    from transformers.pytorch_utils import Conv1D

    meprop.convert(model, k=3, target_modules=["c_attn", "c_proj", "c_fc"])
    kinds = meprop.converted(model)
    assert len(kinds) == 4 and set(kinds.values()) == {"Conv1D"}  # attn.c_proj and mlp.c_proj both match
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Conv1D) and layer.weight.shape == (16, 48)
    x = torch.randn(2, 5, 16, dtype=torch.float32, requires_grad=True)
    g = torch.randn(2, 5, 48) * (torch.arange(48) + 1.0)  # tie-free column scores
    dx, dw = torch.autograd.grad(layer(x), (x, layer.weight), g)
    ref = meprop.Linear(16, 48, k=3, backend="reference")
    with torch.no_grad():
        ref.weight.copy_(layer.weight.t())
        ref.bias.copy_(layer.bias)
    rdx, rdw = torch.autograd.grad(ref(x), (x, ref.weight), g)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dw, rdw.t())
    assert (dw.abs().sum(0) > 0).sum() == 3


def test_hf_save_pretrained_round_trip_and_reconvert(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt2()
    meprop.convert(model, k=4)
    ids = torch.randint(0, 50, (2, 6))
    model(ids, labels=ids).loss.backward()
    model.save_pretrained(tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert meprop.converted(back) == {}
    assert torch.equal(back.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    back = meprop.convert(back, k=4)  # the one-line re-convert
    assert meprop.converted(back) == meprop.converted(model)


def test_bert_from_config_trains_with_adaptive_k():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    meprop.convert(model, k=meprop.Adaptive(0.8), exclude_modules=["classifier"], error_feedback=True)
    assert len(meprop.converted(model)) == 7  # q, k, v, attention output, intermediate, output, pooler
    ids, labels = torch.randint(0, 50, (4, 6)), torch.tensor([0, 1, 0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=labels).loss.backward()
        opt.step()
    query = model.bert.encoder.layer[0].attention.self.query
    assert 1 <= query.last_k <= 16 and query.feedback.shape == (16,)
