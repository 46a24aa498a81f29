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
        triton.Config({"ROWS": r, "BLOCK_I": i, "BLOCK_J": j}, num_warps=w)
        for r, i, j, w in ((1, 128, 32, 4), (1, 256, 32, 4), (1, 256, 16, 4), (1, 512, 16, 8), (2, 256, 16, 4), (4, 128, 16, 4))
    ],
    key=["n_rows", "n_in", "k"],
    interpret_config=triton.Config({"ROWS": 16, "BLOCK_I": 64, "BLOCK_J": 32}, num_warps=1),
)
@triton.jit
def input_grad_kernel(
    vals_ptr,
    idx_ptr,
    w_ptr,
    dx_ptr,
    n_rows,
    n_in,
    k,
    stride_w_row,
    ROWS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """``dx[n, :] = sum_j vals[n, j] * W[idx[n, j], :]`` (vals, idx ``(N, k)``, W rows and dx contiguous);
    grid ``(example blocks, column blocks)``: W's selected rows are gathered tile by tile."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    col_ok = cols < n_in
    acc = tl.zeros([ROWS, BLOCK_I], tl.float32)
    for j0 in range(0, k, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        pick = row_ok[:, None] & (j < k)[None, :]
        offsets = rows.to(tl.int64)[:, None] * k + j[None, :]
        sel = tl.load(idx_ptr + offsets, mask=pick, other=0)
        v = tl.load(vals_ptr + offsets, mask=pick, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + sel[:, :, None] * stride_w_row + cols[None, None, :],
            mask=pick[:, :, None] & col_ok[None, None, :],
            other=0.0,
        )
        acc += tl.sum(v[:, :, None] * w.to(tl.float32), axis=1)
    out = dx_ptr + rows.to(tl.int64)[:, None] * n_in + cols[None, :]
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@autotune(
    configs=[
        triton.Config({"ROWS": r, "BLOCK_I": i, "BLOCK_E": e}, num_warps=w)
        for r, i, e, w in ((1, 128, 16, 4), (1, 256, 16, 4), (1, 512, 8, 4), (1, 256, 32, 8), (1, 1024, 8, 8), (4, 128, 8, 4))
    ],
    key=["n_out", "n_in", "k"],
    interpret_config=triton.Config({"ROWS": 16, "BLOCK_I": 64, "BLOCK_E": 32}, num_warps=1),
)
@triton.jit
def weight_grad_kernel(
    vals_ptr,
    order_ptr,
    starts_ptr,
    ends_ptr,
    x_ptr,
    dw_ptr,
    n_out,
    n_in,
    k,
    stride_x_row,
    ROWS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``dw[r, :] = sum_e vals.flat[order[e]] * x[order[e] // k, :]`` over ``e in [starts[r], ends[r])``
    (x rows and dw contiguous); grid ``(output-row blocks, column blocks)``."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = r < n_out
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    col_ok = cols < n_in
    first = tl.load(starts_ptr + r, mask=r_ok, other=0)
    stop = tl.load(ends_ptr + r, mask=r_ok, other=0)
    acc = tl.zeros([ROWS, BLOCK_I], tl.float32)
    for e0 in range(0, tl.max(stop - first), BLOCK_E):
        e = first[:, None] + e0 + tl.arange(0, BLOCK_E)[None, :]
        e_ok = e < stop[:, None]
        entry = tl.load(order_ptr + e, mask=e_ok, other=0)
        v = tl.load(vals_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
        example = entry // k
        xs = tl.load(
            x_ptr + example[:, :, None] * stride_x_row + cols[None, None, :],
            mask=e_ok[:, :, None] & col_ok[None, None, :],
            other=0.0,
        )
        acc += tl.sum(v[:, :, None] * xs.to(tl.float32), axis=1)
    out = dw_ptr + r.to(tl.int64)[:, None] * n_in + cols[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=r_ok[:, None] & col_ok[None, :])


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
