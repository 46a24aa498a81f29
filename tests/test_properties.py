"""Hypothesis property tests: every backend equals the formula oracle on arbitrary small cases.

Each example runs a whole selection-and-products pipeline (4 ops) on fresh random inputs: 500 examples of
each of the two pipelines per backend, derandomized (the same cases every run; see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from conformance import (
    BACKEND_DEVICES,
    assert_matches,
    assert_zero_outside,
    dtypes_of,
    gaussian,
    max_k,
    oracle,
    tie_free_columns,
    tie_free_rows,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from meprop import backends

EXAMPLES = 500


@st.composite
def cases(draw, name: str):
    n = draw(st.integers(0, 24))
    n_in = draw(st.integers(0, 24))
    out = draw(st.integers(2, 48))
    k = draw(st.integers(1, min(out, max_k(name))))
    dtype = draw(st.sampled_from(dtypes_of(name)))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, n_in, out, k, dtype, torch.Generator().manual_seed(seed)


def _inputs(case, device, make_dy):
    n, n_in, out, k, dtype, gen = case
    dy = make_dy(n, out, dtype, gen, device)
    return dy, gaussian((n, n_in), dtype, gen, device), gaussian((out, n_in), dtype, gen, device), k, dtype


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_unified_pipeline(backend_device):
    name, device = backend_device
    ops = backends.get(name)

    @settings(max_examples=EXAMPLES)
    @given(cases(name))
    def run(case):
        dy, x, w, k, dtype = _inputs(case, device, tie_free_columns)
        idx = ops.topk_unified(dy, k)
        assert torch.equal(idx.cpu(), oracle("topk_unified", dy, k))
        scores = ops.column_scores(dy)  # tie-free columns: exact sums, ranked like topk_unified's
        assert torch.equal(scores.cpu().double(), oracle("column_scores", dy))
        assert torch.equal(ops.topk_unified(scores.unsqueeze(0), k), idx)
        assert_matches(
            ops.linear_input_grad_unified(dy, w, idx), oracle("linear_input_grad_unified", dy, w, idx), dtype, device
        )
        rows = ops.linear_weight_grad_unified(dy, x, idx)
        assert_matches(rows, oracle("linear_weight_grad_unified", dy, x, idx), dtype, device)
        dense = ops.scatter_rows(rows, idx, dy.shape[1])
        assert torch.equal(dense.cpu().double(), oracle("scatter_rows", rows, idx, dy.shape[1]))
        assert_zero_outside(dense, idx)

    run()


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_per_example_pipeline(backend_device):
    name, device = backend_device
    ops = backends.get(name)

    @settings(max_examples=EXAMPLES)
    @given(cases(name))
    def run(case):
        dy, x, w, k, dtype = _inputs(case, device, tie_free_rows)
        out = dy.shape[1]
        vals, idx = ops.topk_rows(dy, k)
        want_vals, want_idx = oracle("topk_rows", dy, k)
        assert torch.equal(idx.cpu(), want_idx) and torch.equal(vals.cpu().double(), want_vals)
        assert_matches(
            ops.linear_input_grad_rows(vals, idx, w), oracle("linear_input_grad_rows", vals, idx, w), dtype, device
        )
        dense = ops.linear_weight_grad_rows(vals, idx, x, out, None)
        assert_matches(dense, oracle("linear_weight_grad_rows", vals, idx, x, out, None), dtype, device)
        assert_zero_outside(dense, torch.unique(idx.cpu()))
        rows = torch.arange(out - 1, -1, -2, device=device)  # every other row, descending
        got = ops.linear_weight_grad_rows(vals, idx, x, out, rows)
        assert_matches(got, oracle("linear_weight_grad_rows", vals, idx, x, out, rows), dtype, device)

    run()
