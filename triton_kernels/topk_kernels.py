"""Triton kernels of the top-k selections: per-row top-k of |dy| and the unified (column-sum) top-k.

Selection works on int64 keys: the high word holds the float32 bits of the score (scores are >= 0, so
their bit patterns order like their values; every NaN becomes one pattern above +inf), the low word holds
``2**31 - 1 - column``, so that of equal scores the lower column has the larger key. The k largest keys
are then exactly the reference's selection order (larger first, ties by lower index, NaN first).
"""

import triton
import triton.language as tl

from meprop_triton._runtime import autotune


@autotune(
    configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8)],
    key=["n_cols", "n_parts", "K_PAD", "CHUNK", "ROWS"],
    interpret_config=triton.Config({}, num_warps=1),
)
@triton.jit
def topk_kernel(
    src_ptr,
    vals_ptr,
    idx_ptr,
    n_rows,
    n_cols,
    n_parts,
    stride_part,
    k,
    K_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    ROWS: tl.constexpr,
    WRITE_VALS: tl.constexpr,
):
    """Per row r of ``score[r, c] = sum_p |src[p, r, c]|`` (src contiguous, rows of ``n_cols``): the ``k``
    columns of largest score in selection order, stored to ``idx (n_rows, k)``; with ``WRITE_VALS`` also
    ``vals[r, j] = src[0, r, idx[r, j]]``.

    Each program keeps the best ``K_PAD`` keys of ``ROWS`` rows (sorted descending) and merges every
    ``CHUNK``-column block into them: the block's top ``K_PAD`` (bitonic top-k) against the kept keys
    reversed, by elementwise max (which holds the top ``K_PAD`` of both as a bitonic sequence), then one
    bitonic merge.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_start = rows.to(tl.int64) * n_cols
    best = tl.full([ROWS, K_PAD], -1, tl.int64)
    for start in range(0, n_cols, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        offsets = row_start[:, None] + cols[None, :]
        score = tl.zeros([ROWS, CHUNK], tl.float32)
        for part in range(n_parts):
            x = tl.load(src_ptr + part * stride_part + offsets, mask=mask, other=0.0)
            score += tl.abs(x.to(tl.float32))
        bits = tl.where(score != score, 0x7FC00000, score.to(tl.int32, bitcast=True))
        keys = (bits.to(tl.int64) << 32) | (2147483647 - cols[None, :]).to(tl.int64)
        keys = tl.where(mask, keys, -1)
        block_best = tl.topk(keys, K_PAD)
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(block_best, 1)), descending=True)
    cols = 2147483647 - (best & 2147483647)
    j = tl.arange(0, K_PAD)
    out_mask = row_ok[:, None] & (j < k)[None, :]
    out_offsets = rows.to(tl.int64)[:, None] * k + j[None, :]
    tl.store(idx_ptr + out_offsets, cols, mask=out_mask)
    if WRITE_VALS:
        vals = tl.load(src_ptr + row_start[:, None] + cols, mask=out_mask)
        tl.store(vals_ptr + out_offsets, vals, mask=out_mask)


@autotune(
    configs=[
        triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w)
        for r, c, w in ((32, 128, 4), (16, 256, 4), (64, 64, 4), (32, 256, 8), (64, 128, 8))
    ],
    key=["n_rows", "n_cols", "rows_per_part"],
    interpret_config=triton.Config({"BLOCK_R": 4, "BLOCK_C": 32}, num_warps=1),
)
@triton.jit
def column_abs_sum_kernel(
    dy_ptr,
    partial_ptr,
    n_rows,
    n_cols,
    stride_row,
    rows_per_part,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``partial[p, c] = sum |dy[r, c]|`` in float32 over the rows ``r`` of part ``p``
    (``[p * rows_per_part, (p + 1) * rows_per_part)``); grid ``(column blocks, parts)``."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    part = tl.program_id(1)
    first = part * rows_per_part
    stop = tl.minimum(first + rows_per_part, n_rows)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(first, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < stop)[:, None] & col_ok[None, :]
        x = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)
        acc += tl.abs(x.to(tl.float32))
    tl.store(partial_ptr + part.to(tl.int64) * n_cols + cols, tl.sum(acc, axis=0), mask=col_ok)
