"""Training CLI for the AL models and their backprop baselines.

    python -m al.train --model lstm --method al --train-file train.tsv --test-file test.tsv
    python -m al.train --model cnn --method bp --dataset mnist --epochs 2 --results out.json

``--dataset NAME`` reads ``$MEPROP_DATA/mnist`` or ``$MEPROP_DATA/text/NAME`` when present (offline) and
otherwise loads NAME through Hugging Face ``datasets`` (``--hf`` forces that). Every epoch ends with an
evaluation (validation split if there is one, else test); checkpoints (``--checkpoint``) are written
atomically after each epoch and ``--resume`` continues from one. The final test accuracy is printed and,
with ``--results FILE``, written as JSON (``test_accuracy``, a fraction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from .data import (
    HF_DATASETS,
    TextDataset,
    Vocab,
    collate_text,
    data_dir,
    load_hf_dataset,
    load_mnist,
    load_vectors,
    read_labels,
    read_tsv,
    tokenize,
    write_glue_sst2,
)
from .models import ALModel, build_model

MODELS = ("mlp", "cnn", "lstm", "transformer")
DEFAULT_COMPONENTS = {"mlp": 3, "cnn": 3, "lstm": 2, "transformer": 2}


def add_common_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Adds the model, data and optimisation options shared by ``al.train`` and ``al.pipeline``; returns the
    "training" group so that callers can add their own training options to it."""
    p.add_argument("--model", required=True, choices=MODELS)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", help=f"mnist or one of {', '.join(sorted(HF_DATASETS))}")
    data.add_argument("--train-file", help="TSV (label<TAB>text) for training")
    data.add_argument("--test-file", help="TSV for the final test")
    data.add_argument("--valid-file", help="TSV evaluated after every epoch (default: the test set)")
    data.add_argument("--labels-file", help="class names, one per line (default: labels.txt beside --train-file)")
    data.add_argument("--hf", action="store_true", help="load --dataset through Hugging Face even if local")
    data.add_argument("--train-limit", type=int, help="train on a random subset of this many examples")
    data.add_argument("--vocab-size", type=int, default=20000, help="vocabulary cap incl. <pad>, <unk>")
    data.add_argument("--max-len", type=int, default=64, help="tokens kept per text")
    data.add_argument("--embeddings", help="GloVe/fastText text file initialising the word embeddings")
    net = p.add_argument_group("model")
    net.add_argument("--components", type=int, help="number of components / encoder layers")
    net.add_argument("--hidden", type=int, help="MLP width (256) or LSTM hidden size per direction (128)")
    net.add_argument("--channels", help="CNN channels per component, comma-separated (16,32,64)")
    net.add_argument("--embedding-dim", type=int, default=50, help="without --embeddings")
    net.add_argument("--d-model", type=int, default=128)
    net.add_argument("--heads", type=int, default=4)
    net.add_argument("--feedforward", type=int, default=256)
    net.add_argument("--dropout", type=float, help="text models (LSTM 0.2, Transformer 0.1)")
    net.add_argument("--label-dim", type=int, default=128, help="AL label-path width")
    net.add_argument("--k", type=float, help="meProp: keep k gradient entries in every Linear (int, or ratio < 1)")
    net.add_argument("--k-mode", default="unified", help="meProp selection mode")
    opt = p.add_argument_group("training")
    opt.add_argument("--epochs", type=int, default=5)
    opt.add_argument("--batch-size", type=int, default=64)
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip per optimizer (0: off)")
    opt.add_argument("--seed", type=int, default=0)
    return opt


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
    if args.k is not None and args.k >= 1:
        if args.k != int(args.k):
            p.error("--k must be an integer >= 1 or a ratio in (0, 1)")
        args.k = int(args.k)
    for name in ("epochs", "batch_size", "max_len", "vocab_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m al.train", description=__doc__.split("\n\n")[0])
    opt = add_common_arguments(p)
    p.add_argument("--method", required=True, choices=("al", "bp"), help="associated learning or backprop")
    opt.add_argument("--threads", type=int, help="torch.set_num_threads")
    opt.add_argument("--exit-threshold", type=float, help="AL: also test adaptive early exit at this entropy")
    opt.add_argument("--checkpoint", help="checkpoint file written after every epoch")
    opt.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    opt.add_argument("--results", help="write a JSON summary here")
    opt.add_argument("--glue-sst2", help="write GLUE SST-2 predictions for the test set (GLUE test with --hf)")
    opt.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    check_common_arguments(p, args)
    if args.method == "bp" and args.exit_threshold is not None:
        p.error("--exit-threshold applies to --method al")
    return args


# ----------------------------------------------------------------------------------------------------- data

def _local_text_folder(name: str) -> Path | None:
    folder = data_dir() / "text" / name
    return folder if (folder / "train.tsv").exists() else None


def load_text(args):
    """``{split: (labels, texts)}`` with train, test and maybe validation, plus the class names."""
    splits = {}
    if args.train_file:
        splits["train"] = read_tsv(args.train_file)
        splits["test"] = read_tsv(args.test_file)
        if args.valid_file:
            splits["validation"] = read_tsv(args.valid_file)
        labels_file = Path(args.labels_file) if args.labels_file else Path(args.train_file).with_name("labels.txt")
        names = read_labels(labels_file) if labels_file.exists() else None
    elif not args.hf and _local_text_folder(args.dataset):
        folder = _local_text_folder(args.dataset)
        for split in ("train", "validation", "test"):
            if (folder / f"{split}.tsv").exists():
                splits[split] = read_tsv(folder / f"{split}.tsv")
        names = read_labels(folder / "labels.txt") if (folder / "labels.txt").exists() else None
    else:
        if args.dataset not in HF_DATASETS:
            raise ValueError(f"--dataset {args.dataset!r}: no local folder {data_dir() / 'text' / args.dataset} "
                             f"and not one of the Hugging Face datasets {sorted(HF_DATASETS)}")
        for split in ("train", "validation", "test"):
            if split in HF_DATASETS[args.dataset][4]:
                labels, texts, names = load_hf_dataset(args.dataset, split)
                splits[split] = (labels, texts)
    if names is None:
        names = [str(i) for i in range(1 + max(max(labels) for labels, _ in splits.values()))]
    for split, (labels, _) in splits.items():
        bad = [y for y in labels if not 0 <= y < len(names)]
        if bad:
            raise ValueError(f"{split}: label {bad[0]} outside [0, {len(names)})")
    return splits, names


def _subset(dataset, limit, seed):
    if limit is None or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, order.tolist())


def build_data(args, vocab_itos=None):
    """Datasets per split, class names, the vocabulary (text) and the embedding matrix (text, optional)."""
    if args.model in ("mlp", "cnn"):
        root = data_dir() / "mnist"
        train = TensorDataset(*load_mnist(root, "train"))
        test = TensorDataset(*load_mnist(root, "test"))
        return {"train": _subset(train, args.train_limit, args.seed), "test": test}, [str(i) for i in range(10)], None, None
    raw, names = load_text(args)
    train_labels, train_texts = raw["train"]
    if args.train_limit is not None and args.train_limit < len(train_texts):
        keep = torch.randperm(len(train_texts), generator=torch.Generator().manual_seed(args.seed))[: args.train_limit]
        train_labels = [train_labels[i] for i in keep.tolist()]
        train_texts = [train_texts[i] for i in keep.tolist()]
        raw["train"] = (train_labels, train_texts)
    if vocab_itos is not None:
        vocab = Vocab(vocab_itos)
    else:
        vocab = Vocab.build((tokenize(t)[: args.max_len] for t in train_texts), max_size=args.vocab_size)
    vectors = None
    if args.embeddings:
        vectors, found = load_vectors(args.embeddings, vocab, torch.Generator().manual_seed(args.seed))
        print(f"embeddings: {found}/{len(vocab) - 1} vocabulary words found in {args.embeddings}", file=sys.stderr)
    datasets = {split: TextDataset(texts, labels, vocab, args.max_len) for split, (labels, texts) in raw.items()}
    return datasets, names, vocab, vectors


def model_options(args, num_classes, vocab, vectors) -> dict:
    components = args.components or DEFAULT_COMPONENTS[args.model]
    options = {"num_classes": num_classes}
    if args.model == "mlp":
        options.update(hidden=args.hidden or 256, num_components=components)
    elif args.model == "cnn":
        channels = [int(c) for c in args.channels.split(",")] if args.channels else [
            min(16 * 2**i, 128) for i in range(components)]
        options.update(channels=tuple(channels))
    else:
        embedding_dim = vectors.shape[1] if vectors is not None else args.embedding_dim
        options.update(vocab_size=len(vocab), embedding_dim=embedding_dim, num_components=components,
                       vectors=vectors)
        if args.model == "lstm":
            options.update(hidden=args.hidden or 128, dropout=0.2 if args.dropout is None else args.dropout)
        else:
            options.update(d_model=args.d_model, nhead=args.heads, feedforward=args.feedforward,
                           max_len=args.max_len, dropout=0.1 if args.dropout is None else args.dropout)
    if args.method == "al":
        options["label_dim"] = args.label_dim
    return options


# ------------------------------------------------------------------------------------------------ training

def make_loader(dataset, args, shuffle, epoch=0):
    """Batches of ``dataset``; shuffled in an order fixed by ``--seed`` and ``epoch`` when ``shuffle``."""
    text = args.model in ("lstm", "transformer")
    generator = torch.Generator().manual_seed(args.seed * 100003 + epoch) if shuffle else None
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collate_text if text else None)


def unpack_batch(batch):
    """``(x, mask or None, labels)`` from a text or a vision batch."""
    if len(batch) == 3:
        return batch
    return batch[0], None, batch[1]


def _progress(iterable, args, description):
    if args.no_progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)


def train_epoch(model, optimizers, loader, args, epoch) -> dict:
    """One epoch; returns mean losses (AL: per component, associated and autoencoder)."""
    model.train()
    totals, batches = None, 0
    bar = _progress(loader, args, f"epoch {epoch}")
    for batch in bar:
        x, mask, labels = unpack_batch(batch)
        if isinstance(model, ALModel):
            values = [v for pair in model.train_step(x, labels, optimizers, mask, args.clip) for v in pair]
        else:
            optimizers[0].zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x, mask), labels)
            loss.backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizers[0].step()
            values = [loss.item()]
        totals = values if totals is None else [a + b for a, b in zip(totals, values)]
        batches += 1
        if not args.no_progress:
            bar.set_postfix(loss=f"{sum(values):.4f}")
    means = [v / max(batches, 1) for v in totals or []]
    if isinstance(model, ALModel):
        return {"associated_loss": means[0::2], "autoencoder_loss": means[1::2]}
    return {"loss": means[0] if means else float("nan")}


@torch.no_grad()
def evaluate(model, dataset, args, exit_threshold=None) -> dict:
    """Accuracy of the full (shortcut) prediction; with ``exit_threshold`` also early-exit accuracy and depth."""
    model.eval()
    correct = early_correct = depth_sum = total = 0
    predictions = []
    for batch in _progress(make_loader(dataset, args, shuffle=False), args, "eval"):
        x, mask, labels = unpack_batch(batch)
        predicted = model(x, mask).argmax(dim=1)
        predictions.append(predicted)
        correct += int((predicted == labels).sum())
        total += labels.numel()
        if exit_threshold is not None:
            logits, depth = model.early_exit(x, exit_threshold, mask)
            early_correct += int((logits.argmax(dim=1) == labels).sum())
            depth_sum += int(depth.sum())
    result = {"accuracy": correct / max(total, 1), "examples": total, "predictions": torch.cat(predictions)}
    if exit_threshold is not None:
        result["early_exit"] = {"threshold": exit_threshold, "accuracy": early_correct / max(total, 1),
                                "average_depth": depth_sum / max(total, 1)}
    return result


def save_checkpoint(path, state) -> None:
    """Atomic: written to a temporary file beside ``path``, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


ARCH_KEYS = ("model", "method", "components", "hidden", "channels", "d_model", "heads", "feedforward",
             "label_dim", "k", "k_mode", "max_len", "vocab_size", "embedding_dim")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    checkpoint = None
    if args.resume and args.checkpoint and Path(args.checkpoint).exists():
        checkpoint = torch.load(args.checkpoint, weights_only=False)
        saved = checkpoint["args"]
        changed = [key for key in ARCH_KEYS if saved.get(key) != getattr(args, key)]
        if changed:
            raise ValueError(f"--resume: {args.checkpoint} was trained with other settings: {changed}")
    datasets, names, vocab, vectors = build_data(args, checkpoint["vocab"] if checkpoint else None)
    model = build_model(args.model, args.method, k=args.k, k_mode=args.k_mode,
                        **model_options(args, len(names), vocab, vectors))
    factory = lambda params: torch.optim.Adam(params, lr=args.lr)  # noqa: E731
    optimizers = model.make_optimizers(factory) if isinstance(model, ALModel) else [factory(model.parameters())]
    history, first_epoch = [], 1
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        for optimizer, state in zip(optimizers, checkpoint["optimizers"]):
            optimizer.load_state_dict(state)
        torch.set_rng_state(checkpoint["torch_rng"])
        history, first_epoch = checkpoint["history"], checkpoint["epoch"] + 1
        print(f"resumed from {args.checkpoint} after epoch {checkpoint['epoch']}", file=sys.stderr)
    monitor = "validation" if "validation" in datasets else "test"
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.model}/{args.method}: {parameters:,} parameters, {len(datasets['train'])} training examples, "
          f"{len(names)} classes", file=sys.stderr)
    started = time.perf_counter()
    for epoch in range(first_epoch, args.epochs + 1):
        losses = train_epoch(model, optimizers, make_loader(datasets["train"], args, True, epoch), args, epoch)
        accuracy = evaluate(model, datasets[monitor], args)["accuracy"]
        history.append({"epoch": epoch, f"{monitor}_accuracy": accuracy, **losses})
        print(f"epoch {epoch}: {monitor} accuracy {accuracy:.4f}  losses {json.dumps(losses)}", file=sys.stderr)
        if args.checkpoint:
            save_checkpoint(args.checkpoint, {
                "epoch": epoch, "args": vars(args), "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in optimizers], "history": history,
                "vocab": vocab.itos if vocab else None, "torch_rng": torch.get_rng_state()})
    train_seconds = time.perf_counter() - started
    test = evaluate(model, datasets["test"], args, args.exit_threshold)
    print(f"test accuracy: {test['accuracy']:.4f} ({test['examples']} examples)")
    if "early_exit" in test:
        e = test["early_exit"]
        print(f"early exit (entropy < {e['threshold']}): accuracy {e['accuracy']:.4f}, "
              f"average depth {e['average_depth']:.3f} of {model.num_components}")
    if args.glue_sst2:
        predictions = test["predictions"]
        if args.hf and args.dataset == "sst2":
            labels, texts, _ = load_hf_dataset("sst2", "glue_test")
            glue = TextDataset(texts, labels, vocab, args.max_len)
            predictions = evaluate(model, glue, args)["predictions"]
        write_glue_sst2(args.glue_sst2, predictions.tolist())
    summary = {
        "test_accuracy": test["accuracy"],
        "test_examples": test["examples"],
        "early_exit": test.get("early_exit"),
        "history": history,
        "train_examples": len(datasets["train"]),
        "parameters": parameters,
        "train_seconds_this_session": round(train_seconds, 1),
        "args": {key: value for key, value in vars(args).items() if key not in ("results", "checkpoint")},
    }
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
