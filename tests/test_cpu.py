"""The CPU kernels' size-dependent paths, which the small shapes of the conformance tests do not reach."""

from __future__ import annotations

import pytest
import torch
from conformance import assert_matches, assert_zero_outside, gaussian, oracle, row_index

from meprop import backends, ops

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason=f"no CPU kernels: {ops.EXTENSION_ERROR}")
cpu = backends.get("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_large_products(dtype, gen):
    """Non-temporal stores for a large dx, depth-chunked accumulation for a long batch, and a scatter into
    on-demand zero pages (>= 8 MB, rows within the first huge page) as well as one with the zeros written."""
    n, n_in, out, k = 1024, 1024, 2048, 16
    dy, x, w = gaussian((n, out), dtype, gen), gaussian((n, n_in), dtype, gen), gaussian((out, n_in), dtype, gen)
    idx = torch.randperm(out, generator=gen)[:k]
    assert_matches(
        cpu.linear_input_grad_unified(dy, w, idx), oracle("linear_input_grad_unified", dy, w, idx), dtype, "cpu"
    )
    assert_matches(
        cpu.linear_weight_grad_unified(dy, x, idx), oracle("linear_weight_grad_unified", dy, x, idx), dtype, "cpu"
    )
    rows = gaussian((k, n_in), dtype, gen)
    for kept in (idx, torch.randperm((2 << 20) // (n_in * rows.element_size()), generator=gen)[:k]):
        dense = cpu.scatter_rows(rows, kept, out)
        assert torch.equal(dense.double(), oracle("scatter_rows", rows, kept, out))
        assert_zero_outside(dense, kept)
        dense += 1.0  # an ordinary writable tensor
        assert torch.equal(dense, oracle("scatter_rows", rows, kept, out).to(dtype) + 1.0)


def test_reused_output_blocks_are_fully_written(gen):
    """Outputs of 1 MB and more come from a cache of freed blocks: poison each, free it, and the next output
    of that size (which reuses the block) must still hold only computed values."""
    n, n_in, out, k = 512, 1024, 640, 24
    dy, x, w = (
        gaussian((n, out), torch.float32, gen),
        gaussian((n, n_in), torch.float32, gen),
        gaussian((out, n_in), torch.float32, gen),
    )
    idx = torch.randperm(out, generator=gen)[:k]
    ridx, vals = row_index(n, out, k, gen), gaussian((n, k), torch.float32, gen)
    calls = [
        ("linear_input_grad_unified", (dy, w, idx)),
        ("linear_input_grad_rows", (vals, ridx, w)),
        ("linear_weight_grad_rows", (vals, ridx, x, out, None)),
    ]
    for op, args in calls:
        first = getattr(cpu, op)(*args)
        first.fill_(float("nan"))
        del first
        assert_matches(getattr(cpu, op)(*args), oracle(op, *args), torch.float32, "cpu")
