"""Triton kernels of the per-example products and of the scatter into a dense weight gradient.

Every output element is written exactly once (zeros included), so outputs need no zero-fill and no
atomics: the weight gradient of the per-example mode reads its contributions through a sort of the
selected (example, position) pairs by output row (a segment per row), computed by the launcher.
"""

import triton
import triton.language as tl

from ._runtime import autotune


@autotune(
    configs=[
        triton.Config({"BLOCK_I": i, "BLOCK_J": j}, num_warps=w)
        for i, j, w in ((128, 32, 4), (256, 32, 4), (256, 16, 4), (512, 16, 8), (128, 64, 4), (1024, 8, 8))
    ],
    key=["n_in", "k"],
    interpret_config=triton.Config({"BLOCK_I": 64, "BLOCK_J": 32}, num_warps=1),
)
@triton.jit
def input_grad_kernel(
    vals_ptr,
    idx_ptr,
    w_ptr,
    dx_ptr,
    n_in,
    k,
    stride_w_row,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """``dx[n, :] = sum_j vals[n, j] * W[idx[n, j], :]`` (vals, idx ``(N, k)``, W rows and dx contiguous);
    grid ``(N, column blocks)``: W's selected rows are gathered tile by tile."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    col_ok = cols < n_in
    acc = tl.zeros([BLOCK_I], tl.float32)
    for j0 in range(0, k, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < k
        sel = tl.load(idx_ptr + n * k + j, mask=j_ok, other=0)
        v = tl.load(vals_ptr + n * k + j, mask=j_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + sel[:, None] * stride_w_row + cols[None, :], mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(v[:, None] * w.to(tl.float32), axis=0)
    tl.store(dx_ptr + n * n_in + cols, acc.to(dx_ptr.dtype.element_ty), mask=col_ok)


@autotune(
    configs=[
        triton.Config({"BLOCK_I": i, "BLOCK_E": e}, num_warps=w)
        for i, e, w in ((128, 16, 4), (256, 16, 4), (512, 8, 4), (256, 32, 8), (1024, 8, 8))
    ],
    key=["n_in", "k"],
    interpret_config=triton.Config({"BLOCK_I": 64, "BLOCK_E": 32}, num_warps=1),
)
@triton.jit
def weight_grad_kernel(
    vals_ptr,
    order_ptr,
    starts_ptr,
    ends_ptr,
    x_ptr,
    dw_ptr,
    n_in,
    k,
    stride_x_row,
    BLOCK_I: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``dw[r, :] = sum_e vals.flat[order[e]] * x[order[e] // k, :]`` over ``e in [starts[r], ends[r])``
    (x rows and dw contiguous); grid ``(output rows, column blocks)``."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    col_ok = cols < n_in
    first = tl.load(starts_ptr + r)
    stop = tl.load(ends_ptr + r)
    acc = tl.zeros([BLOCK_I], tl.float32)
    for e0 in range(first, stop, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_ok = e < stop
        entry = tl.load(order_ptr + e, mask=e_ok, other=0)
        v = tl.load(vals_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
        example = entry // k
        xs = tl.load(
            x_ptr + example[:, None] * stride_x_row + cols[None, :], mask=e_ok[:, None] & col_ok[None, :], other=0.0
        )
        acc += tl.sum(v[:, None] * xs.to(tl.float32), axis=0)
    tl.store(dw_ptr + r.to(tl.int64) * n_in + cols, acc.to(dw_ptr.dtype.element_ty), mask=col_ok)


@autotune(
    configs=[
        triton.Config({"BLOCK_R": r, "BLOCK_I": i}, num_warps=w)
        for r, i, w in ((8, 512, 4), (16, 256, 4), (4, 1024, 4), (32, 256, 8), (16, 512, 8))
    ],
    key=["n_out", "n_in"],
    interpret_config=triton.Config({"BLOCK_R": 8, "BLOCK_I": 32}, num_warps=1),
)
@triton.jit
def scatter_rows_kernel(
    rows_ptr,
    pos_ptr,
    out_ptr,
    n_out,
    n_in,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """``out[r, :] = rows[pos[r], :]`` where ``pos[r] >= 0``, else zeros (rows and out contiguous);
    grid ``(row blocks, column blocks)``."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    r_ok = r < n_out
    col_ok = cols < n_in
    pos = tl.load(pos_ptr + r, mask=r_ok, other=-1)
    src = rows_ptr + pos[:, None] * n_in + cols[None, :]
    v = tl.load(src, mask=(pos >= 0)[:, None] & col_ok[None, :], other=0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * n_in + cols[None, :], v, mask=r_ok[:, None] & col_ok[None, :])
