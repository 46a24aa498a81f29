"""meSimp (Sun et al., 2017, arXiv:1711.06528): shrink hidden layers to the neurons meProp keeps selecting.

During training every hidden :class:`meprop.Linear` counts, per output neuron, in how many examples its
top-k selection kept that neuron (per-example mode: the row's own top-k; unified mode: the batch's shared
top-k counts for every example of the batch). :meth:`Simplifier.prune` then removes the neurons kept in
fewer than ``threshold`` of the examples seen since the last prune: the layer's weight rows and bias
entries and the next linear layer's weight columns are really cut out (new, smaller parameters), and the
optimizer's per-parameter state is sliced the same way. :class:`Cycle` is the seed's schedule: training
runs in cycles of ``cycle_epochs`` epochs, pruning ``prunes_per_epoch`` times per epoch in even cycles
only, and the optimizer state is reset at the start of each cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import backends
from .functional import resolve_k
from .modules import Linear

__all__ = ["Cycle", "Simplifier"]

_COUNTED_MODES = ("unified", "per_example")


@dataclass(frozen=True)
class Cycle:
    """The seed's meSimp schedule (defaults: 5-epoch cycles, 8 prunes per epoch in even cycles)."""

    cycle_epochs: int = 5
    prunes_per_epoch: int = 8

    def __post_init__(self):
        for name in ("cycle_epochs", "prunes_per_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Cycle: {name} must be an int >= 1, got {value!r}")

    def prunes_in(self, epoch: int) -> bool:
        """Whether ``epoch`` (from 0) belongs to a pruning (even) cycle."""
        return (epoch // self.cycle_epochs) % 2 == 0

    def resets_optimizer_before(self, epoch: int) -> bool:
        """Whether a new cycle starts at ``epoch`` (> 0), so the optimizer state is reset before it."""
        return epoch > 0 and epoch % self.cycle_epochs == 0

    def prune_steps(self, steps_per_epoch: int) -> set[int]:
        """The 0-based steps of an epoch after which to prune: the ends of ``prunes_per_epoch`` equal chunks."""
        chunks = min(self.prunes_per_epoch, steps_per_epoch)
        return {math.ceil((i + 1) * steps_per_epoch / chunks) - 1 for i in range(chunks)}


class Simplifier:
    """Counts meProp's selections in the hidden layers of ``model`` and prunes rarely selected neurons.

    ``model``'s linear layers (``nn.Linear`` and subclasses, in ``named_modules`` order) must be applied one
    after another with only elementwise modules (activations, dropout) between them: every linear layer
    but the last is a hidden layer and must be a :class:`meprop.Linear` in mode ``"unified"`` or
    ``"per_example"``; the last one (the output layer) is never pruned. ``optimizer`` holds the model's
    parameters; its state is sliced on every prune.

    Args:
        threshold: a neuron kept in fewer than ``threshold * examples`` examples since the last prune is
            removed (the seed's 0.1). At least one neuron per layer always stays.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, threshold: float = 0.1) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"Simplifier: threshold must be a number in [0, 1], got {threshold!r}")
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if len(linears) < 2:
            raise ValueError("Simplifier: model needs at least one hidden linear layer before the output layer")
        for name, layer in linears[:-1]:
            if not isinstance(layer, Linear):
                raise TypeError(f"Simplifier: hidden layer {name!r} must be a meprop.Linear, got {type(layer).__name__}")
            if layer.mode not in _COUNTED_MODES:
                raise ValueError(f"Simplifier: hidden layer {name!r} has mode {layer.mode!r}; meSimp needs {_COUNTED_MODES}")
        self.model = model
        self.optimizer = optimizer
        self.threshold = float(threshold)
        self.names = [name for name, _ in linears[:-1]]
        self.pairs = [(linears[i][1], linears[i + 1][1]) for i in range(len(linears) - 1)]
        self.counts = [torch.zeros(layer.out_features, dtype=torch.int64) for layer, _ in self.pairs]
        self.examples = 0
        self._handles = [layer.register_forward_hook(self._forward_hook(i)) for i, (layer, _) in enumerate(self.pairs)]

    def hidden_sizes(self) -> list[int]:
        """The current ``out_features`` of each hidden layer."""
        return [layer.out_features for layer, _ in self.pairs]

    def remove_hooks(self) -> None:
        """Stop counting (detach the forward hooks)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward_hook(self, position: int):
        def hook(layer: Linear, inputs, output: torch.Tensor) -> None:
            if layer.training and output.requires_grad:
                output.register_hook(lambda grad: self._count(position, layer, grad))

        return hook

    def _count(self, position: int, layer: Linear, grad: torch.Tensor) -> None:
        dy = grad.detach().reshape(-1, layer.out_features)
        if position == 0:  # every example passes through the first hidden layer exactly once
            self.examples += dy.shape[0]
        counts = self.counts[position]
        k = resolve_k(layer.k, layer.out_features)
        if k is None:
            counts += dy.shape[0]
            return
        ops = backends.resolve(layer.backend, dy.device, dy.dtype, k)
        if layer.mode == "unified":
            counts[ops.topk_unified(dy, k).cpu()] += dy.shape[0]
        else:
            _, idx = ops.topk_rows(dy, k)
            counts += torch.bincount(idx.reshape(-1).cpu(), minlength=layer.out_features)

    def prune(self) -> list[int]:
        """Remove the rarely selected neurons of every hidden layer, reset the counts; returns the new sizes."""
        if self.examples > 0:
            for position, (layer, following) in enumerate(self.pairs):
                counts = self.counts[position]
                keep = (counts >= self.threshold * self.examples).nonzero().flatten()
                if keep.numel() == 0:
                    keep = counts.argmax().reshape(1)
                if keep.numel() < layer.out_features:
                    self._shrink(layer, following, keep.to(layer.weight.device))
        self.counts = [torch.zeros(layer.out_features, dtype=torch.int64) for layer, _ in self.pairs]
        self.examples = 0
        return self.hidden_sizes()

    def _shrink(self, layer: nn.Linear, following: nn.Linear, keep: torch.Tensor) -> None:
        self._replace(layer, "weight", lambda t: t.index_select(0, keep))
        if layer.bias is not None:
            self._replace(layer, "bias", lambda t: t.index_select(0, keep))
        self._replace(following, "weight", lambda t: t.index_select(1, keep))
        layer.out_features = keep.numel()
        following.in_features = keep.numel()

    def _replace(self, module: nn.Module, name: str, cut) -> None:
        """Swap ``module.<name>`` for a cut-down Parameter, in the module and in the optimizer (state cut too)."""
        old = getattr(module, name)
        new = nn.Parameter(cut(old.detach()).clone(), requires_grad=old.requires_grad)
        setattr(module, name, new)
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = self.optimizer.state.pop(old, None)
        if state is not None:
            self.optimizer.state[new] = {
                key: cut(value).clone() if torch.is_tensor(value) and value.shape == old.shape else value
                for key, value in state.items()
            }

    def state_dict(self) -> dict:
        """Counts since the last prune and the hidden sizes (to rebuild the model before loading)."""
        return {"counts": [c.clone() for c in self.counts], "examples": self.examples, "hidden_sizes": self.hidden_sizes()}

    def load_state_dict(self, state: dict) -> None:
        if state["hidden_sizes"] != self.hidden_sizes():
            raise ValueError(
                f"Simplifier.load_state_dict: saved hidden sizes {state['hidden_sizes']} != model's {self.hidden_sizes()}"
            )
        self.counts = [c.clone() for c in state["counts"]]
        self.examples = int(state["examples"])
