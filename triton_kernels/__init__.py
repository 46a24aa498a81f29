"""meprop's Triton backend (the folder ``triton_kernels/``, installed as ``meprop_triton``).

:data:`OPS` maps each op name of :data:`meprop.opdefs.OPS` to the op ``torch.ops.meprop_triton.<name>``, with
the signature and semantics of :mod:`meprop.reference` (``meprop.backends.get("triton")`` exposes them).
Each op checks its arguments inside the op, as every meprop backend does; they are registered with
``torch.library.triton_op`` where torch has it, so torch.compile traces the kernels.

Limits: :data:`DTYPES` (float32 accumulation), top-k selections with ``k <= MAX_K``; CUDA tensors, or CPU
tensors when Triton runs in its interpreter (``TRITON_INTERPRET=1`` set before triton is imported,
:data:`INTERPRETED`). Index values are checked on CPU with an exception, on CUDA with an asynchronous
device assertion (no host synchronisation).
"""

import torch

from meprop.opdefs import OP_NAMES

from . import lstm as _lstm  # noqa: F401  (registers torch.ops.meprop_triton.lstm_forward, lstm_backward)
from . import ops as _ops  # noqa: F401  (registers torch.ops.meprop_triton.*)
from ._runtime import DTYPES, INTERPRETED, MAX_K, NAMESPACE

__all__ = ["DTYPES", "INTERPRETED", "MAX_K", "OPS"]

OPS = {name: getattr(getattr(torch.ops, NAMESPACE), name).default for name in OP_NAMES}
