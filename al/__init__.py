"""Associated Learning (Kao & Chen, NECO 2021; Wu et al., ICLR 2022): components trained by local losses.

``al.models`` holds ALMLP, ALCNN, ALLSTM, ALTransformer and backprop baselines on the same encoders,
``al.components`` the component, its losses and the training step, ``al.data`` text and MNIST loaders,
``al.config`` the run settings (dataclasses, the seed's presets), ``al.training`` the training loop,
``al.train`` and ``al.pipeline`` the CLIs.
"""

from .components import Component, ComponentStep
from .models import (
    ALCNN,
    ALLSTM,
    ALMLP,
    ALModel,
    ALSeedLSTM,
    ALSeedTransformer,
    ALTransformer,
    BPSeedLSTM,
    BPSeedTransformer,
    BackpropModel,
    BPCNN,
    BPLSTM,
    BPMLP,
    BPTransformer,
    build_model,
    prediction_entropy,
)

__all__ = [
    "Component",
    "ComponentStep",
    "ALModel",
    "BackpropModel",
    "ALMLP",
    "ALCNN",
    "ALLSTM",
    "ALTransformer",
    "BPMLP",
    "BPCNN",
    "BPLSTM",
    "BPTransformer",
    "ALSeedLSTM",
    "ALSeedTransformer",
    "BPSeedLSTM",
    "BPSeedTransformer",
    "build_model",
    "prediction_entropy",
]
