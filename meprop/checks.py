"""Argument checks of the meprop ops: one function per rule, used by every backend.

The reference implementation, the Triton ops and the fake (shape) kernels call these; the C++ kernels call
their twins in ``csrc/checks.h`` (same condition, exception type and message). The exception type says
what is wrong: ``TypeError`` for a dtype, ``ValueError`` for a shape, a size, ``k``, a device or duplicate
indices, ``IndexError`` for an index value out of range. Messages start with ``meprop.<op>:``.

Index *values* are checked where that costs no device synchronisation: on CPU tensors, with an exception;
on CUDA tensors, with an asynchronous device assertion; not at all on fake or meta tensors, under
``torch.compile`` tracing or inside ``torch.func`` transforms (the values are not known there).
"""

from __future__ import annotations

import torch

__all__ = [
    "FLOAT_DTYPES",
    "matrix",
    "array",
    "batch_sizes",
    "like",
    "k_range",
    "size_match",
    "out_features",
    "index",
    "index_values",
    "accumulator",
    "decay",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _prefix(op: str) -> str:
    return f"meprop.{op}: "


# Plain `if not ...: raise` rather than torch._check(cond, message): the conditions are static under fake
# tensors and torch.compile tracing, and the message is only built for a failure.


def matrix(op: str, name: str, t) -> None:
    """``t`` is a 2-D float16/bfloat16/float32/float64 tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_prefix(op)}{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{_prefix(op)}{name} must be 2-D, got shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_prefix(op)}{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def array(op: str, name: str, t, dims: int) -> None:
    """``t`` is a ``dims``-D float16/bfloat16/float32/float64 tensor (:func:`matrix` for ``dims = 2``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_prefix(op)}{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{_prefix(op)}{name} must be {dims}-D, got shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_prefix(op)}{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def batch_sizes(op: str, sizes, steps: int, batch: int) -> None:
    """``sizes`` lists ``steps`` ints, non-increasing, each in ``[0, batch]`` (a PackedSequence's batch sizes)."""
    if len(sizes) != steps:
        raise ValueError(f"{_prefix(op)}batch_sizes must hold {steps} entries (one per step), got {len(sizes)}")
    for t, b in enumerate(sizes):
        if not 0 <= b <= batch or (t > 0 and b > sizes[t - 1]):
            raise ValueError(f"{_prefix(op)}batch_sizes must be non-increasing in [0, {batch}], got {list(sizes)}")


def like(op: str, name: str, t: torch.Tensor, like_name: str, other: torch.Tensor) -> None:
    """``t`` has ``other``'s dtype and device."""
    if t.dtype != other.dtype:
        raise TypeError(f"{_prefix(op)}{name} is {t.dtype} but {like_name} is {other.dtype}")
    if t.device != other.device:
        raise ValueError(f"{_prefix(op)}{name} is on {t.device} but {like_name} is on {other.device}")


def accumulator(op: str, name: str, t, dy: torch.Tensor) -> None:
    """``t`` is a 1-D tensor of ``dy``'s accumulation dtype (float64 for float64, else float32) on its device."""
    array(op, name, t, 1)
    want = torch.float64 if dy.dtype == torch.float64 else torch.float32
    if t.dtype != want:
        raise TypeError(f"{_prefix(op)}{name} must be {want} (the accumulation dtype of {dy.dtype} dy), got {t.dtype}")
    if t.device != dy.device:
        raise ValueError(f"{_prefix(op)}{name} is on {t.device} but dy is on {dy.device}")


def decay(op: str, value) -> None:
    """``value`` is a number in ``(0, 1]``."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{_prefix(op)}decay must lie in (0, 1], got {value:g}")


def k_range(op: str, k, n_cols) -> None:
    """``k`` is an int in ``[1, n_cols]``."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{_prefix(op)}k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n_cols:
        raise ValueError(f"{_prefix(op)}k must lie in [1, {n_cols}], got {k}")


def size_match(op: str, what: str, a, b) -> None:
    """Two sizes (or shapes) that must agree; ``what`` names them, e.g. ``"dy columns and weight rows"``."""
    if a != b:
        raise ValueError(f"{_prefix(op)}{what} must match, got {a} and {b}")


def out_features(op: str, n) -> None:
    """``n`` is an int >= 0."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"{_prefix(op)}out_features must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{_prefix(op)}out_features must be >= 0, got {n}")


def index(op: str, name: str, idx, dims: int, like_tensor: torch.Tensor) -> None:
    """``idx`` is an int64 tensor of ``dims`` dimensions on ``like_tensor``'s device."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{_prefix(op)}{name} must be a tensor, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"{_prefix(op)}{name} must be int64, got {idx.dtype}")
    if idx.dim() != dims:
        raise ValueError(f"{_prefix(op)}{name} must be {dims}-D, got shape {list(idx.shape)}")
    if idx.device != like_tensor.device:
        raise ValueError(f"{_prefix(op)}{name} is on {idx.device} but the other tensors are on {like_tensor.device}")


def _values_known(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read here (a real tensor, eagerly, outside torch.func transforms)."""
    if t.device.type == "meta" or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return not isinstance(t, torch._subclasses.FakeTensor)


def index_values(op: str, name: str, idx: torch.Tensor, bound: int, distinct: bool = False) -> None:
    """``idx``'s values lie in ``[0, bound)`` (IndexError) and, if ``distinct``, none repeats (ValueError)."""
    if idx.numel() == 0 or not _values_known(idx):
        return
    if idx.device.type != "cpu":
        ok = (idx.min() >= 0) & (idx.max() < bound)
        message = f"{_prefix(op)}{name} values must lie in [0, {bound})"
        if distinct:
            flat = idx.reshape(-1).sort().values
            ok = ok & (flat[1:] != flat[:-1]).all()
            message += " and be distinct"
        torch._assert_async(ok, message)
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= bound:
        raise IndexError(f"{_prefix(op)}{name} values must lie in [0, {bound}), got [{lo}, {hi}]")
    if distinct:
        flat = idx.reshape(-1).sort().values
        repeated = flat[1:][flat[1:] == flat[:-1]]
        if repeated.numel():
            raise ValueError(f"{_prefix(op)}{name} holds {int(repeated[0])} more than once")
