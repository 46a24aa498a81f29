"""Controlled selections: adaptive ``k`` and error feedback for meprop's layers (unified modes).

- :class:`Adaptive` (``k=meprop.Adaptive(mass=0.9, max_k=64)``): per layer and step, the smallest ``k`` whose
  kept columns hold at least ``mass`` of the total score ``sum_j s_j`` (``s_j = sum_n |dy[n, j]|``; for a
  convolution the channel score ``sum_{n,h,w} |dy[n, c, h, w]|``), between ``min_k`` and ``max_k``. The layer
  records the ``k`` it used in ``last_k`` (an int; None before the first backward).
- Error feedback (``error_feedback=True`` on a layer, memorized sparse backprop in the unified form): the
  scores of the dropped columns / channels are carried to the next step. The layer's ``feedback`` buffer
  ``m (width,)`` holds, for each column, the decayed scores it has accumulated since it was last kept; the
  next selection ranks ``s + m`` (``s`` that step's scores), the kept columns' memory is cleared and the
  dropped ones keep ``decay * (s + m)`` (``error_feedback=True``: ``decay`` = :data:`FEEDBACK_DECAY`, 0.5; a
  number in (0, 1] sets it). A column whose gradient is repeatedly just below the cut therefore enters a later
  selection, and its update then is that step's kept column of ``dy`` (the products stay those of the ``k``
  kept columns). What is not carried is the dropped columns' share of the weight gradient itself: that is
  the product ``dy[:, D]^T x`` over the dropped columns ``D``, i.e. the dense weight-gradient cost meProp
  avoids (the backward could then be at most ``2 / (1 + k / width)`` times faster than dense), and carrying
  ``dy`` itself into the next batch adds one batch's gradients to other examples (measured: 5 to 12 points
  of accuracy lost, ``benchmarks/results/real_models.md``). The buffer is empty until the first backward and
  then holds the scores' dtype (a Linear's: the accumulation dtype, float32 for 16-bit layers); it is
  persistent, so it is saved in ``state_dict`` (a state dict without it, e.g. that of a plain ``nn.Linear``,
  resets it). With an int ``k``, a Linear's selection, memory update and bias gradient are one op
  (``topk_unified_feedback``: one pass over ``dy`` on CPU) before the compacted products.

The selection order is the reference's (larger score first, ties by lower index). Choosing an adaptive ``k``
reads one number back from the device (a synchronisation on CUDA).
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["FEEDBACK_DECAY", "Adaptive", "FeedbackMixin", "feedback_decay", "feedback_select", "resolve", "select"]


class Adaptive:
    """An adaptive ``k``: the smallest number of kept columns holding ``mass`` of the selection scores.

    Args:
        mass: target share of the total score, ``0 < mass <= 1``.
        max_k: the largest ``k`` (int >= 1 or a ratio in (0, 1] of the layer's width); None: the width.
        min_k: the smallest ``k`` (int >= 1).
    """

    def __init__(self, mass: float = 0.9, max_k=None, min_k: int = 1) -> None:
        if isinstance(mass, bool) or not isinstance(mass, numbers.Real) or not 0.0 < float(mass) <= 1.0:
            raise ValueError(f"meprop.Adaptive: mass must be a number in (0, 1], got {mass!r}")
        if isinstance(min_k, bool) or not isinstance(min_k, numbers.Integral) or min_k < 1:
            raise ValueError(f"meprop.Adaptive: min_k must be an int >= 1, got {min_k!r}")
        _width_of(max_k, 1 << 62, "meprop.Adaptive: max_k")
        if isinstance(max_k, numbers.Integral) and max_k < min_k:
            raise ValueError(f"meprop.Adaptive: max_k ({max_k}) must be >= min_k ({min_k})")
        self.mass, self.max_k, self.min_k = float(mass), max_k, int(min_k)

    def __repr__(self) -> str:
        return f"Adaptive(mass={self.mass}, max_k={self.max_k}, min_k={self.min_k})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Adaptive) and (self.mass, self.max_k, self.min_k) == (
            other.mass,
            other.max_k,
            other.min_k,
        )

    def bounds(self, width: int, where: str) -> tuple[int, int]:
        """``(min_k, max_k)`` as ints for a layer of ``width`` columns; ``max_k`` larger than the layer's
        ``width`` is a ValueError naming ``where``."""
        high = width if self.max_k is None else _width_of(self.max_k, width, f"{where}: Adaptive max_k")
        if high > width:
            raise ValueError(f"{where}: Adaptive max_k={self.max_k} is larger than the layer's {width} outputs")
        return min(self.min_k, high), high


def _width_of(k, width: int, where: str) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ValueError(f"{where} must be None, an int >= 1 or a ratio in (0, 1], got {k!r}")
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(f"{where} must be >= 1, got {k}")
        return int(k)
    if not 0.0 < float(k) <= 1.0:
        raise ValueError(f"{where} must be None, an int >= 1 or a ratio in (0, 1], got {k!r}")
    return max(1, math.ceil(float(k) * width))


def resolve(k, width: int, where: str):
    """``k`` for a layer of ``width`` outputs: an int ``1 <= k < width``, None (dense) or an :class:`Adaptive`
    (checked against ``width``). Ints and ratios as :func:`meprop.functional.resolve_k`."""
    from .functional import resolve_k

    if isinstance(k, Adaptive):
        k.bounds(width, where)
        return k
    return resolve_k(k, width, where)


def select(scores: torch.Tensor, k, where: str = "meprop") -> torch.Tensor:
    """The kept columns for ``scores (width,)``: int64 indices, larger score first, ties by lower index.

    ``k`` is an int (the top ``k``) or an :class:`Adaptive` (the smallest prefix of that order whose scores sum
    to at least ``mass`` of the total, clamped to its bounds; all-zero scores keep ``min_k``).
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    if isinstance(k, Adaptive):
        low, high = k.bounds(scores.shape[0], where)
        mass = scores.index_select(0, order).to(torch.float64).cumsum(0)
        target = mass[-1] * k.mass
        # The first prefix reaching the target (a 1e-12 relative slack absorbs the rounding of the cumsum).
        needed = int(torch.searchsorted(mass, target * (1 - 1e-12)).item()) + 1
        k = max(low, min(high, needed))
    return order[:k]


def feedback_select(scores: torch.Tensor, memory: torch.Tensor, k, decay: float, where: str = "meprop"):
    """Error feedback's selection: ``(kept, next_memory)`` for ``scores (width,)`` and ``memory (width,)``.

    The ranked scores are ``r = scores + memory``; ``kept`` are the columns of largest ``|r|`` as
    :func:`select` chooses them (``k`` an int or an :class:`Adaptive`); ``next_memory = decay * r`` with the kept
    columns 0 (a fresh tensor). The memory this writes is never negative, so ``|r| = r`` for the layers; the
    op ``topk_unified_feedback`` is this with the scores of ``dy``.
    """
    ranked = scores + memory
    kept = select(ranked.abs(), k, where)
    ranked.index_fill_(0, kept, 0)
    if decay != 1.0:
        ranked.mul_(decay)
    return kept, ranked


FEEDBACK_DECAY = 0.5
"""The memory's decay for ``error_feedback=True``: a column dropped on every step settles at a memory equal to
its score (``m = decay (s + m)``), so its ranked score is twice its own."""


def feedback_decay(error_feedback, where: str) -> float:
    """The decay of an ``error_feedback`` option: True gives :data:`FEEDBACK_DECAY`, a number in (0, 1] is the
    decay itself (1: the dropped scores are summed until the column is kept)."""
    if error_feedback is True:
        return FEEDBACK_DECAY
    if isinstance(error_feedback, bool) or not isinstance(error_feedback, numbers.Real) or not 0.0 < float(error_feedback) <= 1.0:
        raise ValueError(f"{where} must be a bool or a decay in (0, 1], got {error_feedback!r}")
    return float(error_feedback)


class FeedbackMixin:
    """The state meprop layers share: ``last_k`` (the ``k`` of the last backward) and, with error feedback,
    the ``feedback`` buffer (the dropped columns' accumulated scores ``(width,)``; empty until the first backward)."""

    def _init_feedback(self, error_feedback, device=None, dtype=None) -> None:
        self.last_k = None
        self.error_feedback = error_feedback is not False and error_feedback is not None
        where = f"{getattr(self, '_where', 'meprop')}: error_feedback"
        self.feedback_decay = feedback_decay(error_feedback, where) if self.error_feedback else None
        if self.error_feedback:
            self.register_buffer("feedback", torch.zeros(0, device=device, dtype=dtype))

    def _feedback_memory(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The memory as the selection takes it: ``(width,)`` of the scores' ``dtype`` (zeros while empty)."""
        memory = self.feedback
        if memory.shape[0] != width:
            return torch.zeros(width, device=memory.device, dtype=dtype)
        return memory if memory.dtype == dtype else memory.to(dtype)

    def _feedback_select(self, scores: torch.Tensor, k, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept, next_memory)`` for ``scores (width,)`` with error feedback (:func:`feedback_select`) from the
        layer's memory; :meth:`_record_selection` stores the next memory."""
        return feedback_select(scores, self._feedback_memory(scores.shape[0], scores.dtype), k, self.feedback_decay,
                               where)

    def _record_selection(self, k: int, memory: torch.Tensor | None = None) -> None:
        """Stores a backward's ``k`` in ``last_k`` and, with error feedback, the next ``memory`` in the buffer,
        past ``nn.Module.__setattr__`` (its lookups cost microseconds per layer and step)."""
        self.__dict__["last_k"] = k
        if memory is not None:
            self._buffers["feedback"] = memory

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if getattr(self, "error_feedback", False):
            key = prefix + "feedback"
            if key in state_dict:  # (width,), or empty when saved before the first backward
                self.feedback = torch.empty_like(state_dict[key], device=self.feedback.device)
            else:  # a plain layer's state dict: start with an empty memory
                self.feedback = self.feedback.new_zeros(0)
                state_dict = {**state_dict, key: self.feedback}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
