"""POS tagging with a BiLSTM, dense vs meProp (the paper's largest reported gain; issue 16).

Data: UD English EWT (CoNLL-U, ``$MEPROP_DATA/pos/en_ewt``, default ``../shared/data``); the Penn Treebank
tags of column 5 (XPOS), as the paper's WSJ experiment predicts. Multiword-token lines (``3-4``) and empty
nodes (``8.1``) are skipped.

Tagger: lower-cased word embeddings (50-d, GloVe-initialised where ``$MEPROP_DATA/vectors`` has the word),
suffix-2 and suffix-3 embeddings and a word-shape feature (capitals, digits, hyphens), a 1-layer BiLSTM of
hidden 500 (the paper's size), a linear layer to the tags; Adam, batches of sentences (packed sequences).
meProp runs are the same model with ``meprop.LSTM`` (k per gate, unified or per_example) in place of the
``nn.LSTM``; the output layer stays dense. Test accuracy is taken at the epoch of best dev accuracy.

Timing: the LSTM's backprop time is measured inside training (the paper's metric): from the moment the
gradient of the LSTM's output arrives to the moment the gradient of its input is complete (gradient hooks),
summed over an epoch; and the wall time of each training epoch (evaluation excluded).

    python benchmarks/pos.py --configs dense unified-10 --seeds 0 1 2 --epochs 4    # runs -> pos-runs/*.json
    python benchmarks/pos.py --report                                               # pos.{json,md,png}
    python benchmarks/pos.py --quick                                                # a minute-long smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import meprop  # noqa: E402

DATA = Path(os.environ.get("MEPROP_DATA", ROOT.parent / "shared" / "data"))
RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "pos-runs"


def read_conllu(path: str | os.PathLike) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL-U file (gzipped or not) as (words, XPOS tags); comments, multiword-token lines
    (``3-4``) and empty nodes (``8.1``) skipped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    sentences, words, tags = [], [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                if words:
                    sentences.append((words, tags))
                words, tags = [], []
                continue
            if line.startswith("#"):
                continue
            cols = line.split("\t")
            if len(cols) != 10:
                raise ValueError(f"{path}: a token line needs 10 tab-separated columns, got {len(cols)}: {line!r}")
            if "-" in cols[0] or "." in cols[0]:
                continue
            words.append(cols[1])
            tags.append(cols[4])
    if words:
        sentences.append((words, tags))
    return sentences


def shape(word: str) -> int:
    """A word-shape id: initial capital, all capitals, has a digit, has a hyphen (4 bits)."""
    return (word[:1].isupper()) | (word.isupper() << 1) | (any(c.isdigit() for c in word) << 2) | (("-" in word) << 3)


class Vocab:
    """Ids of the features, built from the training sentences (id 0: padding/unknown)."""

    def __init__(self, sentences, min_count: int = 1):
        counts: dict[str, int] = {}
        for words, _ in sentences:
            for w in words:
                counts[w.lower()] = counts.get(w.lower(), 0) + 1
        self.words = {w: i + 1 for i, w in enumerate(sorted(w for w, c in counts.items() if c >= min_count))}
        suffixes = sorted({w.lower()[-n:] for ws, _ in sentences for w in ws for n in (2, 3)})
        self.suffixes = {s: i + 1 for i, s in enumerate(suffixes)}
        self.tags = {t: i for i, t in enumerate(sorted({t for _, ts in sentences for t in ts}))}

    def encode(self, words, tags):
        lower = [w.lower() for w in words]
        feats = torch.tensor([[self.words.get(w, 0), self.suffixes.get(w[-2:], 0), self.suffixes.get(w[-3:], 0),
                               shape(o)] for w, o in zip(lower, words)])
        return feats, torch.tensor([self.tags.get(t, -100) for t in tags])


def load_glove(path: Path, vocab: Vocab, dim: int) -> tuple[torch.Tensor, int]:
    """An embedding matrix with the GloVe vectors of the vocabulary's words (others small random); hits."""
    table = torch.randn(len(vocab.words) + 1, dim) * 0.1
    hits = 0
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split(" ")
            if parts[0] in vocab.words and len(parts) == dim + 1:
                table[vocab.words[parts[0]]] = torch.tensor([float(v) for v in parts[1:]])
                hits += 1
    table[0] = 0
    return table, hits


class Tagger(nn.Module):
    """Embeddings (word, suffix-2, suffix-3, shape) -> 1-layer BiLSTM -> linear to the tags."""

    def __init__(self, vocab: Vocab, hidden: int, word_vectors: torch.Tensor, k=None, mode="unified"):
        super().__init__()
        self.words = nn.Embedding.from_pretrained(word_vectors, freeze=False, padding_idx=0)
        self.suffixes = nn.Embedding(len(vocab.suffixes) + 1, 20, padding_idx=0)
        self.shapes = nn.Embedding(16, 8)
        n_in = word_vectors.shape[1] + 2 * 20 + 8
        self.lstm = nn.LSTM(n_in, hidden, bidirectional=True)
        if k is not None:
            self.lstm = meprop.LSTM.from_lstm(self.lstm, k=k, mode=mode)
        self.out = nn.Linear(2 * hidden, len(vocab.tags))
        self.dropout = nn.Dropout(0.3)
        self.backprop_s = 0.0  # the LSTM's backward time, summed (training only)
        self._start = 0.0

    def embed(self, feats):
        e = torch.cat([self.words(feats[:, 0]), self.suffixes(feats[:, 1]), self.suffixes(feats[:, 2]),
                       self.shapes(feats[:, 3])], dim=1)
        return self.dropout(e)

    def forward(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Scores (total tokens, tags) of the sentences (each (L, 4) feature ids), in packed order."""
        packed = pack_sequence([self.embed(f) for f in batch], enforce_sorted=False)
        timed = self.training and torch.is_grad_enabled()
        if timed:
            packed.data.register_hook(self._stop)
        out, _ = self.lstm(packed)
        if timed:
            out.data.register_hook(self._go)
        return self.out(self.dropout(out.data)), packed

    def _go(self, grad):
        self._start = time.perf_counter()

    def _stop(self, grad):
        self.backprop_s += time.perf_counter() - self._start


def packed_labels(labels: list[torch.Tensor], packed) -> torch.Tensor:
    """The labels in the packed order of ``packed`` (made from sentences of these lengths)."""
    return pack_sequence(labels, enforce_sorted=False).data


def accuracy(model: Tagger, data, batch_size: int = 256) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            chunk = data[i : i + batch_size]
            scores, packed = model([f for f, _ in chunk])
            gold = packed_labels([t for _, t in chunk], packed)
            keep = gold >= 0  # tags unseen in training count as errors, with their tokens
            right += int((scores.argmax(1) == gold)[keep].sum())
            total += int(gold.numel())
    return right / max(total, 1)


def parse_config(name: str):
    """"dense" -> (None, None); "unified-10" / "per_example-10" -> (10, mode)."""
    if name == "dense":
        return None, None
    mode, _, k = name.rpartition("-")
    if mode not in meprop.MODES or not k.isdigit():
        raise ValueError(f"pos.py: a config is 'dense' or <mode>-<k> with mode in {meprop.MODES}, got {name!r}")
    return int(k), mode


def run(config: str, seed: int, args) -> dict:
    k, mode = parse_config(config)
    torch.manual_seed(seed)
    random.seed(seed)
    base = args.data / "pos" / "en_ewt"
    train, dev, test = (read_conllu(base / f"en_ewt-ud-{part}.conllu.gz") for part in ("train", "dev", "test"))
    if args.train_sentences:
        train = train[: args.train_sentences]
        dev, test = dev[: args.train_sentences // 4 + 1], test[: args.train_sentences // 4 + 1]
    vocab = Vocab(train)
    vectors, hits = load_glove(args.data / "vectors" / "glove.6B.50d.top5k_rounded6.txt", vocab, 50)
    enc = lambda part: [vocab.encode(w, t) for w, t in part]  # noqa: E731
    train_e, dev_e, test_e = enc(train), enc(dev), enc(test)
    model = Tagger(vocab, args.hidden, vectors, k, mode)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = list(range(len(train_e)))
        random.shuffle(order)
        model.backprop_s = 0.0
        start = time.perf_counter()
        for i in range(0, len(order), args.batch_size):
            chunk = [train_e[j] for j in order[i : i + args.batch_size]]
            scores, packed = model([f for f, _ in chunk])
            loss = F.cross_entropy(scores, packed_labels([t for _, t in chunk], packed), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch_s = time.perf_counter() - start
        row = dict(epoch=epoch + 1, epoch_s=epoch_s, lstm_backprop_s=model.backprop_s,
                   dev=accuracy(model, dev_e), test=accuracy(model, test_e))
        history.append(row)
        print(f"{config} seed {seed} epoch {row['epoch']}: dev {row['dev']:.4f} test {row['test']:.4f} "
              f"epoch {epoch_s:.1f} s, LSTM backprop {model.backprop_s:.1f} s", flush=True)
    best = max(history, key=lambda r: r["dev"])
    return dict(config=config, k=k, mode=mode, seed=seed, epochs=args.epochs, hidden=args.hidden,
                batch_size=args.batch_size, lr=args.lr, train_sentences=len(train), glove_hits=hits,
                best_epoch=best["epoch"], dev=best["dev"], test=best["test"], history=history,
                machine=describe_machine())


def describe_machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=f"{model or platform.processor()} ({os.cpu_count()} cores)", torch=torch.__version__,
                threads=torch.get_num_threads())


def _mean_std(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(runs_dir: Path, out_stem: Path, plot: bool = True) -> dict:
    """pos.json (every run and the per-config summary), pos.md (the table), pos.png (accuracy, speedup vs k)."""
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    configs = sorted({r["config"] for r in runs}, key=lambda c: (c != "dense", parse_config(c)[1] or "",
                                                                 parse_config(c)[0] or 0))
    summary = []
    for config in configs:
        rs = [r for r in runs if r["config"] == config]
        # per run the median epoch (robust to an epoch slowed by other work on the machine), then the mean of runs
        mean_bp = statistics.mean(statistics.median(h["lstm_backprop_s"] for h in r["history"]) for r in rs)
        mean_ep = statistics.mean(statistics.median(h["epoch_s"] for h in r["history"]) for r in rs)
        test_m, test_s = _mean_std(100 * r["test"] for r in rs)
        dev_m, dev_s = _mean_std(100 * r["dev"] for r in rs)
        summary.append(dict(config=config, k=rs[0]["k"], mode=rs[0]["mode"], seeds=sorted(r["seed"] for r in rs),
                            epochs=rs[0]["epochs"], test_mean=test_m, test_std=test_s, dev_mean=dev_m, dev_std=dev_s,
                            lstm_backprop_s_per_epoch=mean_bp, epoch_s=mean_ep))
    dense = next((s for s in summary if s["config"] == "dense"), None)
    for s in summary:
        s["backprop_speedup"] = dense["lstm_backprop_s_per_epoch"] / s["lstm_backprop_s_per_epoch"] if dense else None
        s["epoch_speedup"] = dense["epoch_s"] / s["epoch_s"] if dense else None
        s["test_minus_dense"] = s["test_mean"] - dense["test_mean"] if dense else None
    meta = runs[0]["machine"] if runs else {}
    result = dict(machine=meta, note="2-core CPU shared with other sessions' light work; times are wall clock",
                  summary=summary, runs=runs)
    out_stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# POS tagging (UD EWT XPOS), BiLSTM hidden {runs[0]['hidden'] if runs else '?'}: dense vs meProp",
             "", f"Machine: {meta.get('device', '?')}, torch {meta.get('torch', '?')}, {meta.get('date', '?')} "
             "(shared with other sessions' light work). Test accuracy at the best dev epoch; mean +- std over seeds; "
             "times: each run's median epoch, mean over runs.",
             "", "| config | seeds | epochs | test acc % | dev acc % | test - dense | LSTM backprop s/epoch | "
             "backprop speedup | epoch s | epoch speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['config']} | {len(s['seeds'])} | {s['epochs']} | {s['test_mean']:.2f} +- {s['test_std']:.2f} | "
                     f"{s['dev_mean']:.2f} +- {s['dev_std']:.2f} | {s['test_minus_dense']:+.2f} | "
                     f"{s['lstm_backprop_s_per_epoch']:.1f} | {s['backprop_speedup']:.1f}x | {s['epoch_s']:.1f} | "
                     f"{s['epoch_speedup']:.2f}x |")
    out_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if plot and summary:
        _plot(summary, out_stem.with_suffix(".png"))
    print("\n".join(lines))
    return result


def _plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    dense = next((s for s in summary if s["config"] == "dense"), None)
    for mode, marker in (("unified", "o"), ("per_example", "s")):
        rows = sorted((s for s in summary if s["mode"] == mode), key=lambda s: s["k"])
        if not rows:
            continue
        ks = [s["k"] for s in rows]
        left.errorbar(ks, [s["test_mean"] for s in rows], yerr=[s["test_std"] for s in rows], marker=marker, label=mode)
        right.plot(ks, [s["backprop_speedup"] for s in rows], marker=marker, label=f"{mode} LSTM backprop")
        right.plot(ks, [s["epoch_speedup"] for s in rows], marker=marker, linestyle="--", label=f"{mode} epoch")
    if dense:
        left.axhline(dense["test_mean"], color="k", linestyle=":", label="dense")
        right.axhline(1.0, color="k", linestyle=":")
    left.set(xlabel="k (per gate)", ylabel="test accuracy % (best dev epoch)", title="UD EWT XPOS")
    right.set(xlabel="k (per gate)", ylabel="speedup over dense", title="time, measured in training")
    left.legend()
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["dense", "unified-10", "per_example-10"],
                   help="dense and/or <mode>-<k> (k per gate), e.g. unified-10 per_example-5")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-sentences", type=int, default=0, help="use only the first N (0: all)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--runs-dir", type=Path, default=RUNS, help="one JSON per run goes here")
    p.add_argument("--report", action="store_true", help="summarise --runs-dir into pos.{json,md,png}")
    p.add_argument("--out", type=Path, default=RESULTS / "pos", help="stem of the report files")
    p.add_argument("--quick", action="store_true", help="a smoke run: 300 sentences, hidden 32, 1 epoch")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        report(args.runs_dir, args.out)
        return
    if args.quick:
        args.train_sentences, args.hidden, args.epochs = args.train_sentences or 300, 32, 1
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        parse_config(config)
    for seed in args.seeds:
        for config in args.configs:
            result = run(config, seed, args)
            path = args.runs_dir / f"{config}-s{seed}{'-quick' if args.quick else ''}.json"
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {path}: test {100 * result['test']:.2f} at epoch {result['best_epoch']}", flush=True)


if __name__ == "__main__":
    main()
