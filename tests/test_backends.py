"""Backends as capability objects: what each can run, and the automatic choice among them."""

from __future__ import annotations

import pytest
import torch

from meprop import backends


def test_automatic_choice_falls_back_by_capability(monkeypatch):
    """On CUDA: the CUDA kernels, then Triton, then the reference, each only where it can run the case."""
    fake = {
        "cuda": backends.Backend("cuda", ("cuda",), (torch.float32,)),
        "triton": backends.Backend("triton", ("cuda",), (torch.float32, torch.float64), max_k=256),
        "reference": backends.Backend("reference", None, (torch.float32, torch.float64, torch.float16)),
    }
    monkeypatch.setattr(backends, "_load", lambda name, interpret: fake[name])
    monkeypatch.setattr(backends, "_LOADED", dict(backends._LOADED))  # keep the real backends' registry
    backends._resolve.cache_clear()
    cuda = torch.device("cuda")
    try:
        assert backends._resolve(None, cuda, torch.float32, 8, False) == "cuda"
        assert backends._resolve(None, cuda, torch.float64, 8, False) == "triton"
        assert backends._resolve(None, cuda, torch.float64, 300, False) == "reference"
        assert backends._resolve(None, cuda, torch.float16, 8, False) == "reference"
        with pytest.raises(ValueError, match="its top-k selections take k <= 256, got k=300"):
            backends._resolve("triton", cuda, torch.float32, 300, False)
        with pytest.raises(TypeError, match="no backend can run"):
            backends._resolve(None, cuda, torch.bfloat16, 8, False)
    finally:
        backends._resolve.cache_clear()


def test_capabilities_on_this_machine():
    cpu = torch.device("cpu")
    reference = backends.get("reference")
    assert reference.error is None and reference.why_not(cpu, torch.float64, 10**6) is None
    assert reference.why_not(cpu, torch.int32) == (
        TypeError,
        "it takes float16, bfloat16, float32, float64 tensors, got torch.int32",
    )
    assert backends.resolve(None, cpu, torch.float32, 8).name in backends.available(cpu)
    assert "cpu" in repr(backends.get("cpu"))
    for name in backends.BACKENDS:
        backend = backends.get(name)
        assert (backend.error is None) == all(hasattr(backend, op) for op in ("topk_unified", "scatter_rows"))


def test_constant_under_compile_is_what_torch_marks():
    """backends.constant_under_compile sets what torch.compiler.assume_constant_result sets."""

    def f():
        return "x"

    def g():
        return "x"

    marked = torch.compiler.assume_constant_result(f)
    assert {k: v for k, v in vars(marked).items()} == vars(backends.constant_under_compile(g))


def test_unknown_backend_names_are_value_errors():
    for bad in ("gpu", ["cpu"], 3):
        with pytest.raises(ValueError, match="backend must be None or one of"):
            backends.get(bad)
