"""Hypothesis property tests: the CPU kernels equal the reference on arbitrary small shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tie_free_columns, tie_free_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from meprop import ops, reference

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason=f"no CPU kernels: {ops.EXTENSION_ERROR}")


@st.composite
def cases(draw):
    n = draw(st.integers(0, 24))
    i = draw(st.integers(1, 24))
    o = draw(st.integers(2, 48))
    k = draw(st.integers(1, o - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, i, o, k, dtype, torch.Generator().manual_seed(seed)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_unified_pipeline(case):
    n, i, o, k, dtype, gen = case
    dy = tie_free_columns(n, o, dtype, gen)
    x, w = torch.randn(n, i, generator=gen, dtype=dtype), torch.randn(o, i, generator=gen, dtype=dtype)
    idx = ops.topk_unified(dy, k)
    if n:
        assert torch.equal(idx, reference.topk_unified(dy, k))
    assert_close(ops.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx))
    rows = ops.linear_weight_grad_unified(dy, x, idx)
    assert_close(rows, reference.linear_weight_grad_unified(dy, x, idx))
    assert torch.equal(ops.scatter_rows(rows, idx, o), reference.scatter_rows(rows, idx, o))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_per_example_pipeline(case):
    n, i, o, k, dtype, gen = case
    dy = tie_free_rows(n, o, dtype, gen)
    x, w = torch.randn(n, i, generator=gen, dtype=dtype), torch.randn(o, i, generator=gen, dtype=dtype)
    vals, idx = ops.topk_rows(dy, k)
    ref_vals, ref_idx = reference.topk_rows(dy, k)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    assert_close(ops.linear_input_grad_rows(vals, idx, w), reference.linear_input_grad_rows(vals, idx, w))
    assert_close(ops.linear_weight_grad_rows(vals, idx, x, o, None), reference.linear_weight_grad_rows(vals, idx, x, o))
