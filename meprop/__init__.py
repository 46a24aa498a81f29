"""meprop: sparse backpropagation (meProp, Sun et al., ICML 2017) for PyTorch.

``meprop.Linear`` is a drop-in ``nn.Linear`` whose backward keeps only the top-k entries of the output
gradient; ``meprop.Conv2d`` does the same for convolutions (by output channel); ``meprop.LSTM`` is a drop-in
``nn.LSTM`` whose BPTT keeps the top-k gate-gradient entries of every step; ``meprop.convert`` swaps them into
an existing model; ``meprop.Adaptive`` chooses ``k`` per step; ``meprop.functional.linear`` is the function.
The ops (defined once in ``meprop.opdefs``) run on fused C++ (CPU), CUDA or Triton kernels, all checked against
``meprop.reference``; ``meprop.backends`` says which backend can run what. ``meprop.optim`` keeps the
optimizer step sparse too; ``meprop.distributed`` makes DDP training select for the global batch and
all-reduce only the kept rows; ``meprop.mnist`` is the paper's MNIST experiment (import it explicitly).
"""

import warnings

from . import backends, conv, distributed, functional, opdefs, ops, optim, reference, selection
from .conv import Conv2d
from .functional import MODES, linear_backward
from .lstm import LSTM
from .modules import Linear, convert, converted
from .selection import Adaptive

__all__ = [
    "Linear",
    "LSTM",
    "Conv2d",
    "Adaptive",
    "convert",
    "converted",
    "conv",
    "selection",
    "functional",
    "backends",
    "distributed",
    "opdefs",
    "reference",
    "ops",
    "optim",
    "MODES",
    "linear_backward",
]
__version__ = "0.1.0"

if ops.EXTENSION_ERROR is not None:
    warnings.warn(
        f"meprop: the C++ extension could not be loaded ({ops.EXTENSION_ERROR}); "
        "every backend falls back to the pure-PyTorch reference path",
        RuntimeWarning,
        stacklevel=2,
    )
