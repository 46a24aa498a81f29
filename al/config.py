"""Run settings below the CLIs: the :class:`ALConfig` dataclass and the seed's per-dataset presets.

``al.train`` and ``al.pipeline`` turn their command lines into a config (:class:`TrainConfig`,
:class:`PipelineConfig`) at once; everything under them (data, model building, training) reads the config.

Presets (``--preset NAME``) are the seed's per-dataset settings (its README table: l1_dim, max_len) with its
other defaults (300-d embeddings, vocabulary 30,000, batch 64, lr 1e-3, 20 epochs; banking77 300 epochs;
Transformer autoencoders at lr 5e-4). The seed's max_len counts *characters* of its cleaned text (lower-cased,
punctuation and stop words removed); here max_len counts tokens of the raw text, so a preset's ``max_len`` is
the seed's value / 3.5 (the median characters of cleaned text per raw token, measured on rotten_tomatoes
train: 3.52; emotion: 3.25), rounded: on rotten_tomatoes the seed kept 95.0% of the tokens, 29 tokens keep
95.8%. The seed's 1000 ("the longest training text") becomes None (no cut).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ALConfig", "TrainConfig", "PipelineConfig", "PRESETS", "SEED_CHARS_PER_TOKEN", "preset_settings",
           "ARCH_KEYS", "DEFAULT_COMPONENTS"]

SEED_CHARS_PER_TOKEN = 3.5
_SEED_TABLE = {  # dataset: (l1_dim, the seed's max_len in characters; 1000 = the longest training text)
    "ag_news": (300, 1000),
    "dbpedia_14": (300, 500),
    "banking77": (256, 1000),
    "emotion": (256, 200),
    "rotten_tomatoes": (256, 100),
    "yelp_review_full": (256, 400),
    "imdb": (128, 1429),
    "clinc_oos": (256, 200),  # not in the seed's table: its script defaults (l1_dim 256, max_len 200)
    "sst2": (256, 200),  # likewise
}


def _tokens(chars: int) -> int | None:
    return None if chars == 1000 else round(chars / SEED_CHARS_PER_TOKEN)


PRESETS = {
    name: {"l1_dim": l1, "seed_max_len_chars": chars, "max_len": _tokens(chars), "embedding_dim": 300,
           "vocab_size": 30000, "batch_size": 64, "lr": 1e-3, "epochs": 300 if name == "banking77" else 20,
           "label_dim": 128}
    for name, (l1, chars) in _SEED_TABLE.items()
}
DEFAULT_COMPONENTS = {"compact": {"mlp": 3, "cnn": 3, "lstm": 2, "transformer": 2},
                      "seed": {"lstm": 3, "transformer": 3}}
# Settings a checkpoint must agree on to be resumed.
ARCH_KEYS = ("model", "method", "arch", "components", "hidden", "channels", "d_model", "heads", "feedforward",
             "label_dim", "k", "k_mode", "max_len", "vocab_size", "embedding_dim")


@dataclass
class ALConfig:
    """What one AL (or backprop) run is: model, data, optimisation and device.

    ``model``: mlp, cnn (MNIST), lstm, transformer (text); ``arch``: "compact" (default) or "seed" (text);
    ``dataset``: mnist, a listed name or a path (:func:`al.data.load_text_source`); or ``train_file`` +
    ``test_file`` TSVs. ``max_len``: tokens kept per text (None: all). ``autoencoder_lr``: the label
    autoencoders' learning rate (None: ``lr``; the seed Transformer's preset: 5e-4). ``valid_fraction``: when
    the data has no validation split, hold out this share of train as one (0: evaluate on test every epoch,
    no selection). ``device``: cpu, cuda, cuda:N; ``amp``: None, "bf16" or "fp16" (CUDA only).
    """

    model: str
    method: str = "al"
    arch: str = "compact"
    dataset: str | None = None
    train_file: str | None = None
    test_file: str | None = None
    valid_file: str | None = None
    labels_file: str | None = None
    hf: bool = False
    title: bool = False
    train_limit: int | None = None
    valid_fraction: float = 0.0
    vocab_size: int = 20000
    max_len: int | None = 64
    embeddings: str | None = None
    components: int | None = None
    hidden: int | None = None
    channels: str | None = None
    embedding_dim: int = 50
    d_model: int = 128
    heads: int = 4
    feedforward: int = 256
    dropout: float | None = None
    label_dim: int = 128
    k: float | None = None
    k_mode: str = "unified"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    autoencoder_lr: float | None = None
    clip: float = 5.0
    seed: int = 0
    device: str = "cpu"
    amp: str | None = None
    no_progress: bool = False
    preset: str | None = None

    @classmethod
    def from_namespace(cls, namespace) -> ALConfig:
        """The config of an ``argparse.Namespace`` holding (at least) this class's fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(namespace).items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(ALConfig):
    """``al.train``'s extra settings: threads, early-exit threshold, checkpoint/resume, outputs."""

    threads: int | None = None
    exit_threshold: float | None = None
    checkpoint: str | None = None
    resume: bool = False
    results: str | None = None
    glue_sst2: str | None = None


@dataclass
class PipelineConfig(ALConfig):
    """``al.pipeline``'s extra settings (see its ``--help``)."""

    threads: int = 1
    max_batches: int | None = None
    no_eval: bool = False
    results: str | None = None
    save_model: str | None = None
    log_every: int = 100
    warmup_batches: int = 10
    split: str | None = None
    backend: str | None = None
    timeout: float = 120.0
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False


def preset_settings(name: str, model: str, arch: str) -> dict:
    """The config fields a preset sets for ``model`` (lstm: hidden = l1_dim; transformer: feedforward =
    l1_dim, d_model = the embedding size, 4 heads, autoencoders at lr 5e-4)."""
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {name!r}")
    p = PRESETS[name]
    settings = {key: p[key] for key in ("max_len", "embedding_dim", "vocab_size", "batch_size", "lr", "epochs",
                                        "label_dim")}
    if model == "lstm":
        settings["hidden"] = p["l1_dim"]
    elif model == "transformer":
        settings.update(feedforward=p["l1_dim"], d_model=p["embedding_dim"], heads=4, autoencoder_lr=5e-4)
    return settings
