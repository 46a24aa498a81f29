"""``meprop.Linear``, a drop-in ``nn.Linear`` with a top-k sparsified backward, and ``meprop.convert``."""

from __future__ import annotations

import torch
from torch import nn

from . import distributed, functional, selection

__all__ = ["Linear", "convert"]


class Linear(selection.FeedbackMixin, nn.Linear):
    """``nn.Linear`` whose backward keeps only ``k`` output-gradient entries (see :mod:`meprop.functional`).

    Same parameters, initialisation, forward and ``state_dict`` as ``nn.Linear``; inputs of shape
    ``(..., in_features)``.

    Args:
        k: kept entries (int >= 1, or a ratio in (0, 1]); ``k >= out_features`` or None: dense backward; or a
            :class:`meprop.Adaptive` (unified mode; the ``k`` of the last backward is ``last_k``).
        mode: ``"unified"`` (default), ``"per_example"``, ``"random_unified"`` or ``"random_per_example"``.
        backend: None (automatic) or one of ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``.
        sparse_grad: the weight gradient is a sparse COO tensor of the touched rows only.
        generator: random source for the random modes.
        sync_selection: under data parallelism, select the same ``k`` columns on every rank from the scores
            summed over the process group, so that DDP's averaged gradient is the single-process meProp gradient
            of the global batch (unified modes; see :mod:`meprop.distributed`). Eager mode only.
        process_group: the group sharing the selection (None: the default group); with ``sync_selection`` only.
        error_feedback: carry the dropped columns of ``dy`` into the next step's selection and update (unified
            mode; the memory is the ``feedback`` buffer, see :mod:`meprop.selection`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        k,
        mode: str = "unified",
        backend: str | None = None,
        sparse_grad: bool = False,
        generator: torch.Generator | None = None,
        sync_selection: bool = False,
        process_group=None,
        error_feedback: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_feedback(error_feedback, device, dtype)
        self._mode = "unified"
        self.k = k
        self.mode = mode
        self.backend = backend
        self.sparse_grad = sparse_grad
        self.generator = generator
        if process_group is not None and not sync_selection:
            raise ValueError(f"{self._where}: process_group is used with sync_selection=True only")
        # The synchronised selection's state (meprop.distributed.SyncSelection), or None.
        self.selection_sync = distributed.SyncSelection(process_group, self._where) if sync_selection else None
        if sync_selection and self._controlled:
            raise ValueError(f"{self._where}: sync_selection does not combine with an Adaptive k or error_feedback")

    @property
    def _where(self) -> str:
        return f"meprop.Linear({self.in_features}, {self.out_features})"

    @property
    def k(self):
        """Kept entries as given (int, ratio or None); checked when set."""
        return self._k

    @k.setter
    def k(self, value) -> None:
        self._resolved = (self.out_features, selection.resolve(value, self.out_features, self._where))
        self._k = value
        self._check_controlled()

    @property
    def _controlled(self) -> bool:
        """Whether the selection is the controlled one (an Adaptive k or error feedback)."""
        return isinstance(self._k, selection.Adaptive) or self.error_feedback

    def _check_controlled(self) -> None:
        if self._controlled and self._mode != "unified":
            raise ValueError(f"{self._where}: an Adaptive k and error_feedback need mode='unified', got {self._mode!r}")

    def _resolved_k(self) -> int | None:
        """``k`` as an int for the current ``out_features`` (which meSimp's pruning changes), or None."""
        if self._resolved[0] != self.out_features:
            self.k = self._k
        return self._resolved[1]

    @property
    def mode(self) -> str:
        """One of :data:`meprop.functional.MODES`; checked when set."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        functional.check_options(value, None, self._where)
        self._mode = value
        self._check_controlled()

    @property
    def backend(self) -> str | None:
        """None (automatic) or a name of :data:`meprop.backends.BACKENDS`; checked when set."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        functional.check_options("unified", value, self._where)
        self._backend = value

    @property
    def sync_selection(self) -> bool:
        """Whether the selection is synchronised over a process group (set at construction)."""
        return self.selection_sync is not None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> Linear:
        """A meprop.Linear sharing ``linear``'s parameter objects (so existing optimizers keep working)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **options)
        layer.weight = linear.weight
        layer.bias = linear.bias
        if layer.error_feedback:
            layer.feedback = torch.zeros(0, device=linear.weight.device, dtype=linear.weight.dtype)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._controlled:
            k = self._resolved_k()
            return functional.controlled_linear(
                input, self.weight, self.bias, k, self._backend, self.sparse_grad, self._where, self
            )
        return functional.sparse_linear(
            input,
            self.weight,
            self.bias,
            self._resolved_k(),
            self._mode,
            self._backend,
            self.sparse_grad,
            self.generator,
            self._where,
            self.selection_sync,
        )

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, k={self.k}, mode={self.mode!r}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        if self.sparse_grad:
            text += ", sparse_grad=True"
        if self.sync_selection:
            text += ", sync_selection=True"
        if self.error_feedback:
            text += ", error_feedback=True"
        return text


def convert(module: nn.Module, *, k, mode: str = "unified", skip_last: bool = False, **options) -> nn.Module:
    """Replace every ``nn.Linear`` in ``module`` (itself included) with a :class:`Linear` sharing its parameters.

    Only modules whose type is exactly ``nn.Linear`` are replaced (subclasses such as attention's
    ``out_proj``, whose weights their owner uses directly, are left alone). With ``skip_last`` the last
    ``nn.Linear`` in ``module.named_modules()`` order (usually the output layer) stays dense. ``options``
    (``backend``, ``sparse_grad``, ``generator``, ``sync_selection``, ``process_group``) are passed to
    :class:`Linear`. Returns the converted module
    (a new object only when ``module`` itself is an ``nn.Linear``).
    """
    targets = [name for name, m in module.named_modules() if type(m) is nn.Linear]
    if skip_last and targets:
        targets.pop()
    for name in targets:
        old = module.get_submodule(name)
        new = Linear.from_linear(old, k=k, mode=mode, **options)
        new.train(old.training)
        if name == "":
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, new)
    return module
