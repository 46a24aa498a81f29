"""What is particular to the CUDA kernels (csrc/cuda): paper-sized and many-row cases, the sort path of the
selections (k > 2048), unaligned scatter copies, and the autograd layer on CUDA tensors.

The kernels' results on small shapes are tested with every other backend's in test_conformance.py and
test_properties.py. Outputs come from NaN-poisoned memory of the caching allocator.
"""

from __future__ import annotations

import pytest
import torch
from conformance import (
    assert_matches,
    assert_zero_outside,
    gaussian,
    oracle,
    row_index,
    tie_free_columns,
    tie_free_rows,
)

import meprop
from meprop import backends, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
DEVICE = "cuda"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    if not ops.has_kernels("cuda"):
        pytest.fail(f"CUDA is available but meprop was built without CUDA kernels ({ops.EXTENSION_ERROR})")


@pytest.fixture
def cuda_ops():
    return backends.get("cuda")


def poison_allocator(nbytes: int) -> None:
    """Leaves a freed NaN-filled block of ``nbytes`` in the caching allocator for the next outputs."""
    block = torch.full((max(nbytes, 4) // 4,), float("nan"), device=DEVICE)
    del block


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_topk_large(dtype, cuda_ops):
    """Paper-sized gradients (B=1024, out=8192), k > 2048 (the sort path) and more than 65535 rows."""
    gen = torch.Generator().manual_seed(5)
    dy = tie_free_rows(1024, 8192, dtype, gen, DEVICE)
    for k in (1, 32, 256, 2048, 3000, 8191):
        vals, idx = cuda_ops.topk_rows(dy, k)
        ref_vals, ref_idx = meprop.reference.topk_rows(dy, k)
        assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals), f"k={k}"
    dy = tie_free_columns(1024, 8192, dtype, gen, DEVICE)
    for k in (1, 32, 2048, 3000, 8191):
        assert torch.equal(cuda_ops.topk_unified(dy, k), meprop.reference.topk_unified(dy, k)), f"k={k}"
    many_rows = tie_free_rows(70_000, 9, dtype, gen, DEVICE)
    vals, idx = cuda_ops.topk_rows(many_rows, 4)
    ref_vals, ref_idx = meprop.reference.topk_rows(many_rows, 4)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    many_rows = tie_free_columns(70_000, 9, dtype, gen, DEVICE)
    assert torch.equal(cuda_ops.topk_unified(many_rows, 4), meprop.reference.topk_unified(many_rows, 4))
    assert torch.equal(cuda_ops.column_scores(many_rows), meprop.reference.column_scores(many_rows))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_products_large(dtype, cuda_ops):
    """B=1024, in=out=8192, k=32, and more than 65535 rows."""
    gen = torch.Generator().manual_seed(11)
    n, out, n_in, k = 1024, 8192, 8192, 32
    dy, x, w = (gaussian(s, dtype, gen, DEVICE) for s in ((n, out), (n, n_in), (out, n_in)))
    ref = meprop.reference
    idx = cuda_ops.topk_unified(dy, k)
    poison_allocator(n * n_in * 4)
    assert_matches(
        cuda_ops.linear_input_grad_unified(dy, w, idx),
        ref.linear_input_grad_unified(dy, w, idx).double().cpu(),
        dtype,
        DEVICE,
    )
    rows = cuda_ops.linear_weight_grad_unified(dy, x, idx)
    assert_matches(rows, ref.linear_weight_grad_unified(dy, x, idx).double().cpu(), dtype, DEVICE)
    poison_allocator(out * n_in * 4)
    dense = cuda_ops.scatter_rows(rows, idx, out)
    assert torch.equal(dense, ref.scatter_rows(rows, idx, out))
    assert_zero_outside(dense, idx)
    vals, pidx = cuda_ops.topk_rows(dy, k)
    poison_allocator(n * n_in * 4)
    assert_matches(
        cuda_ops.linear_input_grad_rows(vals, pidx, w),
        ref.linear_input_grad_rows(vals, pidx, w).double().cpu(),
        dtype,
        DEVICE,
    )
    poison_allocator(out * n_in * 4)
    got = cuda_ops.linear_weight_grad_rows(vals, pidx, x, out, None)
    assert_matches(got, ref.linear_weight_grad_rows(vals, pidx, x, out).double().cpu(), dtype, DEVICE)
    n = 70_000
    ridx, vals = row_index(n, 12, 3, gen, DEVICE), gaussian((n, 3), dtype, gen, DEVICE)
    x, w = gaussian((n, 5), dtype, gen, DEVICE), gaussian((12, 5), dtype, gen, DEVICE)
    assert_matches(
        cuda_ops.linear_input_grad_rows(vals, ridx, w),
        ref.linear_input_grad_rows(vals, ridx, w).double().cpu(),
        dtype,
        DEVICE,
    )
    got = cuda_ops.linear_weight_grad_rows(vals, ridx, x, 12, None)
    assert_matches(got, ref.linear_weight_grad_rows(vals, ridx, x, 12).double().cpu(), dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_rows_unaligned_rows(dtype, cuda_ops):
    """Rows of odd width at an odd offset take the narrow copy path; every other row is zero."""
    gen = torch.Generator().manual_seed(13)
    storage = gaussian((8, 7 * 5 + 1), dtype, gen, DEVICE)
    rows = storage.view(-1)[1:36].view(5, 7)  # contiguous, misaligned for 16/8-byte copies
    idx = torch.tensor([9, 0, 4, 11, 2], device=DEVICE)
    poison_allocator(12 * 7 * 8)
    assert torch.equal(cuda_ops.scatter_rows(rows, idx, 12).double().cpu(), oracle("scatter_rows", rows, idx, 12))


@pytest.mark.parametrize("mode", meprop.MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparse_grad", (False, True))
def test_functional_linear_matches_reference_backend(mode, dtype, sparse_grad):
    n, n_in, out, k = 37, 65, 131, 9
    grads = {}
    for backend in ("reference", "cuda"):
        gen = torch.Generator().manual_seed(21)
        x, w, b = (gaussian(s, dtype, gen, DEVICE).requires_grad_() for s in ((n, n_in), (out, n_in), (out,)))
        dy = (tie_free_rows if "unified" not in mode else tie_free_columns)(n, out, dtype, gen, DEVICE)
        g = torch.Generator(device=DEVICE).manual_seed(22)
        meprop.functional.linear(
            x, w, b, k=k, mode=mode, backend=backend, sparse_grad=sparse_grad, generator=g
        ).backward(dy)
        grads[backend] = (x.grad, w.grad.to_dense() if sparse_grad else w.grad, b.grad)
    for got, want in zip(grads["cuda"], grads["reference"]):
        assert_matches(got, want.double().cpu(), dtype, DEVICE)


def test_automatic_backend_for_cuda_tensors_is_a_kernel_backend():
    assert backends.resolve(None, torch.device(DEVICE), torch.float32, 32).name in ("cuda", "triton")
    assert backends.resolve(None, torch.device(DEVICE), torch.float64, 32).name == "cuda"
