"""The CUDA kernels (csrc/cuda) against meprop.reference, on CUDA tensors.

Indices are compared exactly: on tie-free inputs, and on inputs with exact ties (whose order the
selection rule fixes). Values are compared with dtype-dependent tolerances. Outputs are allocated from
NaN-poisoned memory, so an element a kernel does not write shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch

import meprop
from meprop import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
# Windows of positive bit patterns of the 16-bit float types used for distinct magnitudes: float16
# 2^-8 to 2^4 (12288 values), bfloat16 2^-32 to 2^32 (8192 values). Their column sums over up to 2^16
# rows are exact in float32.
CODE_WINDOW = {torch.float16: (0x1C00, 0x4C00), torch.bfloat16: (0x2F80, 0x4F80)}
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    if not ops.has_kernels("cuda"):
        pytest.fail(f"CUDA is available but meprop was built without CUDA kernels ({ops.EXTENSION_ERROR})")


def poison_allocator(nbytes: int) -> None:
    """Leaves a freed NaN-filled block of ``nbytes`` in the caching allocator for the next outputs."""
    block = torch.full((max(nbytes, 4) // 4,), float("nan"), device=DEVICE)
    del block


def distinct_magnitudes(n: int, m: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``(n, m)`` positive values of ``dtype``, each row a random order of the same m values.

    The values are distinct where the dtype has m values in its window (always for float32/float64);
    beyond that (16-bit dtypes, m > 8192) they repeat, and the ties are resolved by the selection rule.
    """
    shuffle = torch.rand(n, m, generator=gen, device=DEVICE).argsort(1)
    if dtype in CODE_WINDOW:
        lo, hi = CODE_WINDOW[dtype]
        if m <= hi - lo:
            codes = torch.randperm(hi - lo, generator=gen, device=DEVICE)[:m] + lo
        else:
            codes = torch.randint(lo, hi, (m,), generator=gen, device=DEVICE)
        return codes[shuffle].to(torch.int16).view(dtype)
    return (shuffle + 1).to(dtype)


def random_signs(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, device=DEVICE) * 2 - 1


def tie_free_rows(n: int, m: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A ``(n, m)`` gradient whose magnitudes are distinct within each row (see distinct_magnitudes)."""
    return distinct_magnitudes(n, m, dtype, gen) * random_signs((n, m), gen).to(dtype)


def tie_free_columns(n: int, m: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A ``(n, m)`` gradient whose column sums of |dy| are distinct and exact in any summation order.

    Column j holds +-c_j (distinct c_j) in ceil(n/2) random rows and zeros elsewhere, so its score is
    ceil(n/2) * c_j, exact in the accumulation type for the shapes used here (float32 integers below 2^24).
    """
    magnitude = distinct_magnitudes(1, m, dtype, gen)
    keep = torch.rand(n, m, generator=gen, device=DEVICE).argsort(0) < (n + 1) // 2
    return magnitude * keep.to(dtype) * random_signs((n, m), gen).to(dtype)


def gaussian(shape, dtype, gen):
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape and actual.is_cuda
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOLERANCE[dtype])


# Odd shapes (N, out, in) and the k values tried on each.
SHAPES = [(1, 1, 1), (3, 5, 7), (33, 257, 129), (17, 100, 64), (1000, 70, 3), (5, 3000, 17), (2, 40000, 5)]


def ks_for(out: int) -> list[int]:
    return sorted({1, max(1, out - 1), max(1, out // 3), min(out, 300)})


# ---------------------------------------------------------------------------------------------------
# Selection


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, out, _in", SHAPES)
def test_topk_rows_tie_free(dtype, n, out, _in):
    gen = generator(n * 7 + out)
    dy = tie_free_rows(n, out, dtype, gen)
    for k in ks_for(out):
        poison_allocator(n * k * 8)
        vals, idx = ops.topk_rows(dy, k)
        ref_vals, ref_idx = reference.topk_rows(dy, k)
        assert idx.dtype == torch.int64 and vals.dtype == dtype
        assert torch.equal(idx, ref_idx), f"k={k}"
        assert torch.equal(vals, ref_vals), f"k={k}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, out, _in", SHAPES)
def test_topk_unified_tie_free(dtype, n, out, _in):
    gen = generator(n * 11 + out)
    dy = tie_free_columns(n, out, dtype, gen)
    for k in ks_for(out):
        poison_allocator(k * 8)
        idx = ops.topk_unified(dy, k)
        assert idx.dtype == torch.int64
        assert torch.equal(idx, reference.topk_unified(dy, k)), f"k={k}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_ties_and_nan_follow_the_selection_order(dtype):
    """Exact ties go by lower index and NaN ranks above every number (including inf)."""
    gen = generator(3)
    n, out = 70, 600
    dy = torch.randint(-2, 3, (n, out), generator=gen, device=DEVICE).to(dtype)
    dy[5, 17] = dy[5, 400] = dy[9, 3] = float("nan")
    dy[5, 30] = float("inf")
    dy[6, 31] = -float("inf")
    for k in (1, 2, 3, 64, 299, 300, out - 1, out):
        vals, idx = ops.topk_rows(dy, k)
        ref_vals, ref_idx = reference.topk_rows(dy, k)
        assert torch.equal(idx, ref_idx), f"k={k}"
        torch.testing.assert_close(vals, ref_vals, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(ops.topk_unified(dy, k), reference.topk_unified(dy, k)), f"k={k}"
    zeros = torch.zeros(4, 50, device=DEVICE, dtype=dtype)
    assert torch.equal(ops.topk_rows(zeros, 7)[1], reference.topk_rows(zeros, 7)[1])
    assert torch.equal(ops.topk_unified(zeros, 7), torch.arange(7, device=DEVICE))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_topk_large(dtype):
    """Paper-sized gradients (B=1024, out=8192), k > 2048 (the sort path) and > 65535 rows."""
    gen = generator(5)
    dy = tie_free_rows(1024, 8192, dtype, gen)
    for k in (1, 32, 256, 2048, 3000, 8191):
        vals, idx = ops.topk_rows(dy, k)
        ref_vals, ref_idx = reference.topk_rows(dy, k)
        assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals), f"k={k}"
    dy = tie_free_columns(1024, 8192, dtype, gen)
    for k in (1, 32, 2048, 3000, 8191):
        assert torch.equal(ops.topk_unified(dy, k), reference.topk_unified(dy, k)), f"k={k}"
    many_rows = tie_free_rows(70_000, 9, dtype, gen)
    vals, idx = ops.topk_rows(many_rows, 4)
    ref_vals, ref_idx = reference.topk_rows(many_rows, 4)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    many_rows = tie_free_columns(70_000, 9, dtype, gen)
    assert torch.equal(ops.topk_unified(many_rows, 4), reference.topk_unified(many_rows, 4))


def test_topk_empty_batch():
    dy = torch.empty(0, 10, device=DEVICE)
    vals, idx = ops.topk_rows(dy, 3)
    assert vals.shape == idx.shape == (0, 3)
    assert torch.equal(ops.topk_unified(dy, 3), torch.arange(3, device=DEVICE))


# ---------------------------------------------------------------------------------------------------
# Products


def unified_case(n, out, _in, k, dtype, seed):
    gen = generator(seed)
    dy, x, w = gaussian((n, out), dtype, gen), gaussian((n, _in), dtype, gen), gaussian((out, _in), dtype, gen)
    idx = torch.randperm(out, generator=gen, device=DEVICE)[:k]
    return dy, x, w, idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, out, _in", SHAPES + [(0, 6, 4), (4, 6, 0)])
def test_unified_products(dtype, n, out, _in):
    for k in ks_for(out) + [0]:
        dy, x, w, idx = unified_case(n, out, _in, k, dtype, seed=n + out + k)
        poison_allocator(n * _in * 8)
        assert_close(ops.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx), dtype)
        poison_allocator(k * _in * 8)
        rows = ops.linear_weight_grad_unified(dy, x, idx)
        assert_close(rows, reference.linear_weight_grad_unified(dy, x, idx), dtype)
        poison_allocator(out * _in * 8)
        assert torch.equal(ops.scatter_rows(rows, idx, out), reference.scatter_rows(rows, idx, out))


def rows_case(n, out, _in, k, dtype, seed):
    gen = generator(seed)
    vals, idx = reference.topk_rows(gaussian((n, out), dtype, gen), k)
    x, w = gaussian((n, _in), dtype, gen), gaussian((out, _in), dtype, gen)
    return vals, idx, x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, out, _in", SHAPES + [(0, 6, 4), (4, 6, 0)])
def test_per_example_products(dtype, n, out, _in):
    for k in ks_for(out):
        vals, idx, x, w = rows_case(n, out, _in, k, dtype, seed=n + out + k)
        poison_allocator(n * _in * 8)
        assert_close(ops.linear_input_grad_rows(vals, idx, w), reference.linear_input_grad_rows(vals, idx, w), dtype)
        poison_allocator(out * _in * 8)
        dense = ops.linear_weight_grad_rows(vals, idx, x, out, None)
        assert_close(dense, reference.linear_weight_grad_rows(vals, idx, x, out, None), dtype)
        touched = torch.unique(idx)
        assert_close(
            ops.linear_weight_grad_rows(vals, idx, x, out, touched),
            reference.linear_weight_grad_rows(vals, idx, x, out, touched),
            dtype,
        )
        # A fixed summation order: the same inputs give the same bits.
        assert torch.equal(ops.linear_weight_grad_rows(vals, idx, x, out, None), dense)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_example_products_with_shared_columns(dtype):
    """Every example keeps the same few columns: long segments per output row, k > the block size."""
    gen = generator(9)
    n, out, _in, k = 300, 400, 33, 200
    idx = torch.arange(k, device=DEVICE).flip(0).expand(n, k).contiguous()
    vals = gaussian((n, k), dtype, gen)
    x, w = gaussian((n, _in), dtype, gen), gaussian((out, _in), dtype, gen)
    assert_close(ops.linear_input_grad_rows(vals, idx, w), reference.linear_input_grad_rows(vals, idx, w), dtype)
    assert_close(
        ops.linear_weight_grad_rows(vals, idx, x, out, None), reference.linear_weight_grad_rows(vals, idx, x, out), dtype
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_products_large(dtype):
    """B=1024, in=out=8192, k=32, and more than 65535 rows."""
    gen = generator(11)
    n, out, _in, k = 1024, 8192, 8192, 32
    dy, x, w = gaussian((n, out), dtype, gen), gaussian((n, _in), dtype, gen), gaussian((out, _in), dtype, gen)
    idx = ops.topk_unified(dy, k)
    assert_close(ops.linear_input_grad_unified(dy, w, idx), reference.linear_input_grad_unified(dy, w, idx), dtype)
    rows = ops.linear_weight_grad_unified(dy, x, idx)
    assert_close(rows, reference.linear_weight_grad_unified(dy, x, idx), dtype)
    poison_allocator(out * _in * 4)
    assert torch.equal(ops.scatter_rows(rows, idx, out), reference.scatter_rows(rows, idx, out))
    vals, pidx = ops.topk_rows(dy, k)
    assert_close(ops.linear_input_grad_rows(vals, pidx, w), reference.linear_input_grad_rows(vals, pidx, w), dtype)
    poison_allocator(out * _in * 4)
    assert_close(
        ops.linear_weight_grad_rows(vals, pidx, x, out, None), reference.linear_weight_grad_rows(vals, pidx, x, out), dtype
    )
    n = 70_000
    vals, pidx, x, w = rows_case(n, 12, 5, 3, dtype, seed=12)
    assert_close(ops.linear_input_grad_rows(vals, pidx, w), reference.linear_input_grad_rows(vals, pidx, w), dtype)
    assert_close(
        ops.linear_weight_grad_rows(vals, pidx, x, 12, None), reference.linear_weight_grad_rows(vals, pidx, x, 12), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_rows_unaligned_rows(dtype):
    """Rows of odd width at an odd offset take the narrow copy path; every other row is zero."""
    gen = generator(13)
    storage = gaussian((8, 7 * 5 + 1), dtype, gen)
    rows = storage.view(-1)[1:36].view(5, 7)  # contiguous, misaligned for 16/8-byte copies
    idx = torch.tensor([9, 0, 4, 11, 2], device=DEVICE)
    poison_allocator(12 * 7 * 8)
    assert torch.equal(ops.scatter_rows(rows, idx, 12), reference.scatter_rows(rows, idx, 12))


# ---------------------------------------------------------------------------------------------------
# Through the autograd layer


@pytest.mark.parametrize("mode", meprop.MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparse_grad", (False, True))
def test_functional_linear_matches_reference_backend(mode, dtype, sparse_grad):
    n, _in, out, k = 37, 65, 131, 9
    grads = {}
    for backend in ("reference", "cuda"):
        gen = generator(21)
        x = gaussian((n, _in), dtype, gen).requires_grad_()
        w = gaussian((out, _in), dtype, gen).requires_grad_()
        b = gaussian((out,), dtype, gen).requires_grad_()
        dy = tie_free_rows(n, out, dtype, gen) if "unified" not in mode else tie_free_columns(n, out, dtype, gen)
        y = meprop.functional.linear(
            x, w, b, k=k, mode=mode, backend=backend, sparse_grad=sparse_grad, generator=generator(22)
        )
        y.backward(dy)
        grads[backend] = (x.grad, w.grad.to_dense() if sparse_grad else w.grad, b.grad)
    for got, want in zip(grads["cuda"], grads["reference"]):
        assert_close(got, want, dtype)


def test_automatic_backend_for_cuda_tensors_is_a_kernel_backend():
    assert meprop.backends.resolve(None, torch.device(DEVICE)) in ("cuda", "triton")


# ---------------------------------------------------------------------------------------------------
# Argument checks and the torch.library contract


def test_bad_arguments_raise_clear_errors():
    dy = torch.randn(4, 6, device=DEVICE)
    w = torch.randn(6, 3, device=DEVICE)
    idx = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(RuntimeError, match="k must lie in"):
        ops.topk_rows(dy, 7)
    with pytest.raises(RuntimeError, match="k must lie in"):
        ops.topk_unified(dy, 0)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.linear_input_grad_unified(dy, w.double(), idx)
    with pytest.raises(RuntimeError, match="idx must be int64"):
        ops.linear_input_grad_unified(dy, w, idx.int())
    with pytest.raises(RuntimeError, match="must be on"):
        ops.linear_input_grad_unified(dy, w, idx.cpu())
    with pytest.raises(RuntimeError, match="columns but weight has"):
        ops.linear_input_grad_unified(dy, w[:5], idx)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.linear_input_grad_rows(dy[:, :2], idx.expand(3, 2), w)
    with pytest.raises(RuntimeError, match="more than out_features"):
        ops.scatter_rows(torch.randn(3, 2, device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE), 2)


def test_opcheck():
    gen = generator(31)
    dy = tie_free_rows(6, 10, torch.float32, gen)
    x, w = gaussian((6, 5), torch.float32, gen), gaussian((10, 5), torch.float32, gen)
    vals, idx = reference.topk_rows(dy, 3)
    uidx = reference.topk_unified(dy, 3)
    rows = reference.linear_weight_grad_unified(dy, x, uidx)
    cases = [
        (torch.ops.meprop.topk_unified.default, (dy, 3)),
        (torch.ops.meprop.topk_rows.default, (dy, 3)),
        (torch.ops.meprop.linear_input_grad_unified.default, (dy, w, uidx)),
        (torch.ops.meprop.linear_weight_grad_unified.default, (dy, x, uidx)),
        (torch.ops.meprop.linear_input_grad_rows.default, (vals, idx, w)),
        (torch.ops.meprop.linear_weight_grad_rows.default, (vals, idx, x, 10, None)),
        (torch.ops.meprop.linear_weight_grad_rows.default, (vals, idx, x, 10, torch.unique(idx))),
        (torch.ops.meprop.scatter_rows.default, (rows, uidx, 10)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
