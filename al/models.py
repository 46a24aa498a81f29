"""Associated Learning models (ALMLP, ALCNN, ALLSTM, ALTransformer) and backprop baselines on the same encoders.

An :class:`ALModel` is a stack of :class:`~al.components.Component`; its ``forward`` is the shortcut
inference ``x -> f_1 ... f_L -> b_L -> h_L ... h_1 -> class scores`` and :meth:`ALModel.early_exit` stops at
the first component whose prediction is confident. :class:`BackpropModel` runs the same encoders followed by
a linear classifier, trained end to end.

Inputs: vision models take images ``(N, C, H, W)``; text models take token ids ``(N, L)`` with a boolean
``mask (N, L)`` (True = real token; every row needs at least one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .components import Component, ComponentStep, train_components
from .encoders import (
    cnn_encoders,
    lstm_encoders,
    mlp_encoders,
    seed_lstm_encoders,
    seed_transformer_encoders,
    transformer_encoders,
)

__all__ = [
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
    "ARCHS",
    "build_model",
    "prediction_entropy",
]


ACTIVATIONS = {"elu": nn.ELU, "tanh": nn.Tanh}


class Bridge(nn.Module):
    """b: pooled x-path features -> label space, ``act(Linear(pool(s, mask)))``, ``(N, label_dim)``."""

    def __init__(self, pool: nn.Module, in_features: int, label_dim: int, activation: str = "elu"):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(in_features, label_dim)
        self.act = ACTIVATIONS[activation]()

    def forward(self, s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.act(self.linear(self.pool(s, mask)))


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits)``, ``(N, C) -> (N,)``."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


class ALModel(nn.Module):
    """A stack of AL components over the given x-path encoders.

    Args:
        encoders: one x-path encoder per component, called as ``encoder(s, mask)``.
        feature_dims: ``pool(encoder output)`` size of each encoder.
        pool: class of the pooling module used by each bridge, or a list of such classes (one per component).
        num_classes: C.
        label_dim: width of the label path (the seed's 128).
        activation: "elu" (compact models: g, b and the later h end in ELU) or "tanh" (the seed: g and b end
            in tanh, the later h are linear); the first h always gives linear class scores.
    """

    def __init__(self, encoders, feature_dims, pool, num_classes: int, label_dim: int = 128,
                 activation: str = "elu") -> None:
        super().__init__()
        if len(encoders) != len(feature_dims) or not encoders:
            raise ValueError("encoders and feature_dims must be non-empty and of the same length")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        pools = list(pool) if isinstance(pool, (list, tuple)) else [pool] * len(encoders)
        if len(pools) != len(encoders):
            raise ValueError(f"pool: need one per component ({len(encoders)}), got {len(pools)}")
        self.num_classes = num_classes
        act = ACTIVATIONS[activation]
        components = []
        for i, (encoder, dim, pool_class) in enumerate(zip(encoders, feature_dims, pools)):
            label_in = num_classes if i == 0 else label_dim
            label_encoder = nn.Sequential(nn.Linear(label_in, label_dim), act())
            if i == 0:
                label_decoder = nn.Linear(label_dim, num_classes)  # class scores
            elif activation == "elu":
                label_decoder = nn.Sequential(nn.Linear(label_dim, label_dim), nn.ELU())
            else:
                label_decoder = nn.Linear(label_dim, label_dim)
            bridge = Bridge(pool_class(), dim, label_dim, activation)
            components.append(Component(encoder, bridge, label_encoder, label_decoder, first=i == 0))
        self.components = nn.ModuleList(components)

    @property
    def num_components(self) -> int:
        return len(self.components)

    def make_optimizers(self, factory) -> list[torch.optim.Optimizer]:
        """One optimizer per component: ``factory(component.parameters())``."""
        return [factory(component.parameters()) for component in self.components]

    def make_adam(self, lr: float, autoencoder_lr: float | None = None, begin: int = 0, end: int | None = None):
        """One Adam per component ``[begin, end)``: x-path at ``lr``, label autoencoder at ``autoencoder_lr``
        (default ``lr``); what ``al.train`` and every ``al.pipeline`` stage use."""
        return [torch.optim.Adam(c.param_groups(lr, autoencoder_lr)) for c in self.components[begin:end]]

    def local_steps(self, x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None):
        """Yields each component's :class:`ComponentStep` in order (training pass, losses not yet used)."""
        s = x
        t = F.one_hot(labels, self.num_classes).float()
        for component in self.components:
            step = component(s, t, labels, mask)
            yield step
            s, t = step.s, step.t

    def train_step(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        optimizers,
        mask: torch.Tensor | None = None,
        clip: float | None = None,
        amp_dtype: torch.dtype | None = None,
        scaler=None,
    ) -> list[tuple[float, float]]:
        """One local update of every component, each by its own optimizer (:func:`al.components.train_components`:
        gradient norm clipped to ``clip`` per component if given, optional autocast); returns
        ``[(associated, autoencoder), ...]`` loss values."""
        t = F.one_hot(labels, self.num_classes).float()
        _, _, values = train_components(self.components, optimizers, x, t, labels, mask, clip, amp_dtype, scaler)
        return list(zip(values[0::2], values[1::2]))

    def decode(self, t: torch.Tensor, depth: int) -> torch.Tensor:
        """``h_1(... h_depth(t))``: label-space ``(N, label_dim)`` -> class scores ``(N, C)``."""
        for component in reversed(self.components[:depth]):
            t = component.label_decoder(t)
        return t

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Shortcut inference through all components: class scores ``(N, C)``."""
        s = x
        for component in self.components:
            s = component.encoder(s, mask)
        return self.decode(self.components[-1].bridge(s, mask), self.num_components)

    def early_exit(
        self, x: torch.Tensor, threshold: float, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adaptive inference: each example stops at the first component whose prediction entropy (nats) is
        below ``threshold`` (the last component always answers).

        Returns class scores ``(N, C)`` and the depth used per example ``(N,)`` int64 in ``[1, L]``; only the
        examples still running are carried into deeper components.
        """
        n = x.shape[0]
        logits = torch.empty(n, self.num_classes, device=x.device)
        depth = torch.empty(n, dtype=torch.long, device=x.device)
        active = torch.arange(n, device=x.device)
        s = x
        for i, component in enumerate(self.components):
            s = component.encoder(s, mask)
            scores = self.decode(component.bridge(s, mask), i + 1)
            if i + 1 == self.num_components:
                done = torch.ones(active.shape[0], dtype=torch.bool, device=x.device)
            else:
                done = prediction_entropy(scores) < threshold
            logits[active[done]] = scores[done].to(logits.dtype)
            depth[active[done]] = i + 1
            keep = ~done
            active, s = active[keep], s[keep]
            mask = None if mask is None else mask[keep]
            if active.numel() == 0:
                break
        return logits, depth


class BackpropModel(nn.Module):
    """The same encoders followed by ``Linear(pool(s_L))``, trained end to end by backprop."""

    def __init__(self, encoders, feature_dims, pool, num_classes: int) -> None:
        super().__init__()
        if len(encoders) != len(feature_dims) or not encoders:
            raise ValueError("encoders and feature_dims must be non-empty and of the same length")
        self.num_classes = num_classes
        self.encoders = nn.ModuleList(encoders)
        self.pool = (pool[-1] if isinstance(pool, (list, tuple)) else pool)()
        self.classifier = nn.Linear(feature_dims[-1], num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = x
        for encoder in self.encoders:
            s = encoder(s, mask)
        return self.classifier(self.pool(s, mask))


class ALMLP(ALModel):
    """AL fully connected network (NECO 2021); ``hidden`` units per component."""

    def __init__(self, in_features=784, hidden=256, num_components=3, num_classes=10, label_dim=128):
        super().__init__(*mlp_encoders(in_features, hidden, num_components), num_classes, label_dim)


class ALCNN(ALModel):
    """AL convolutional network (NECO 2021); one conv block per entry of ``channels``."""

    def __init__(self, in_channels=1, image_size=28, channels=(16, 32, 64), num_classes=10, label_dim=128):
        super().__init__(*cnn_encoders(in_channels, image_size, channels), num_classes, label_dim)


class ALLSTM(ALModel):
    """AL bidirectional LSTM text classifier (ICLR 2022); ``vectors``: optional ``(vocab, embedding_dim)``."""

    def __init__(self, vocab_size, num_classes, embedding_dim=50, hidden=128, num_components=2, vectors=None,
                 dropout=0.2, label_dim=128):
        encoders = lstm_encoders(vocab_size, embedding_dim, hidden, num_components, vectors, dropout)
        super().__init__(*encoders, num_classes, label_dim)


class ALTransformer(ALModel):
    """AL Transformer-encoder text classifier (ICLR 2022); one encoder layer per component."""

    def __init__(self, vocab_size, num_classes, embedding_dim=50, d_model=128, nhead=4, feedforward=256,
                 num_components=2, max_len=128, vectors=None, dropout=0.1, label_dim=128):
        encoders = transformer_encoders(
            vocab_size, embedding_dim, d_model, nhead, feedforward, num_components, max_len, vectors, dropout
        )
        super().__init__(*encoders, num_classes, label_dim)


class BPMLP(BackpropModel):
    def __init__(self, in_features=784, hidden=256, num_components=3, num_classes=10):
        super().__init__(*mlp_encoders(in_features, hidden, num_components), num_classes)


class BPCNN(BackpropModel):
    def __init__(self, in_channels=1, image_size=28, channels=(16, 32, 64), num_classes=10):
        super().__init__(*cnn_encoders(in_channels, image_size, channels), num_classes)


class BPLSTM(BackpropModel):
    def __init__(self, vocab_size, num_classes, embedding_dim=50, hidden=128, num_components=2, vectors=None,
                 dropout=0.2):
        super().__init__(*lstm_encoders(vocab_size, embedding_dim, hidden, num_components, vectors, dropout),
                         num_classes)


class BPTransformer(BackpropModel):
    def __init__(self, vocab_size, num_classes, embedding_dim=50, d_model=128, nhead=4, feedforward=256,
                 num_components=2, max_len=128, vectors=None, dropout=0.1):
        encoders = transformer_encoders(
            vocab_size, embedding_dim, d_model, nhead, feedforward, num_components, max_len, vectors, dropout
        )
        super().__init__(*encoders, num_classes)


class ALSeedLSTM(ALModel):
    """The seed's AL LSTM text classifier (``--arch seed``): an embedding component with its own label
    autoencoder, then ``num_components - 1`` BiLSTM components (``hidden`` = the seed's l1_dim per direction),
    each starting from the previous one's final state; bridges ``tanh(Linear(h_fwd + h_bwd))`` (the embedding's:
    over the masked mean of the vectors); label path ``tanh`` encoders, linear decoders."""

    def __init__(self, vocab_size, num_classes, embedding_dim=300, hidden=128, num_components=3, vectors=None,
                 dropout=0.3, label_dim=128):
        encoders = seed_lstm_encoders(vocab_size, embedding_dim, hidden, num_components, vectors, dropout)
        super().__init__(*encoders, num_classes, label_dim, activation="tanh")


class ALSeedTransformer(ALModel):
    """The seed's AL Transformer text classifier (``--arch seed``): an embedding component, then
    ``num_components - 1`` pre-norm Transformer encoder components with d_model = ``embedding_dim`` (300),
    d_ff = ``feedforward`` (the seed's l1_dim, 256), ``nhead`` heads (4) and no positional encoding; bridges
    ``tanh(Linear(masked mean))``."""

    def __init__(self, vocab_size, num_classes, embedding_dim=300, nhead=4, feedforward=256, num_components=3,
                 vectors=None, dropout=0.1, label_dim=128):
        encoders = seed_transformer_encoders(vocab_size, embedding_dim, nhead, feedforward, num_components, vectors,
                                             dropout)
        super().__init__(*encoders, num_classes, label_dim, activation="tanh")


class BPSeedLSTM(BackpropModel):
    """:class:`ALSeedLSTM`'s encoders with ``Linear(h_fwd + h_bwd)`` class scores, trained by backprop."""

    def __init__(self, vocab_size, num_classes, embedding_dim=300, hidden=128, num_components=3, vectors=None,
                 dropout=0.3):
        super().__init__(*seed_lstm_encoders(vocab_size, embedding_dim, hidden, num_components, vectors, dropout),
                         num_classes)


class BPSeedTransformer(BackpropModel):
    """:class:`ALSeedTransformer`'s encoders with ``Linear(masked mean)`` class scores, trained by backprop."""

    def __init__(self, vocab_size, num_classes, embedding_dim=300, nhead=4, feedforward=256, num_components=3,
                 vectors=None, dropout=0.1):
        encoders = seed_transformer_encoders(vocab_size, embedding_dim, nhead, feedforward, num_components, vectors,
                                             dropout)
        super().__init__(*encoders, num_classes)


ARCHS = ("compact", "seed")

_SEED_CLASSES = {
    ("lstm", "al"): ALSeedLSTM,
    ("transformer", "al"): ALSeedTransformer,
    ("lstm", "bp"): BPSeedLSTM,
    ("transformer", "bp"): BPSeedTransformer,
}

_CLASSES = {
    ("mlp", "al"): ALMLP,
    ("cnn", "al"): ALCNN,
    ("lstm", "al"): ALLSTM,
    ("transformer", "al"): ALTransformer,
    ("mlp", "bp"): BPMLP,
    ("cnn", "bp"): BPCNN,
    ("lstm", "bp"): BPLSTM,
    ("transformer", "bp"): BPTransformer,
}


def build_model(model: str, method: str, *, arch: str = "compact", k=None, k_mode: str = "unified",
                **options) -> nn.Module:
    """The ``model`` (mlp, cnn, lstm, transformer) trained by ``method`` (al, bp); ``options`` go to its class.

    ``arch``: "compact" (the default: this project's models) or "seed" (the seed's text models,
    :class:`ALSeedLSTM` / :class:`ALSeedTransformer` and their backprop versions; text models only).

    With ``k`` every exactly-``nn.Linear`` layer becomes a ``meprop.Linear`` keeping ``k`` gradient entries
    (layers with ``out_features <= k`` stay exact) and every ``nn.LSTM`` a ``meprop.LSTM`` (``k`` per gate);
    attention's internal projections stay dense.
    """
    if (model, method) not in _CLASSES:
        raise ValueError(
            f"model must be one of mlp, cnn, lstm, transformer and method one of al, bp; got {model!r}, {method!r}"
        )
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if arch == "seed":
        if (model, method) not in _SEED_CLASSES:
            raise ValueError(f"arch 'seed' has text models only (lstm, transformer), got {model!r}")
        net = _SEED_CLASSES[model, method](**options)
    else:
        net = _CLASSES[model, method](**options)
    if k is not None:
        import meprop

        net = meprop.convert(net, k=k, mode=k_mode, lstm=True)
    return net
