"""Training an AL model or its backprop baseline from an :class:`al.config.ALConfig` (``al.train`` runs :func:`fit`).

Data (:func:`build_data`), the model (:func:`make_model`), its optimizers (:func:`make_optimizers`: one Adam
per AL component, label autoencoders at their own lr), batches (:func:`make_loader`, seeded per epoch),
one epoch (:func:`train_epoch`; AL through :func:`al.components.train_components`, the step ``al.pipeline``
stages use too), evaluation (:func:`evaluate`), and the whole run with per-epoch validation, selection of
the best validation epoch, atomic checkpoints and resume (:func:`fit`).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from meprop.data import save_atomic

from .config import ARCH_KEYS, ALConfig, TrainConfig
from .data import (
    TextDataset,
    Vocab,
    collate_text,
    data_dir,
    held_out_indices,
    hold_out,
    load_mnist,
    load_text_source,
    load_vectors,
    read_labels,
    read_tsv,
    tokenize,
    write_glue_sst2,
)
from .models import ALModel, build_model

__all__ = ["Data", "resolve_device", "load_text", "build_data", "model_options", "make_model", "make_optimizers",
           "make_loader", "unpack_batch", "train_epoch", "evaluate", "fit"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Data(NamedTuple):
    """Datasets per split, class names, the vocabulary and embedding matrix (text), GLUE's test sentences."""

    datasets: dict
    names: list
    vocab: Vocab | None
    vectors: torch.Tensor | None
    glue_test: TextDataset | None


def resolve_device(device: str, amp: str | None = None) -> torch.device:
    """``torch.device(device)`` after checking it can be used: a clear error when CUDA is asked for but
    unavailable (or the index does not exist), or when ``amp`` is asked for off CUDA."""
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r}: not a device (cpu, cuda or cuda:N)") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda}); use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if amp is not None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        if resolved.type != "cuda":
            raise ValueError(f"--amp {amp} needs a CUDA --device (got {device})")
    return resolved


# ----------------------------------------------------------------------------------------------------- data

def load_text(cfg: ALConfig):
    """``(splits, names, glue_test)``: ``{split: (labels, texts)}`` with train, test and maybe validation, the
    class names and GLUE's unlabelled test sentences (or None)."""
    glue_test = None
    if cfg.train_file:
        splits = {"train": read_tsv(cfg.train_file), "test": read_tsv(cfg.test_file)}
        if cfg.valid_file:
            splits["validation"] = read_tsv(cfg.valid_file)
        labels_file = Path(cfg.labels_file) if cfg.labels_file else Path(cfg.train_file).with_name("labels.txt")
        names = read_labels(labels_file) if labels_file.exists() else None
    else:
        splits, names, glue_test = load_text_source(cfg.dataset, hf=cfg.hf, title=cfg.title)
    if names is None:
        names = [str(i) for i in range(1 + max(max(labels) for labels, _ in splits.values()))]
    for split, (labels, _) in splits.items():
        bad = [y for y in labels if not 0 <= y < len(names)]
        if bad:
            raise ValueError(f"{split}: label {bad[0]} outside [0, {len(names)})")
    return splits, names, glue_test


def _subset(dataset, limit, seed):
    if limit is None or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, order.tolist())


def build_data(cfg: ALConfig, vocab_itos=None) -> Data:
    """The run's data. ``train_limit`` keeps a random subset of train (seeded by ``cfg.seed``);
    ``valid_fraction`` holds out part of train as validation when there is none (the same part for every seed)."""
    if cfg.model in ("mlp", "cnn"):
        root = data_dir() / "mnist"
        x, y = load_mnist(root, "train", download=True)
        datasets = {"test": TensorDataset(*load_mnist(root, "test"))}
        if cfg.valid_fraction:
            kept, held = held_out_indices(len(y), cfg.valid_fraction)
            datasets["validation"] = TensorDataset(x[held], y[held])
            x, y = x[kept], y[kept]
        datasets["train"] = _subset(TensorDataset(x, y), cfg.train_limit, cfg.seed)
        return Data(datasets, [str(i) for i in range(10)], None, None, None)
    raw, names, glue_texts = load_text(cfg)
    if cfg.valid_fraction and "validation" not in raw:
        raw["train"], raw["validation"] = hold_out(*raw["train"], cfg.valid_fraction)
    train_labels, train_texts = raw["train"]
    if cfg.train_limit is not None and cfg.train_limit < len(train_texts):
        keep = torch.randperm(len(train_texts), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_limit]
        raw["train"] = ([train_labels[i] for i in keep.tolist()], [train_texts[i] for i in keep.tolist()])
        train_texts = raw["train"][1]
    if vocab_itos is not None:
        vocab = Vocab(vocab_itos)
    else:
        vocab = Vocab.build((tokenize(t)[: cfg.max_len] for t in train_texts), max_size=cfg.vocab_size)
    vectors = None
    if cfg.embeddings:
        vectors, found = load_vectors(cfg.embeddings, vocab, torch.Generator().manual_seed(cfg.seed))
        print(f"embeddings: {found}/{len(vocab) - 1} vocabulary words found in {cfg.embeddings}", file=sys.stderr)
    datasets = {split: TextDataset(texts, labels, vocab, cfg.max_len) for split, (labels, texts) in raw.items()}
    glue_test = TextDataset(glue_texts, [0] * len(glue_texts), vocab, cfg.max_len) if glue_texts else None
    return Data(datasets, names, vocab, vectors, glue_test)


# ------------------------------------------------------------------------------------------- model, optimizer

def model_options(cfg: ALConfig, num_classes: int, vocab: Vocab | None, vectors) -> dict:
    """The keyword arguments of the model class ``cfg`` names."""
    components = cfg.components
    options = {"num_classes": num_classes}
    if cfg.model == "mlp":
        options.update(hidden=cfg.hidden or 256, num_components=components or 3)
    elif cfg.model == "cnn":
        channels = [int(c) for c in cfg.channels.split(",")] if cfg.channels else [
            min(16 * 2**i, 128) for i in range(components or 3)]
        options.update(channels=tuple(channels))
    else:
        embedding_dim = vectors.shape[1] if vectors is not None else cfg.embedding_dim
        options.update(vocab_size=len(vocab), embedding_dim=embedding_dim, vectors=vectors,
                       num_components=components or (3 if cfg.arch == "seed" else 2))
        if cfg.model == "lstm":
            default_dropout = 0.3 if cfg.arch == "seed" else 0.2
            options.update(hidden=cfg.hidden or 128, dropout=default_dropout if cfg.dropout is None else cfg.dropout)
        else:
            options.update(nhead=cfg.heads, feedforward=cfg.feedforward, dropout=0.1 if cfg.dropout is None else cfg.dropout)
            if cfg.arch == "compact":
                if cfg.max_len is None:
                    raise ValueError("--arch compact --model transformer has learned positions: give --max-len")
                options.update(d_model=cfg.d_model, max_len=cfg.max_len)
    if cfg.method == "al":
        options["label_dim"] = cfg.label_dim
    return options


def make_model(cfg: ALConfig, num_classes: int, vocab=None, vectors=None):
    """The model ``cfg`` describes (meProp layers with ``cfg.k``)."""
    return build_model(cfg.model, cfg.method, arch=cfg.arch, k=cfg.k, k_mode=cfg.k_mode,
                       **model_options(cfg, num_classes, vocab, vectors))


def make_optimizers(model, cfg: ALConfig) -> list[torch.optim.Optimizer]:
    """AL: one Adam per component (label autoencoders at ``cfg.autoencoder_lr``); backprop: one Adam."""
    if isinstance(model, ALModel):
        return model.make_adam(cfg.lr, cfg.autoencoder_lr)
    return [torch.optim.Adam(model.parameters(), lr=cfg.lr)]


# ------------------------------------------------------------------------------------------------ training

def make_loader(dataset, cfg: ALConfig, shuffle: bool, epoch: int = 0) -> DataLoader:
    """Batches of ``dataset``; shuffled in an order fixed by ``cfg.seed`` and ``epoch`` when ``shuffle``."""
    text = cfg.model in ("lstm", "transformer")
    generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch) if shuffle else None
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collate_text if text else None)


def unpack_batch(batch, device: torch.device | None = None):
    """``(x, mask or None, labels)`` from a text or a vision batch, moved to ``device`` if given."""
    x, mask, labels = batch if len(batch) == 3 else (batch[0], None, batch[1])
    if device is not None:
        x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        mask = None if mask is None else mask.to(device, non_blocking=True)
    return x, mask, labels


def _progress(iterable, cfg, description):
    if cfg.no_progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)


def train_epoch(model, optimizers, loader, cfg: ALConfig, epoch: int, device=None, scaler=None) -> dict:
    """One epoch; returns mean losses (AL: per component, associated and autoencoder)."""
    model.train()
    amp_dtype = AMP_DTYPES.get(cfg.amp)
    totals, batches = None, 0
    bar = _progress(loader, cfg, f"epoch {epoch}")
    for batch in bar:
        x, mask, labels = unpack_batch(batch, device)
        if isinstance(model, ALModel):
            values = [v for pair in model.train_step(x, labels, optimizers, mask, cfg.clip, amp_dtype, scaler)
                      for v in pair]
        else:
            optimizer = optimizers[0]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(x, mask), labels)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            values = [loss.item()]
        totals = values if totals is None else [a + b for a, b in zip(totals, values)]
        batches += 1
        if not cfg.no_progress:
            bar.set_postfix(loss=f"{sum(values):.4f}")
    means = [v / max(batches, 1) for v in totals or []]
    if isinstance(model, ALModel):
        return {"associated_loss": means[0::2], "autoencoder_loss": means[1::2]}
    return {"loss": means[0] if means else float("nan")}


@torch.no_grad()
def evaluate(model, dataset, cfg: ALConfig, exit_threshold=None, device=None) -> dict:
    """Accuracy of the full (shortcut) prediction; with ``exit_threshold`` also early-exit accuracy and depth."""
    model.eval()
    amp_dtype = AMP_DTYPES.get(cfg.amp)
    correct = early_correct = depth_sum = total = 0
    predictions = []
    for batch in _progress(make_loader(dataset, cfg, shuffle=False), cfg, "eval"):
        x, mask, labels = unpack_batch(batch, device)
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            predicted = model(x, mask).argmax(dim=1)
            if exit_threshold is not None:
                logits, depth = model.early_exit(x, exit_threshold, mask)
                early_correct += int((logits.argmax(dim=1) == labels).sum())
                depth_sum += int(depth.sum())
        predictions.append(predicted.cpu())
        correct += int((predicted == labels).sum())
        total += labels.numel()
    result = {"accuracy": correct / max(total, 1), "examples": total, "predictions": torch.cat(predictions)}
    if exit_threshold is not None:
        result["early_exit"] = {"threshold": exit_threshold, "accuracy": early_correct / max(total, 1),
                                "average_depth": depth_sum / max(total, 1)}
    return result


def fit(cfg: TrainConfig) -> dict:
    """The whole run ``al.train`` makes: train ``cfg.epochs`` epochs (evaluating the validation split after
    each, or the test split when there is none), then test. With a validation split the tested model is the
    one of the best validation epoch (ties: the earlier), and the GLUE file (``cfg.glue_sst2``) is predicted
    by it. Checkpoints (``cfg.checkpoint``, atomic, every epoch) keep the best state too, so ``cfg.resume``
    continues exactly. Returns the summary (also written to ``cfg.results`` as JSON)."""
    device = resolve_device(cfg.device, cfg.amp)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    checkpoint = None
    if cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).exists():
        checkpoint = torch.load(cfg.checkpoint, weights_only=False, map_location="cpu")
        saved = checkpoint["config"]
        changed = [key for key in ARCH_KEYS if saved.get(key) != getattr(cfg, key)]
        if changed:
            raise ValueError(f"--resume: {cfg.checkpoint} was trained with other settings: {changed}")
    data = build_data(cfg, checkpoint["vocab"] if checkpoint else None)
    datasets = data.datasets
    model = make_model(cfg, len(data.names), data.vocab, data.vectors).to(device)
    optimizers = make_optimizers(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    monitor = "validation" if "validation" in datasets else "test"
    history, first_epoch, best = [], 1, None  # best: (accuracy, epoch, state_dict) of the best validation epoch
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        for optimizer, state in zip(optimizers, checkpoint["optimizers"]):
            optimizer.load_state_dict(state)
        torch.set_rng_state(checkpoint["torch_rng"])
        history, first_epoch, best = checkpoint["history"], checkpoint["epoch"] + 1, checkpoint["best"]
        print(f"resumed from {cfg.checkpoint} after epoch {checkpoint['epoch']}", file=sys.stderr)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model}/{cfg.arch}/{cfg.method} on {device}: {parameters:,} parameters, {len(datasets['train'])} "
          f"training examples, {len(data.names)} classes", file=sys.stderr)
    started = time.perf_counter()
    for epoch in range(first_epoch, cfg.epochs + 1):
        loader = make_loader(datasets["train"], cfg, True, epoch)
        losses = train_epoch(model, optimizers, loader, cfg, epoch, device, scaler)
        accuracy = evaluate(model, datasets[monitor], cfg, device=device)["accuracy"]
        history.append({"epoch": epoch, f"{monitor}_accuracy": accuracy, **losses})
        print(f"epoch {epoch}: {monitor} accuracy {accuracy:.4f}  losses {json.dumps(losses)}", file=sys.stderr)
        if monitor == "validation" and (best is None or accuracy > best[0]):
            best = (accuracy, epoch, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        if cfg.checkpoint:
            save_atomic({"epoch": epoch, "config": cfg.to_dict(), "model": model.state_dict(),
                         "optimizers": [o.state_dict() for o in optimizers], "history": history, "best": best,
                         "vocab": data.vocab.itos if data.vocab else None, "torch_rng": torch.get_rng_state()},
                        cfg.checkpoint)
    train_seconds = time.perf_counter() - started
    last_test = None
    if best is not None and best[1] != cfg.epochs:
        last_test = evaluate(model, datasets["test"], cfg, device=device)["accuracy"]
        selected = copy.deepcopy(model)
        selected.load_state_dict(best[2])
        model = selected
    test = evaluate(model, datasets["test"], cfg, cfg.exit_threshold, device)
    print(f"test accuracy: {test['accuracy']:.4f} ({test['examples']} examples"
          + (f", model of the best validation epoch {best[1]}" if best else "") + ")")
    if "early_exit" in test:
        e = test["early_exit"]
        print(f"early exit (entropy < {e['threshold']}): accuracy {e['accuracy']:.4f}, "
              f"average depth {e['average_depth']:.3f} of {model.num_components}")
    if cfg.glue_sst2:
        glue = data.glue_test
        predictions = evaluate(model, glue, cfg, device=device)["predictions"] if glue else test["predictions"]
        write_glue_sst2(cfg.glue_sst2, predictions.tolist())
        print(f"GLUE SST-2 predictions for {'GLUE test' if glue else 'the test split'} "
              f"({len(predictions)} rows) -> {cfg.glue_sst2}", file=sys.stderr)
    summary = {
        "test_accuracy": test["accuracy"],
        "test_examples": test["examples"],
        "selected_epoch": best[1] if best else None,
        "best_validation_accuracy": best[0] if best else None,
        "last_epoch_test_accuracy": test["accuracy"] if last_test is None else last_test,
        "early_exit": test.get("early_exit"),
        "history": history,
        "train_examples": len(datasets["train"]),
        "parameters": parameters,
        "train_seconds_this_session": round(train_seconds, 1),
        "device": str(device),
        "config": {key: value for key, value in cfg.to_dict().items() if key not in ("results", "checkpoint")},
    }
    if cfg.results:
        Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.results).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
