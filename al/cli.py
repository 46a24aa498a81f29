"""Command-line options shared by ``al.train`` and ``al.pipeline`` (argparse -> :class:`al.config.ALConfig`).

Only the two CLIs import this module; library code takes a config.
"""

from __future__ import annotations

import argparse
import sys

from .config import DEFAULT_COMPONENTS, PRESETS, preset_settings
from .data import HF_DATASETS
from .models import ARCHS

MODELS = ("mlp", "cnn", "lstm", "transformer")


def add_common_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Adds the model, data, optimisation and device options; returns the "training" group for the caller's own."""
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--arch", choices=ARCHS, default="compact",
                   help="compact (default): this project's models; seed: the seed's text models (embedding "
                        "component, BiLSTMs handing on their state, or its Transformer)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the seed's settings for this dataset (l1_dim, max_len in tokens, 300-d embeddings, "
                        "vocabulary 30k, 20 epochs...); explicit options override them; printed at start-up")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", help=f"mnist, one of {', '.join(sorted(HF_DATASETS))} (local folder "
                      "$MEPROP_DATA/text/NAME, else Hugging Face), or a path: saved HF dataset folder, GLUE SST-2 "
                      "folder, TSV folder, CSV/JSON/parquet file(s), IMDB_Dataset.csv")
    data.add_argument("--train-file", help="TSV (label<TAB>text) for training")
    data.add_argument("--test-file", help="TSV for the final test")
    data.add_argument("--valid-file", help="TSV evaluated after every epoch (default: the test set)")
    data.add_argument("--labels-file", help="class names, one per line (default: labels.txt beside --train-file)")
    data.add_argument("--hf", action="store_true", help="load --dataset through Hugging Face even if local")
    data.add_argument("--title", action="store_true", help="dbpedia_14: title + content (default: content, as the seed)")
    data.add_argument("--train-limit", type=int, help="train on a random subset of this many examples")
    data.add_argument("--valid-fraction", type=float, default=0.0,
                      help="without a validation split: hold out this share of train as one and test the "
                           "epoch with the best validation accuracy (default 0: no selection)")
    data.add_argument("--vocab-size", type=int, default=20000, help="vocabulary cap incl. <pad>, <unk>")
    data.add_argument("--max-len", type=int, default=64, help="tokens kept per text (0: all)")
    data.add_argument("--embeddings", help="GloVe/fastText text file initialising the word embeddings")
    net = p.add_argument_group("model")
    net.add_argument("--components", type=int, help="number of AL components (compact: 3 vision / 2 text; "
                     "seed: 3 = embedding + 2 encoder layers)")
    net.add_argument("--hidden", type=int, help="MLP width (256) or LSTM hidden size per direction (128)")
    net.add_argument("--channels", help="CNN channels per component, comma-separated (16,32,64)")
    net.add_argument("--embedding-dim", type=int, default=50, help="without --embeddings")
    net.add_argument("--d-model", type=int, default=128, help="compact Transformer (seed: the embedding size)")
    net.add_argument("--heads", type=int, default=4)
    net.add_argument("--feedforward", type=int, default=256, help="Transformer d_ff (the seed's l1_dim)")
    net.add_argument("--dropout", type=float, help="text models (compact LSTM 0.2, seed LSTM 0.3, Transformers 0.1)")
    net.add_argument("--label-dim", type=int, default=128, help="AL label-path width")
    net.add_argument("--k", type=float, help="meProp: keep k gradient entries in every Linear (int, or ratio < 1)")
    net.add_argument("--k-mode", default="unified", help="meProp selection mode")
    opt = p.add_argument_group("training")
    opt.add_argument("--epochs", type=int, default=5)
    opt.add_argument("--batch-size", type=int, default=64)
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--autoencoder-lr", type=float, help="AL label autoencoders' lr (default --lr)")
    opt.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip per optimizer (0: off)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return opt


def parse_with_preset(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parses ``argv``; with ``--preset`` the preset's values become the defaults (explicit options win) and
    are printed to stderr."""
    args = p.parse_args(argv)
    if args.preset:
        settings = preset_settings(args.preset, args.model, args.arch)
        p.set_defaults(**settings)
        args = p.parse_args(argv)
        used = {key: getattr(args, key) for key in settings}
        seed = PRESETS[args.preset]
        print(f"preset {args.preset} (the seed's l1_dim {seed['l1_dim']}, max_len {seed['seed_max_len_chars']} "
              f"characters -> {seed['max_len'] or 'all'} tokens): "
              + ", ".join(f"{key}={value}" for key, value in used.items()), file=sys.stderr)
    if args.max_len == 0:
        args.max_len = None
    return args


def check_common_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``p.error`` on inconsistent options from :func:`add_common_arguments`; turns an integral ``--k`` into int."""
    if (args.dataset is None) == (args.train_file is None):
        p.error("give either --dataset NAME or --train-file F (with --test-file F)")
    if args.train_file and not args.test_file:
        p.error("--train-file needs --test-file")
    vision = args.model in ("mlp", "cnn")
    if vision and args.dataset != "mnist":
        p.error(f"--model {args.model} is a vision model: use --dataset mnist")
    if not vision and args.dataset == "mnist":
        p.error(f"--model {args.model} is a text model: mnist is for mlp/cnn")
    if vision and args.arch != "compact":
        p.error(f"--arch {args.arch} has text models only (lstm, transformer)")
    if args.k is not None and args.k >= 1:
        if args.k != int(args.k):
            p.error("--k must be an integer >= 1 or a ratio in (0, 1)")
        args.k = int(args.k)
    for name in ("epochs", "batch_size", "vocab_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_len is not None and args.max_len < 1:
        p.error("--max-len must be >= 1 (0: all tokens)")
    if not 0.0 <= args.valid_fraction < 1.0:
        p.error("--valid-fraction must be in [0, 1)")
    if args.components is None:
        args.components = DEFAULT_COMPONENTS[args.arch].get(args.model)


def add_device_arguments(group) -> None:
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    group.add_argument("--amp", choices=("bf16", "fp16"), help="CUDA: mixed precision (autocast) in this dtype")
