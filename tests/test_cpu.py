"""The CPU kernels' size-dependent paths, which the small shapes of the conformance tests do not reach."""

from __future__ import annotations

import pytest
import torch
from conformance import assert_matches, assert_zero_outside, gaussian, oracle, row_index

import meprop
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


@pytest.mark.parametrize("op", ["linear_backward_unified", "linear_backward_rows"])
def test_dense_gradient_buffer_is_taken_back_only_when_free_and_unwritten(op, gen):
    """The fused ops reuse the dense weight gradient they returned last time only when nothing holds it and it
    was not written since; whatever happens in between, every returned gradient is exact."""
    n, n_in, out, k = 12, 16, 40, 3
    x, w = gaussian((n, n_in), torch.float32, gen), gaussian((out, n_in), torch.float32, gen)

    def backward():
        dy = gaussian((n, out), torch.float32, gen)
        grad = getattr(cpu, op)(dy, x, w, k, None, False, True, False, False, True)[1]
        want = oracle(op, dy, x, w, k, None, False, True, False, False, True)[1]
        assert_matches(grad, want, torch.float32, "cpu")
        assert_zero_outside(grad, want.abs().sum(1).nonzero().flatten())
        return grad

    first = backward()
    address = first.data_ptr()
    del first
    second = backward()
    assert second.data_ptr() == address  # taken back: only the rows written last time were cleared
    held = second
    third = backward()  # `held` keeps the buffer: a new one
    assert third.data_ptr() != held.data_ptr()
    del held, second, third
    written = backward()
    written.add_(1.0)  # an in-place write: the version counter moves, the buffer is not taken back as it is
    del written
    backward()
    view = backward()[3:5]  # a view holds the storage
    backward()
    del view
    backward()


def test_dense_gradient_of_a_weight_used_several_times_in_one_backward(gen):
    """A layer applied three times in one graph: its three gradients accumulate (autograd sums them into the
    first buffer) while the later calls take their buffers back; the result equals the reference backend's."""
    layer = meprop.Linear(16, 16, k=4)
    x = gaussian((6, 16), torch.float32, gen)
    for _ in range(3):  # several steps, so that buffers are taken back across steps too
        grads = {}
        for backend in ("cpu", "reference"):
            layer.backend = backend
            layer.weight.grad = None
            layer(torch.tanh(layer(torch.tanh(layer(x))))).square().sum().backward()
            grads[backend] = layer.weight.grad
        assert_matches(grads["cpu"], grads["reference"].double(), torch.float32, "cpu")
