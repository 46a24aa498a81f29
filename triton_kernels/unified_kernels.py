"""Triton kernels of the unified products: GEMMs whose inner (or outer) dimension is the selected set S.

Both gather inside the GEMM: the tiles of ``dy[:, S]`` and of ``W[S, :]`` are loaded through the index
vector, so no compacted copy of W (or dy) is ever made. Accumulation is float32; float32 inputs use
IEEE products (no TF32), as the reference does. ``DOT_UPCAST`` converts the tiles to float32 before
``tl.dot``: the launchers set it for bfloat16 under the interpreter, whose ``tl.dot`` multiplies bfloat16
bit patterns as integers (triton 3.9); bfloat16 products are exact in float32, so the result is the same.
"""

import triton
import triton.language as tl

from ._runtime import autotune


def _gemm_configs(shapes):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples; each compiles for sm_90 without register
    spills in float32 (IEEE dot) and float16."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1)


@autotune(
    configs=_gemm_configs(
        [
            (64, 64, 32, 4, 3),
            (64, 128, 32, 8, 3),
            (128, 64, 32, 8, 3),
            (128, 128, 32, 8, 3),
            (128, 128, 16, 8, 3),
            (64, 64, 16, 4, 4),
            (32, 64, 64, 4, 3),
        ]
    ),
    key=["n_rows", "n_in", "k"],
    interpret_config=_INTERPRET_CONFIG,
)
@triton.jit
def input_grad_kernel(
    dy_ptr,
    w_ptr,
    idx_ptr,
    dx_ptr,
    n_rows,
    n_in,
    k,
    stride_dy_row,
    stride_dy_col,
    stride_w_row,
    stride_w_col,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """``dx (n_rows, n_in) = dy[:, idx] @ W[idx, :]`` (dx contiguous); grid ``(row blocks, column blocks)``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_in
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k
        sel = tl.load(idx_ptr + kk, mask=k_ok, other=0)
        a = tl.load(
            dy_ptr + rows.to(tl.int64)[:, None] * stride_dy_row + sel[None, :] * stride_dy_col,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + sel[:, None] * stride_w_row + cols[None, :] * stride_w_col,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if DOT_UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    out = dx_ptr + rows.to(tl.int64)[:, None] * n_in + cols[None, :]
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@autotune(
    configs=_gemm_configs(
        [
            (32, 64, 64, 4, 3),
            (16, 64, 64, 4, 3),
            (32, 128, 64, 8, 3),
            (32, 128, 32, 4, 3),
            (64, 64, 32, 4, 3),
            (64, 128, 32, 8, 3),
            (64, 64, 16, 4, 4),
        ]
    ),
    key=["n_rows", "n_in", "k"],
    interpret_config=_INTERPRET_CONFIG,
)
@triton.jit
def weight_grad_kernel(
    dy_ptr,
    x_ptr,
    idx_ptr,
    out_ptr,
    n_rows,
    n_in,
    k,
    stride_dy_row,
    stride_dy_col,
    stride_x_row,
    stride_x_col,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """``out (k, n_in) = dy[:, idx]^T @ x`` (out contiguous); grid ``(selection blocks, column blocks)``,
    the loop runs over the ``n_rows`` examples."""
    sel_pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    sel_ok = sel_pos < k
    col_ok = cols < n_in
    sel = tl.load(idx_ptr + sel_pos, mask=sel_ok, other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, n_rows, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < n_rows
        a = tl.load(
            dy_ptr + rows.to(tl.int64)[None, :] * stride_dy_row + sel[:, None] * stride_dy_col,
            mask=sel_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_x_row + cols[None, :] * stride_x_col,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if DOT_UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    out = out_ptr + sel_pos.to(tl.int64)[:, None] * n_in + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=sel_ok[:, None] & col_ok[None, :])
