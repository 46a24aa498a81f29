"""Each compiled CPU op against meprop.reference, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, assert_close, max_exact_int, tie_free_columns, tie_free_rows

from meprop import ops, reference

pytestmark = pytest.mark.skipif(not ops.has_kernels("cpu"), reason=f"no CPU kernels: {ops.EXTENSION_ERROR}")

# (N, in, out): odd sizes, a single row, a single output, sizes that cross the kernels' tile edges.
SHAPES = [(1, 1, 2), (7, 13, 5), (33, 100, 70), (64, 17, 257), (130, 300, 96)]


def ks(out: int) -> list[int]:
    return sorted({1, max(1, out // 3), out - 1, out})


def shapes_for(dtype):
    return [s for s in SHAPES if s[2] <= max_exact_int(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_unified_matches_reference(dtype, gen):
    for n, _, out in shapes_for(dtype):
        dy = tie_free_columns(n, out, dtype, gen)
        for k in ks(out):
            got = ops.topk_unified(dy, k)
            assert got.dtype == torch.long and got.shape == (k,)
            assert torch.equal(got, reference.topk_unified(dy, k)), (n, out, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_rows_matches_reference(dtype, gen):
    for n, _, out in shapes_for(dtype):
        dy = tie_free_rows(n, out, dtype, gen)
        for k in ks(out):
            vals, idx = ops.topk_rows(dy, k)
            ref_vals, ref_idx = reference.topk_rows(dy, k)
            assert torch.equal(idx, ref_idx), (n, out, k)
            assert torch.equal(vals, ref_vals)
            assert vals.dtype == dtype


@pytest.mark.parametrize("backend", [ops, reference], ids=["cpu", "reference"])
def test_ties_take_lower_index_first(backend):
    dy = torch.ones(5, 9)
    assert backend.topk_unified(dy, 4).tolist() == [0, 1, 2, 3]
    assert backend.topk_rows(dy, 3)[1].tolist() == [[0, 1, 2]] * 5
    dy[:, 6] = -1.0  # same magnitude: still index order
    dy[:, 7] = 2.0
    assert backend.topk_unified(dy, 3).tolist() == [7, 0, 1]
    assert backend.topk_rows(dy, 3)[1].tolist() == [[7, 0, 1]] * 5


@pytest.mark.parametrize("backend", [ops, reference], ids=["cpu", "reference"])
def test_nan_ranks_first_and_inf_next(backend):
    dy = torch.randn(4, 40)
    dy[2, 30] = float("nan")
    dy[1, 10] = float("inf")
    dy[3, 5] = -float("inf")
    assert backend.topk_unified(dy, 3)[0].item() == 30
    assert set(backend.topk_unified(dy, 3)[1:].tolist()) == {10, 5}
    vals, idx = backend.topk_rows(dy, 2)
    assert idx[2, 0].item() == 30 and torch.isnan(vals[2, 0])
    assert idx[1, 0].item() == 10 and vals[1, 0].item() == float("inf")
    assert idx[3, 0].item() == 5 and vals[3, 0].item() == -float("inf")


def test_topk_rows_long_rows_match_reference(gen):
    # Rows far longer than k exercise the block-maximum threshold (several block lengths), NaN in a block.
    dy = tie_free_rows(9, 5000, torch.float32, gen)
    dy[4, 4321] = float("nan")
    for k in (1, 16, 255):
        vals, idx = ops.topk_rows(dy, k)
        ref_vals, ref_idx = reference.topk_rows(dy, k)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(vals, ref_vals, equal_nan=True, rtol=0, atol=0)


def test_topk_rows_heavy_ties_match_reference(gen):
    # Few distinct magnitudes: many entries tie with the block-maximum threshold and with each other.
    dy = torch.randint(-2, 3, (6, 3000), generator=gen).float()
    dy[1] = 0.0
    for k in (1, 100, 1000):
        vals, idx = ops.topk_rows(dy, k)
        ref_vals, ref_idx = reference.topk_rows(dy, k)
        assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_products_match_reference(dtype, gen):
    # Sizes past the kernels' size-dependent paths: non-temporal stores for a large dx, depth-chunked
    # accumulation for a long batch, and a scatter into on-demand zero pages (>= 8 MB).
    n, i, o, k = 1024, 1024, 2048, 16
    dy, x, w = _random_case(n, i, o, dtype, gen)
    idx = torch.randperm(o, generator=gen)[:k]
    assert_close(ops.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx))
    assert_close(ops.linear_weight_grad_unified(dy, x, idx), reference.linear_weight_grad_unified(dy, x, idx))
    rows = torch.randn(k, i, generator=gen).to(dtype)
    # Rows spread over the gradient (zeros written) and rows within its first 2 MB (on-demand zero pages).
    for idx in (idx, torch.randperm((2 << 20) // (i * rows.element_size()), generator=gen)[:k]):
        dense = ops.scatter_rows(rows, idx, o)
        assert torch.equal(dense, reference.scatter_rows(rows, idx, o))
        dense += 1.0  # an ordinary writable tensor
        assert torch.equal(dense, reference.scatter_rows(rows, idx, o) + 1.0)


def _random_case(n, i, o, dtype, gen):
    dy = torch.randn(n, o, generator=gen).to(dtype)
    x = torch.randn(n, i, generator=gen).to(dtype)
    w = torch.randn(o, i, generator=gen).to(dtype)
    return dy, x, w


@pytest.mark.parametrize("dtype", DTYPES)
def test_unified_products_match_reference(dtype, gen):
    for n, i, o in SHAPES:
        dy, x, w = _random_case(n, i, o, dtype, gen)
        for k in ks(o):
            idx = torch.randperm(o, generator=gen)[:k]
            assert_close(ops.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx))
            assert_close(ops.linear_weight_grad_unified(dy, x, idx), reference.linear_weight_grad_unified(dy, x, idx))
            rows = torch.randn(k, i, generator=gen).to(dtype)
            assert torch.equal(ops.scatter_rows(rows, idx, o), reference.scatter_rows(rows, idx, o))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_products_match_reference(dtype, gen):
    for n, i, o in SHAPES:
        dy, x, w = _random_case(n, i, o, dtype, gen)
        for k in ks(o):
            vals, idx = reference.topk_rows(dy, k)
            assert_close(ops.linear_input_grad_rows(vals, idx, w), reference.linear_input_grad_rows(vals, idx, w))
            dense = reference.linear_weight_grad_rows(vals, idx, x, o)
            assert_close(ops.linear_weight_grad_rows(vals, idx, x, o, None), dense)
            rows = torch.unique(idx)[::2].contiguous()  # a subset: entries of other rows are left out
            assert_close(
                ops.linear_weight_grad_rows(vals, idx, x, o, rows), reference.linear_weight_grad_rows(vals, idx, x, o, rows)
            )


def test_per_example_weight_grad_sums_repeated_rows(gen):
    # Several examples selecting the same output row must add up (the counting sort's buckets).
    x = torch.randn(6, 11, generator=gen)
    idx = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3], [1, 2], [2, 0]])
    vals = torch.randn(6, 2, generator=gen)
    assert_close(ops.linear_weight_grad_rows(vals, idx, x, 4, None), reference.linear_weight_grad_rows(vals, idx, x, 4))


def _poison_heap(nbytes: int) -> None:
    """Leave a freed heap block of ``nbytes`` full of NaN, which the next allocation of that size reuses."""
    block = torch.full((nbytes // 4,), float("nan"))
    del block


def test_every_output_element_is_written(gen):
    n, i, o, k = 20, 30, 40, 7
    dy, x, w = _random_case(n, i, o, torch.float32, gen)
    idx = reference.topk_unified(dy, k)
    vals, ridx = reference.topk_rows(dy, k)
    calls = [
        (n * i * 4, lambda: ops.linear_input_grad_unified(dy, w, idx)),
        (k * i * 4, lambda: ops.linear_weight_grad_unified(dy, x, idx)),
        (n * i * 4, lambda: ops.linear_input_grad_rows(vals, ridx, w)),
        (o * i * 4, lambda: ops.linear_weight_grad_rows(vals, ridx, x, o, None)),
        (o * i * 4, lambda: ops.scatter_rows(torch.randn(k, i), idx, o)),
        (n * k * 4, lambda: ops.topk_rows(dy, k)[0]),
    ]
    for nbytes, call in calls:
        _poison_heap(nbytes)
        assert not torch.isnan(call()).any()


def test_reused_output_blocks_are_fully_written(gen):
    # Outputs of 1 MB and more come from a cache of freed blocks: poison each, free it, and the next output
    # of that size (which reuses the block) must still hold only computed values.
    n, i, o, k = 512, 1024, 640, 24
    dy, x, w = _random_case(n, i, o, torch.float32, gen)
    idx = reference.topk_unified(dy, k)
    vals, ridx = reference.topk_rows(dy, k)
    calls = [
        (lambda: ops.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx)),
        (lambda: ops.linear_input_grad_rows(vals, ridx, w), reference.linear_input_grad_rows(vals, ridx, w)),
        (lambda: ops.linear_weight_grad_rows(vals, ridx, x, o, None), reference.linear_weight_grad_rows(vals, ridx, x, o)),
    ]
    for call, expected in calls:
        out = call()
        out.fill_(float("nan"))
        del out
        assert_close(call(), expected)


def test_empty_batch():
    dy, x, w = torch.zeros(0, 6), torch.zeros(0, 4), torch.randn(6, 4)
    idx = ops.topk_unified(dy, 3)
    assert idx.tolist() == [0, 1, 2]
    assert ops.linear_input_grad_unified(dy, w, idx).shape == (0, 4)
    assert torch.equal(ops.linear_weight_grad_unified(dy, x, idx), torch.zeros(3, 4))
    vals, ridx = ops.topk_rows(dy, 3)
    assert vals.shape == ridx.shape == (0, 3)
    assert ops.linear_input_grad_rows(vals, ridx, w).shape == (0, 4)
    assert torch.equal(ops.linear_weight_grad_rows(vals, ridx, x, 6, None), torch.zeros(6, 4))


def test_non_contiguous_inputs(gen):
    dy = torch.randn(40, 30, generator=gen).t()[5:30]  # (25, 40), transposed storage
    x = torch.randn(25, 60, generator=gen)[:, ::2]  # (25, 30), strided columns
    w = torch.randn(40, 60, generator=gen)[:, 1::2]  # (40, 30)
    assert not (dy.is_contiguous() or x.is_contiguous() or w.is_contiguous())
    idx = ops.topk_unified(dy, 6)
    assert torch.equal(idx, reference.topk_unified(dy, 6))
    assert_close(ops.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx))
    assert_close(ops.linear_weight_grad_unified(dy, x, idx), reference.linear_weight_grad_unified(dy, x, idx))
    vals, ridx = ops.topk_rows(dy, 6)
    assert_close(ops.linear_input_grad_rows(vals, ridx, w), reference.linear_input_grad_rows(vals, ridx, w))


def test_bad_arguments_raise():
    dy, x, w = torch.randn(4, 6), torch.randn(4, 5), torch.randn(6, 5)
    idx = torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="k must lie in"):
        ops.topk_unified(dy, 7)
    with pytest.raises(RuntimeError, match="k must lie in"):
        ops.topk_rows(dy, 0)
    with pytest.raises(RuntimeError, match="idx values must lie in"):
        ops.linear_input_grad_unified(dy, w, torch.tensor([0, 6]))
    with pytest.raises(RuntimeError, match="idx must be int64"):
        ops.linear_weight_grad_unified(dy, x, idx.int())
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.linear_input_grad_unified(dy, w.double(), idx)
    with pytest.raises(RuntimeError, match="rows but x has"):
        ops.linear_weight_grad_unified(dy, x[:3], idx)
    with pytest.raises(RuntimeError, match="must be float16, bfloat16, float32 or float64"):
        ops.topk_unified(dy.int(), 2)
    with pytest.raises(RuntimeError, match="twice"):
        ops.scatter_rows(torch.randn(2, 5), torch.tensor([1, 1]), 6)
    with pytest.raises(ValueError, match="duplicate"):
        reference.scatter_rows(torch.randn(2, 5), torch.tensor([1, 1]), 6)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.linear_input_grad_rows(torch.randn(4, 2), torch.zeros(4, 3, dtype=torch.long), w)


def test_opcheck_every_op(gen):
    dy, x, w = _random_case(9, 7, 11, torch.float32, gen)
    idx = reference.topk_unified(dy, 4)
    vals, ridx = reference.topk_rows(dy, 3)
    cases = [
        (torch.ops.meprop.topk_unified, (dy, 4)),
        (torch.ops.meprop.topk_rows, (dy, 3)),
        (torch.ops.meprop.linear_input_grad_unified, (dy, w, idx)),
        (torch.ops.meprop.linear_weight_grad_unified, (dy, x, idx)),
        (torch.ops.meprop.linear_input_grad_rows, (vals, ridx, w)),
        (torch.ops.meprop.linear_weight_grad_rows, (vals, ridx, x, 11, None)),
        (torch.ops.meprop.linear_weight_grad_rows, (vals, ridx, x, 11, torch.unique(ridx))),
        (torch.ops.meprop.scatter_rows, (torch.randn(4, 7, generator=gen), idx, 11)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
