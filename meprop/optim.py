"""The whole training step sparse: optimizers for the row-sparse weight gradients of ``sparse_grad=True``.

With ``sparse_grad=True`` a meprop layer's weight gradient is a sparse COO tensor of its touched rows, and a
sparse optimizer (``torch.optim.SparseAdam``, or ``SGD`` / ``Adagrad`` without weight decay) changes only
those rows, as the paper describes. The bias and every other parameter keep dense gradients, which
``SparseAdam`` refuses: split the parameters and step each group with its own optimizer::

    sparse, dense = meprop.optim.split_parameters(model)
    optimizer = meprop.optim.SplitOptimizer(torch.optim.SparseAdam(sparse, lr=1e-3), torch.optim.Adam(dense, lr=1e-3))
    ...
    meprop.optim.clip_grad_norm_(model.parameters(), 1.0)  # torch's refuses sparse gradients
    optimizer.step()

What works with sparse gradients (torch 2.13): ``SparseAdam`` (lazy moments: a row's moments change only in
the steps that touch it), ``SGD`` (momentum too) and ``Adagrad`` without ``weight_decay``; ``Adam``,
``AdamW`` and weight decay in any optimizer raise torch's error (a decay would touch every row, so the step
would not be sparse). :func:`clip_grad_norm_` here clips sparse and dense gradients together.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["SplitOptimizer", "clip_grad_norm_", "split_parameters"]


def split_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(sparse, dense)``: the weights of the meprop layers with ``sparse_grad=True``, and every other
    parameter that requires grad (each parameter once, in ``module.parameters()`` order)."""
    from .modules import Linear

    sparse_ids = {id(m.weight) for m in module.modules() if isinstance(m, Linear) and m.sparse_grad}
    sparse, dense, seen = [], [], set()
    for p in module.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (sparse if id(p) in sparse_ids else dense).append(p)
    return sparse, dense


class SplitOptimizer:
    """Several optimizers stepped as one (e.g. ``SparseAdam`` for row-sparse weights, ``Adam`` for the rest):
    ``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` apply to each in turn."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError("meprop.optim.SplitOptimizer: give one or more torch.optim.Optimizer instances")
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        """Every optimizer's parameter groups (for learning-rate schedules)."""
        return [group for o in self.optimizers for group in o.param_groups]

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"meprop.optim.SplitOptimizer: the state holds {len(state['optimizers'])} optimizers, "
                f"this one has {len(self.optimizers)}"
            )
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sparse gradients (their stored values count once:
    a coalesced gradient holds each entry once). Returns the total norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    values = [g.coalesce()._values() if g.is_sparse else g for g in grads]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v, norm_type) for v in values]), norm_type)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        if g.is_sparse:
            if not g.is_coalesced():
                raise ValueError("meprop.optim.clip_grad_norm_: sparse gradients must be coalesced (meprop's are)")
            g._values().mul_(scale.to(g.dtype))
        else:
            g.mul_(scale.to(g.dtype))
    return total
