"""Triton kernels of the top-k selections: per-row top-k of |dy| and the unified (column-sum) top-k.

Selection works on int64 keys: the high word holds the float32 bits of the score (scores are >= 0, so
their bit patterns order like their values; every NaN becomes one pattern above +inf), the low word holds
``2**31 - 1 - column``, so that of equal scores the lower column has the larger key. The k largest keys
are then exactly the reference's selection order (larger first, ties by lower index, NaN first).
"""

import triton
import triton.language as tl

from ._runtime import autotune


@triton.jit
def _merge_runs(x, ROWS: tl.constexpr, L: tl.constexpr, LOG_RUN: tl.constexpr, DIR_BIT: tl.constexpr,
                REVERSE: tl.constexpr):
    """Sort every bitonic run of ``2**LOG_RUN`` columns of ``x (ROWS, L)``: ascending where bit ``DIR_BIT`` of the
    column index is 0, descending where it is 1 (the other way round with ``REVERSE``).

    Each step orders the pairs of columns ``c``, ``c + DIST`` (``c & DIST == 0``) through a ``(pairs, 2, DIST)``
    view: min and max over its size-2 axis (in-register reductions on a GPU).
    """
    side = tl.arange(0, 2)[None, :, None]
    for t in tl.static_range(LOG_RUN):  # DIST = 2**(LOG_RUN - 1 - t); (constexprs cannot be rebound in a loop)
        pairs = tl.reshape(x, [(ROWS * L) >> (LOG_RUN - t), 2, 1 << (LOG_RUN - 1 - t)])
        low = tl.min(pairs, axis=1)
        high = tl.max(pairs, axis=1)
        pair_start = tl.arange(0, (ROWS * L) >> (LOG_RUN - t))[:, None] << (LOG_RUN - t)
        col = (pair_start + tl.arange(0, 1 << (LOG_RUN - 1 - t))[None, :]) % L
        descending = (((col >> DIR_BIT) & 1) == 1) != REVERSE
        first = tl.where(descending, high, low)
        second = tl.where(descending, low, high)
        x = tl.reshape(tl.where(side == 0, first[:, None, :], second[:, None, :]), [ROWS, L])
    return x


@triton.jit
def _top_descending(keys, ROWS: tl.constexpr, LOG_CHUNK: tl.constexpr, LOG_K: tl.constexpr):
    """The ``2**LOG_K`` largest keys of each row of ``keys (ROWS, 2**LOG_CHUNK)``, in descending order.

    Bitonic top-k: sort runs of K columns in alternating directions, then repeatedly take the elementwise max
    of neighbouring runs (one descending, one ascending: the max holds the top K of both and is bitonic) and
    merge it, halving the columns until one run is left.
    """
    K: tl.constexpr = 1 << LOG_K
    for s in tl.static_range(1, LOG_K + 1):  # runs of 2**s in alternating directions
        keys = _merge_runs(keys, ROWS, 1 << LOG_CHUNK, s, s, True)
    for level in tl.static_range(LOG_CHUNK - LOG_K):  # the columns halve: 2**(LOG_CHUNK - level - 1) left
        keys = tl.max(tl.reshape(keys, [(ROWS << (LOG_CHUNK - level - 1)) // K, 2, K]), axis=1)
        # Bit LOG_K of a column alternates the runs' directions; once one run is left it is 0: descending.
        keys = tl.reshape(keys, [ROWS, 1 << (LOG_CHUNK - level - 1)])
        keys = _merge_runs(keys, ROWS, 1 << (LOG_CHUNK - level - 1), LOG_K, LOG_K, True)
    return keys


@autotune(
    configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8)],
    key=["n_cols", "n_parts", "LOG_K", "LOG_CHUNK", "ROWS"],
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
    LOG_K: tl.constexpr,
    LOG_CHUNK: tl.constexpr,
    ROWS: tl.constexpr,
    WRITE_VALS: tl.constexpr,
):
    """Per row r of ``score[r, c] = sum_p |src[p, r, c]|`` (src contiguous, rows of ``n_cols``): the ``k``
    columns of largest score in selection order, stored to ``idx (n_rows, k)``; with ``WRITE_VALS`` also
    ``vals[r, j] = src[0, r, idx[r, j]]``. ``k <= 2**LOG_K <= 2**LOG_CHUNK``.

    Each program keeps the best ``K = 2**LOG_K`` keys of ``ROWS`` rows in ascending order and folds in every
    block of ``2**LOG_CHUNK`` columns: the block's top K (descending) against the kept keys by elementwise
    max (bitonic, holding the top K of both), then one bitonic merge.
    """
    K: tl.constexpr = 1 << LOG_K
    CHUNK: tl.constexpr = 1 << LOG_CHUNK
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_start = rows.to(tl.int64) * n_cols
    best = tl.full([ROWS, K], -1, tl.int64)
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
        block_best = _top_descending(keys, ROWS, LOG_CHUNK, LOG_K)
        best = _merge_runs(tl.maximum(best, block_best), ROWS, K, LOG_K, LOG_K, False)
    cols = 2147483647 - (best & 2147483647)
    rank = K - 1 - tl.arange(0, K)  # best is ascending: column i holds the rank K-1-i selection
    out_mask = row_ok[:, None] & (rank < k)[None, :]
    out_offsets = rows.to(tl.int64)[:, None] * k + rank[None, :]
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
