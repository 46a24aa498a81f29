"""Associated Learning (Kao & Chen, NECO 2021; Wu et al., ICLR 2022): components trained by local losses.

``al.models`` holds ALMLP, ALCNN, ALLSTM, ALTransformer and backprop baselines on the same encoders,
``al.components`` the component and its losses, ``al.data`` text and MNIST loaders, ``al.train`` the CLI.
"""

from .components import Component, ComponentStep
from .models import (
    ALCNN,
    ALLSTM,
    ALMLP,
    ALModel,
    ALTransformer,
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
    "build_model",
    "prediction_entropy",
]
