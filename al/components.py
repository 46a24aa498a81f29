"""One Associated Learning component: an x-path encoder f with bridge b, and a label-path autoencoder g/h.

For component i with x-path input ``s_prev`` and label-path input ``t_prev`` (``t_0`` = one-hot label):

- ``s = f(s_prev.detach())``, ``t = g(t_prev.detach())``;
- associated loss ``mean((b(s) - t.detach())**2)`` (trains f and b);
- autoencoder loss: ``cross_entropy(h(t), label)`` for the first component, ``mean((h(t) - t_prev)**2)``
  after it (trains g and h).

Only detached tensors leave a component, so each component's losses reach its own parameters and nothing
else: components can be stepped one after the other with one optimizer each, or in separate processes.
"""

from __future__ import annotations

from typing import NamedTuple

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Component", "ComponentStep", "Unmasked", "MaskedMeanPool", "FlattenPool", "train_components"]


class ComponentStep(NamedTuple):
    """What one component's training pass yields: detached outputs for the next component, its two losses."""

    s: torch.Tensor
    t: torch.Tensor
    associated_loss: torch.Tensor
    autoencoder_loss: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.associated_loss + self.autoencoder_loss


class Unmasked(nn.Module):
    """Adapts a one-argument module to the ``(s, mask)`` call of x-path modules (vision: ``mask`` is None)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.module(s)


class MaskedMeanPool(nn.Module):
    """Mean over the valid positions of a sequence: ``(N, L, D), mask (N, L) bool -> (N, D)``."""

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return s.mean(dim=1)
        weights = mask.to(s.dtype).unsqueeze(-1)
        return (s * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class FlattenPool(nn.Module):
    """``(N, ...) -> (N, prod(...))``; ignores the mask."""

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return s.flatten(1)


class Component(nn.Module):
    """One AL component.

    Args:
        encoder: f, called as ``encoder(s_prev, mask)``; any output shape.
        bridge: b, called as ``bridge(s, mask)`` -> ``(N, label_dim)``.
        label_encoder: g, ``(N, label_in) -> (N, label_dim)``; ``label_in`` is the class count for the
            first component and the previous component's ``label_dim`` after it.
        label_decoder: h, ``(N, label_dim) -> (N, label_in)``; class scores (logits) for the first component.
        first: whether this is the first component (its autoencoder loss is cross-entropy against the label).
    """

    def __init__(
        self, encoder: nn.Module, bridge: nn.Module, label_encoder: nn.Module, label_decoder: nn.Module, *, first: bool
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.bridge = bridge
        self.label_encoder = label_encoder
        self.label_decoder = label_decoder
        self.first = first

    def param_groups(self, lr: float, autoencoder_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: the x-path (f, b) at ``lr``, the label autoencoder (g, h) at
        ``autoencoder_lr`` (default ``lr``); the seed trains its Transformer's autoencoders at their own rate."""
        x_path = [*self.encoder.parameters(), *self.bridge.parameters()]
        label_path = [*self.label_encoder.parameters(), *self.label_decoder.parameters()]
        return [{"params": x_path, "lr": lr}, {"params": label_path, "lr": lr if autoencoder_lr is None else autoencoder_lr}]

    def forward(
        self, s_prev: torch.Tensor, t_prev: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> ComponentStep:
        """Training pass: ``s_prev`` x-path input, ``t_prev (N, label_in)``, ``labels (N,)`` int64 class ids."""
        s = self.encoder(s_prev.detach(), mask)
        t = self.label_encoder(t_prev.detach())
        associated = F.mse_loss(self.bridge(s, mask), t.detach())
        reconstruction = self.label_decoder(t)
        if self.first:
            autoencoder = F.cross_entropy(reconstruction, labels)
        else:
            autoencoder = F.mse_loss(reconstruction, t_prev.detach())
        return ComponentStep(s.detach(), t.detach(), associated, autoencoder)


def train_components(
    components,
    optimizers,
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip: float | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler=None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The AL training step of a run of consecutive components (all of a model, or one pipeline stage's).

    Each component in turn computes its :class:`ComponentStep` on ``(s, t)`` (x-path input, label-path input
    ``(N, label_in)``), its own optimizer steps on its local loss (gradient norm clipped to ``clip`` per
    component if given) and its detached ``(s, t)`` feed the next one. ``amp_dtype`` runs the forward passes
    under ``torch.autocast`` on ``s``'s device; ``scaler`` (a ``torch.amp.GradScaler``, for float16) scales each
    local loss and is updated once at the end. Returns the last component's ``(s, t)`` and the loss values
    ``[associated_1, autoencoder_1, associated_2, ...]``.
    """
    components, optimizers = list(components), list(optimizers)
    if len(optimizers) != len(components):
        raise ValueError(f"optimizers: need {len(components)} (one per component), got {len(optimizers)}")
    autocast = (torch.autocast(s.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    values = []
    for component, optimizer in zip(components, optimizers):
        with autocast:
            step = component(s, t, labels, mask)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(step.loss).backward()
            scaler.unscale_(optimizer)
        else:
            step.loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(component.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        values += [step.associated_loss.item(), step.autoencoder_loss.item()]
        s, t = step.s, step.t
    if scaler is not None:
        scaler.update()
    return s, t, values
