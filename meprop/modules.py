"""``meprop.Linear``, a drop-in ``nn.Linear`` with a top-k sparsified backward, and ``meprop.convert``
(Linear, Conv2d and Hugging Face Conv1D layers, chosen by name pattern)."""

from __future__ import annotations

import logging
import numbers
import re
import sys
from typing import Callable

import torch
from torch import nn

from . import distributed, functional, selection
from .lstm import LSTM

__all__ = ["Linear", "convert", "converted"]

log = logging.getLogger("meprop")


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
        error_feedback: carry the dropped columns' scores into the next step's selection (unified mode; True
            or a memory decay in (0, 1]; the memory is the ``feedback`` buffer, see :mod:`meprop.selection`).
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
        error_feedback: bool | float = False,
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
            text += f", error_feedback={self.feedback_decay}"
        return text


class _HFConv1D(selection.FeedbackMixin):
    """meProp's version of Hugging Face's ``Conv1D`` (GPT-2 family): ``y = x W + b`` with ``W (in, out)``.

    Built by :func:`convert` as a subclass of ``transformers.pytorch_utils.Conv1D`` (same parameters, layout,
    ``state_dict`` and ``isinstance``); the backward is :class:`Linear`'s on the view ``W^T``. Inputs
    ``(..., in)``; options as :class:`Linear` (``k``, ``mode``, ``backend``, ``sparse_grad``, ``generator``,
    ``error_feedback``)."""

    @classmethod
    def from_conv1d(cls, conv, *, k, mode="unified", backend=None, sparse_grad=False, generator=None,
                    error_feedback=False):
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.nf, layer.nx = conv.nf, conv.weight.shape[0]
        layer.weight, layer.bias = conv.weight, conv.bias
        layer._init_feedback(error_feedback, conv.weight.device, conv.weight.dtype)
        where = f"meprop Conv1D({layer.nx}, {layer.nf})"
        functional.check_options(mode, backend, where)
        layer._where, layer.mode, layer.backend = where, mode, backend
        layer.sparse_grad, layer.generator, layer.k = sparse_grad, generator, k
        layer._resolved = selection.resolve(k, layer.nf, where)
        if (isinstance(k, selection.Adaptive) or error_feedback) and mode != "unified":
            raise ValueError(f"{where}: an Adaptive k and error_feedback need mode='unified', got {mode!r}")
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t()
        if isinstance(self._resolved, selection.Adaptive) or self.error_feedback:
            return functional.controlled_linear(
                x, weight, self.bias, self._resolved, self.backend, self.sparse_grad, self._where, self
            )
        return functional.sparse_linear(
            x, weight, self.bias, self._resolved, self.mode, self.backend, self.sparse_grad, self.generator,
            self._where,
        )

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, k={self.k}, mode={self.mode!r}"


_HF_CONV1D: dict[type, type] = {}


def _hf_conv1d(base: type) -> type:
    """The meProp subclass of Hugging Face's ``Conv1D`` class ``base`` (made once)."""
    if base not in _HF_CONV1D:
        _HF_CONV1D[base] = type("Conv1D", (_HFConv1D, base), {"__module__": __name__, "__doc__": _HFConv1D.__doc__})
    return _HF_CONV1D[base]


def _converters(lstm: bool) -> dict[type, tuple[str, Callable]]:
    """Module type (exact) -> (its name in messages, a factory ``(module, **options) -> meProp module``).

    One more module type is one more entry here; ``nn.LSTM`` only when ``lstm``."""
    from .conv import Conv2d

    table = {nn.Linear: ("Linear", Linear.from_linear), nn.Conv2d: ("Conv2d", Conv2d.from_conv)}
    if lstm:
        table[nn.LSTM] = ("LSTM", LSTM.from_lstm)
    hf = sys.modules.get("transformers.pytorch_utils")  # only when transformers is in use (never imported here)
    if hf is not None and hasattr(hf, "Conv1D"):
        table[hf.Conv1D] = ("Conv1D", lambda m, **o: _hf_conv1d(hf.Conv1D).from_conv1d(m, **o))
    return table


# The options each converted type takes (besides k and mode); others are refused with the layer's name.
_OPTIONS = {
    "Linear": {"backend", "sparse_grad", "generator", "sync_selection", "process_group", "error_feedback"},
    "Conv2d": {"backend", "generator", "error_feedback"},
    "Conv1D": {"backend", "sparse_grad", "generator", "error_feedback"},
    "LSTM": {"backend", "generator"},
}


def _width(kind: str, module: nn.Module) -> int:
    """The number of entries ``k`` selects from: output features / channels, or an LSTM gate's width."""
    if kind == "LSTM":
        return module.hidden_size
    return module.weight.shape[1] if kind == "Conv1D" else module.weight.shape[0]


def _matcher(patterns, argument: str):
    """PEFT-style patterns: a str is a regular expression the full module name must match; a list of str
    matches a name equal to an entry or ending with ``"." + entry``. Returns ``(match(name), entries)``."""
    if isinstance(patterns, str):
        regex = re.compile(patterns)
        return (lambda name: regex.fullmatch(name) is not None), [patterns]
    if not isinstance(patterns, (list, tuple, set)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"meprop.convert: {argument} must be a str (regular expression) or a list of str")
    entries = list(patterns)
    return (lambda name: any(name == p or name.endswith("." + p) for p in entries)), entries


def _check_patterns(names, patterns, argument: str) -> None:
    if patterns is None:
        return
    match, entries = _matcher(patterns, argument)
    for entry in entries:
        if not any(_matcher(entry if isinstance(patterns, str) else [entry], argument)[0](n) for n in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"meprop.convert: {argument} entry {entry!r} matches no convertible module (convertible: {sample})"
            )


def convert(
    module: nn.Module,
    *,
    k,
    mode: str = "unified",
    skip_last: bool = False,
    target_modules=None,
    exclude_modules=None,
    lstm: bool = False,
    **options,
) -> nn.Module:
    """Replace the ``nn.Linear``, ``nn.Conv2d`` and Hugging Face ``Conv1D`` layers of ``module`` (itself included)
    with meProp layers sharing their parameters (:class:`Linear`, :class:`meprop.Conv2d`, a ``Conv1D`` subclass).

    Only modules of exactly those types are replaced (subclasses such as attention's ``out_proj``, whose
    weights their owner uses directly, are left alone). ``target_modules`` / ``exclude_modules`` choose by
    name as PEFT does: a str is a regular expression the full name must match, a list of str matches names
    equal to an entry or ending with ``"." + entry``; an entry that matches no convertible module is a
    ValueError. With ``skip_last`` the last candidate in ``module.named_modules()`` order (usually the output
    layer) stays dense. With ``lstm`` every exactly-``nn.LSTM`` module becomes a :class:`meprop.LSTM` too (``k``
    counted per gate, options ``backend`` and ``generator``). ``k`` (int, ratio or :class:`meprop.Adaptive`) and ``mode`` apply to every layer; an int
    ``k`` not smaller than a layer's width leaves it dense, except for layers chosen by ``target_modules``
    (then a ValueError). ``options`` are passed to the layers (``backend``, ``generator``, ``error_feedback``;
    Linear / Conv1D also ``sparse_grad``; Linear also ``sync_selection``, ``process_group``); an option a chosen
    layer does not take is a ValueError. Each replacement is logged (logger ``"meprop"``, INFO);
    :func:`converted` lists them. Returns the converted module (a new object only when ``module`` itself is
    replaced).

    Hugging Face round trip: the meProp layers keep the ``state_dict`` keys, so ``save_pretrained`` writes an
    ordinary checkpoint; ``from_pretrained`` gives back plain layers, and one line converts again:
    ``model = meprop.convert(AutoModel.from_pretrained(path), k=..., target_modules=[...])``.
    """
    table = _converters(lstm)
    candidates = [(name, m) for name, m in module.named_modules() if type(m) in table]
    names = [name for name, _ in candidates]
    _check_patterns(names, target_modules, "target_modules")
    _check_patterns(names, exclude_modules, "exclude_modules")
    chosen = _matcher(target_modules, "target_modules")[0] if target_modules is not None else None
    excluded = _matcher(exclude_modules, "exclude_modules")[0] if exclude_modules is not None else (lambda n: False)
    targets = [(name, m) for name, m in candidates if (chosen is None or chosen(name)) and not excluded(name)]
    if skip_last and targets:
        targets.pop()
    for name, old in targets:
        kind, factory = table[type(old)]
        where = f"meprop.convert: {kind} {name or '(the module itself)'}"
        unknown = sorted(set(options) - _OPTIONS[kind])
        if unknown:
            raise ValueError(f"{where}: option(s) {unknown} do not apply to {kind} layers (exclude_modules skips it)")
        width = _width(kind, old)
        if isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= width:
            if chosen is not None:
                raise ValueError(f"{where}: k={k} is not smaller than its {width} outputs")
            log.info("%s: k=%s >= its %d outputs, left dense", where, k, width)
            continue
        if kind == "Conv2d" and old.groups != 1:
            if chosen is not None:
                raise ValueError(f"{where}: groups={old.groups} is not supported by meprop.Conv2d (groups=1 only)")
            log.info("%s: groups=%d, left dense", where, old.groups)
            continue
        try:
            new = factory(old, k=k, mode=mode, **options)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        new.train(old.training)
        log.info("%s -> meProp (k=%s, mode=%s)", where, k, mode)
        if name == "":
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, new)
    return module


def converted(module: nn.Module) -> dict[str, str]:
    """The meProp layers in ``module``: ``{name: "Linear" | "Conv2d" | "Conv1D" | ...}`` in module order."""
    from .conv import Conv2d

    kinds = ((Linear, "Linear"), (Conv2d, "Conv2d"), (_HFConv1D, "Conv1D"))
    out = {}
    for name, m in module.named_modules():
        kind = next((label for cls, label in kinds if isinstance(m, cls)), None)
        if kind is not None:
            out[name] = kind
    return out
