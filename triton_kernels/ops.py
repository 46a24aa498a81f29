"""The launchers of the Triton kernels, registered as the ops ``torch.ops.meprop_triton.*``.

Each op validates its arguments first, with the checks of its entry in :data:`meprop.opdefs.OPS` (the same
checks, exceptions and messages as every other backend; index values are checked with an asynchronous
device assertion on CUDA), then allocates every output; each output element is written by a kernel,
nothing is zero-filled first.
"""

from typing import Optional

import torch
import triton

from . import rows_kernels, topk_kernels, unified_kernels
from ._runtime import INTERPRETED, launch, library_op

# Block sizes chosen by the launcher rather than by autotuning (they fix the shape of the selection state).
_TOPK_CHUNK = 1024  # columns per merge step of the top-k kernel (GPU)
_TOPK_CHUNK_INTERPRET = 64  # small, so that the tests cover several merge steps
_UNIFIED_ROWS_PER_PART = 64  # rows summed by one program of the column-sum stage (GPU)
_UNIFIED_ROWS_PER_PART_INTERPRET = 8
_UNIFIED_MAX_PARTS = 64


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _topk_plan(n_cols: int, k: int) -> dict:
    """Compile-time sizes of ``topk_kernel``: the kept keys (2**LOG_K >= k), the merge chunk, rows per program."""
    max_chunk = _TOPK_CHUNK_INTERPRET if INTERPRETED else _TOPK_CHUNK
    k_pad = max(2, _next_pow2(k))
    chunk = max(k_pad, min(_next_pow2(n_cols), max_chunk))
    # Rows per program: up to one chunk's worth of keys on a GPU; many in the interpreter (per-program cost).
    rows = 16 if INTERPRETED else max(1, min(16, max_chunk // chunk))
    return {"LOG_K": k_pad.bit_length() - 1, "LOG_CHUNK": chunk.bit_length() - 1, "ROWS": rows}


@library_op("topk_rows")
def topk_rows(dy: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k of ``|dy| (N, out)``: ``(vals, idx)``, both ``(N, k)``, ``1 <= k <= min(out, 256)``."""
    dy = dy.contiguous()
    n_rows, n_cols = dy.shape
    vals = dy.new_empty((n_rows, k))
    idx = dy.new_empty((n_rows, k), dtype=torch.long)
    if n_rows == 0:
        return vals, idx
    plan = _topk_plan(n_cols, k)
    grid = (triton.cdiv(n_rows, plan["ROWS"]),)
    launch(topk_kernels.topk_kernel)[grid](dy, vals, idx, n_rows, n_cols, 1, 0, k, WRITE_VALS=True, **plan)
    return vals, idx


def _column_partials(dy: torch.Tensor) -> torch.Tensor:
    """float32 column sums of ``|dy|`` (contiguous ``(N, out)``) over row parts: ``(parts, out)``, many programs."""
    n_rows, n_cols = dy.shape
    base = _UNIFIED_ROWS_PER_PART_INTERPRET if INTERPRETED else _UNIFIED_ROWS_PER_PART
    rows_per_part = max(base, triton.cdiv(n_rows, _UNIFIED_MAX_PARTS))
    n_parts = max(1, triton.cdiv(n_rows, rows_per_part))
    partial = dy.new_empty((n_parts, n_cols), dtype=torch.float32)
    if n_cols:
        launch(topk_kernels.column_abs_sum_kernel)[lambda meta: (triton.cdiv(n_cols, meta["BLOCK_C"]), n_parts)](
            dy, partial, n_rows, n_cols, n_cols, rows_per_part
        )
    return partial


@library_op("column_scores")
def column_scores(dy: torch.Tensor) -> torch.Tensor:
    """float32 ``(out,)`` column scores ``sum_n |dy[n, j]|``: the sum of the row parts' sums."""
    return _column_partials(dy.contiguous()).sum(0)


@library_op("topk_unified")
def topk_unified(dy: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` columns of ``dy (N, out)`` of largest ``sum_n |dy[n, j]|``, int64 ``(k,)``.

    Two stages: the column sums of the row parts (:func:`_column_partials`), then one program selecting from
    the sums of the parts.
    """
    partial = _column_partials(dy.contiguous())
    n_parts, n_cols = partial.shape
    idx = dy.new_empty((k,), dtype=torch.long)
    plan = {**_topk_plan(n_cols, k), "ROWS": 1}
    launch(topk_kernels.topk_kernel)[(1,)](
        partial, partial, idx, 1, n_cols, n_parts, n_cols, k, WRITE_VALS=False, **plan
    )
    return idx


@library_op("topk_unified_feedback")
def topk_unified_feedback(
    dy: torch.Tensor, memory: torch.Tensor, k: int, decay: float, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unified top-k with error feedback: ``(kept (k,), next memory (out,), db)`` (see meprop.opdefs).

    The column sums of the row parts (:func:`_column_partials`) plus the memory are ranked by the top-k
    program (which ranks magnitudes); the next memory and the bias gradient are elementwise torch ops.
    """
    dy = dy.contiguous()
    ranked = _column_partials(dy).sum(0) + memory
    n_cols = ranked.shape[0]
    idx = dy.new_empty((k,), dtype=torch.long)
    plan = {**_topk_plan(n_cols, k), "ROWS": 1}
    launch(topk_kernels.topk_kernel)[(1,)](ranked, ranked, idx, 1, n_cols, 1, n_cols, k, WRITE_VALS=False, **plan)
    following = (ranked * decay).index_fill_(0, idx, 0)
    db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if bias_grad else dy.new_empty((0,))
    return idx, following, db


def _dot_upcast(t: torch.Tensor) -> bool:
    """Whether the GEMM kernels must give tl.dot float32 tiles (bfloat16 in the interpreter)."""
    return t.dtype == torch.bfloat16 and INTERPRETED


def _gemm_grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))


@library_op("linear_input_grad_unified")
def linear_input_grad_unified(dy: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``dx (N, in) = dy[:, idx] @ W[idx, :]``, W's rows gathered inside the GEMM."""
    idx = idx.contiguous()  # the kernel walks idx with unit stride (dy and W may have any strides)
    n_rows, n_in = dy.shape[0], weight.shape[1]
    dx = dy.new_empty((n_rows, n_in))
    if dx.numel() == 0:
        return dx
    launch(unified_kernels.input_grad_kernel)[_gemm_grid(n_rows, n_in)](
        dy, weight, idx, dx, n_rows, n_in, idx.shape[0], *dy.stride(), *weight.stride(), DOT_UPCAST=_dot_upcast(dy)
    )
    return dx


@library_op("linear_weight_grad_unified")
def linear_weight_grad_unified(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The kept weight-gradient rows ``(k, in) = dy[:, idx]^T @ x``."""
    idx = idx.contiguous()  # the kernel walks idx with unit stride (dy and x may have any strides)
    k, n_in = idx.shape[0], x.shape[1]
    rows = dy.new_empty((k, n_in))
    if rows.numel() == 0:
        return rows
    launch(unified_kernels.weight_grad_kernel)[_gemm_grid(k, n_in)](
        dy, x, idx, rows, dy.shape[0], n_in, k, *dy.stride(), *x.stride(), DOT_UPCAST=_dot_upcast(dy)
    )
    return rows


@library_op("linear_input_grad_rows")
def linear_input_grad_rows(vals: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dx[n] = sum_j vals[n, j] * W[idx[n, j], :]``, ``dx (N, in)``."""
    vals, idx, weight = vals.contiguous(), idx.contiguous(), weight.contiguous()
    n_rows, k = vals.shape
    n_in = weight.shape[1]
    dx = vals.new_empty((n_rows, n_in))
    if dx.numel() == 0:
        return dx
    launch(rows_kernels.input_grad_kernel)[
        lambda meta: (triton.cdiv(n_rows, meta["ROWS"]), triton.cdiv(n_in, meta["BLOCK_I"]))
    ](vals, idx, weight, dx, n_rows, n_in, k, weight.stride(0))
    return dx


@library_op("linear_weight_grad_rows")
def linear_weight_grad_rows(
    vals: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, out_features: int, rows: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-example weight gradient, dense ``(out_features, in)`` or the rows ``rows`` of it ``(r, in)``.

    The (example, position) pairs are sorted by their output row (a stable sort of ``idx``), so each
    output row sums one contiguous segment of them: no atomics, a deterministic result.
    """
    vals, x = vals.contiguous(), x.contiguous()
    n_rows, k = vals.shape
    n_in = x.shape[1]
    row_ids = torch.arange(out_features, device=vals.device) if rows is None else rows
    dw = vals.new_empty((row_ids.shape[0], n_in))
    if dw.numel() == 0:
        return dw
    targets, order = torch.sort(idx.reshape(-1), stable=True)
    starts = torch.searchsorted(targets, row_ids)
    ends = torch.searchsorted(targets, row_ids, right=True)
    n_out = row_ids.shape[0]
    launch(rows_kernels.weight_grad_kernel)[
        lambda meta: (triton.cdiv(n_out, meta["ROWS"]), triton.cdiv(n_in, meta["BLOCK_I"]))
    ](vals, order, starts, ends, x, dw, n_out, n_in, k, x.stride(0))
    return dw


@library_op("scatter_rows")
def scatter_rows(rows: torch.Tensor, idx: torch.Tensor, out_features: int) -> torch.Tensor:
    """Dense ``(out_features, in)`` holding ``rows[i]`` at row ``idx[i]`` (unique) and zeros elsewhere."""
    rows = rows.contiguous()
    n_in = rows.shape[1]
    out = rows.new_empty((out_features, n_in))
    if out.numel() == 0:
        return out
    pos = torch.full((out_features,), -1, dtype=torch.long, device=rows.device)
    pos[idx] = torch.arange(idx.shape[0], device=rows.device)
    launch(rows_kernels.scatter_rows_kernel)[
        lambda meta: (triton.cdiv(out_features, meta["BLOCK_R"]), triton.cdiv(n_in, meta["BLOCK_I"]))
    ](rows, pos, out, out_features, n_in)
    return out


@library_op("linear_backward_unified")
def linear_backward_unified(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    idx: Optional[torch.Tensor],
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    rows_only: bool,
    reuse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole unified backward in one op: the Triton selection and products (see meprop.opdefs)."""
    kept = topk_unified(dy, k) if idx is None else idx.clone()  # (an op's outputs may not alias its inputs)
    dx = linear_input_grad_unified(dy, weight, kept) if input_grad else dy.new_empty((0,))
    dw = dy.new_empty((0,))
    if weight_grad and rows_only:
        kept = kept.sort().values
        dw = linear_weight_grad_unified(dy, x, kept)
    elif weight_grad:
        dw = scatter_rows(linear_weight_grad_unified(dy, x, kept), kept, dy.shape[1])
    db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if bias_grad else dy.new_empty((0,))
    return dx, dw, db, kept


@library_op("linear_backward_rows")
def linear_backward_rows(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    idx: Optional[torch.Tensor],
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    rows_only: bool,
    reuse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole per-example backward in one op: the Triton selection and products (see meprop.opdefs)."""
    if idx is None:
        vals, idx = topk_rows(dy, k)
    else:
        vals = dy.gather(1, idx)
    dx = linear_input_grad_rows(vals, idx, weight) if input_grad else dy.new_empty((0,))
    dw, rows = dy.new_empty((0,)), idx.new_empty((0,))
    if weight_grad and rows_only:
        rows = torch.unique(idx)
        dw = linear_weight_grad_rows(vals, idx, x, dy.shape[1], rows)
    elif weight_grad:
        dw = linear_weight_grad_rows(vals, idx, x, dy.shape[1], None)
    db = dy.sum(0, dtype=torch.float32).to(dy.dtype) if bias_grad else dy.new_empty((0,))
    return dx, dw, db, rows
