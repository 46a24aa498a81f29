"""meProp on real models (CPU-sized): dense vs fixed k vs adaptive k vs error feedback.

Experiments (each writes ``benchmarks/results/real_models-<name>[-<tag>].json``; ``plot`` merges them):

- ``mnist``: a small CNN (four 3x3 convolutions, two max-poolings, one Linear layer; :func:`mnist_cnn`) with
  meprop.Conv2d in every conv layer (the Linear layer stays dense); test accuracy after ``--epochs`` on
  ``--train`` images.
- ``text``: a small Transformer encoder classifier (word embeddings, explicit q/k/v/o and FFN ``nn.Linear``
  layers, mean pooling) on a text set of ``../shared/data/text`` (default rotten_tomatoes), every Linear
  converted (``--dense-head`` keeps the output layer dense); the test accuracy of the epoch with the best
  validation accuracy (the set's validation split; the per-epoch curves are saved).
- ``hf``: a BERT-style classifier and a GPT-2-style language model built from Hugging Face configs (random
  init, no hub download), trained ``--steps`` steps on the local text with a word-level vocabulary; loss curves.

Denormals are flushed (``torch.set_flush_denormal``). Each run records the backward time (``loss.backward()``)
and the whole step time per step (medians), and for adaptive k the mean ``last_k`` per layer. Variants: ``dense``, ``k`` (fixed ratio ``--ratio``), ``adaptive``
(``meprop.Adaptive(--mass, max_k=--max-ratio)``), ``feedback`` (fixed k with error feedback).

    python benchmarks/real_models.py mnist --seeds 0,1,2 --epochs 2 --train 60000 --max-ratio 0.25
    python benchmarks/real_models.py text --seeds 0,1,2 --epochs 6 --ratio 0.0625 --max-ratio 0.125 --dense-head
    python benchmarks/real_models.py hf --steps 300
    python benchmarks/real_models.py plot
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import meprop  # noqa: E402
from meprop.data import load_mnist  # noqa: E402
from meprop.mnist import accuracy  # noqa: E402
from speed import describe_machine  # noqa: E402  (benchmarks/speed.py)

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("MEPROP_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
VARIANTS = ("dense", "k", "adaptive", "feedback")


def variant_options(variant: str, args) -> dict | None:
    """convert's options for a variant (None: dense)."""
    if variant == "dense":
        return None
    if variant == "k":
        return {"k": args.ratio}
    if variant == "adaptive":
        return {"k": meprop.Adaptive(args.mass, max_k=args.max_ratio)}
    if variant == "feedback":
        return {"k": args.ratio, "error_feedback": True}
    raise ValueError(f"unknown variant {variant!r}")


class Timer:
    """Per-step backward and step times (seconds)."""

    def __init__(self):
        self.backward, self.step = [], []

    def summary(self) -> dict:
        skip = min(5, len(self.step) // 4)  # warm-up steps
        return {
            "backward_ms": statistics.median(self.backward[skip:]) * 1e3,
            "step_ms": statistics.median(self.step[skip:]) * 1e3,
        }


def train_step(model, loss_fn, opt, timer: Timer):
    start = time.perf_counter()
    loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    mid = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    opt.step()
    timer.backward.append(end - mid)
    timer.step.append(time.perf_counter() - start)
    return loss.item()


def adaptive_ks(model, counts):
    for name, m in model.named_modules():
        if getattr(m, "last_k", None) is not None:
            counts[name].append(m.last_k)


# ---------------------------------------------------------------- MNIST CNN
def train_classifier(model, x, y, seed, args, evaluate):
    """Adam (lr 1e-3), ``args.epochs`` epochs of shuffled batches of ``args.batch`` with cross-entropy on ``x (N, ...)``,
    ``y (N,)``; ``evaluate(model) -> dict`` after every epoch. Returns the Timer, the k used per adaptive layer and
    step, and the list of per-epoch evaluations."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    timer, ks, curve = Timer(), collections.defaultdict(list), []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - args.batch + 1, args.batch):
            idx = order[i : i + args.batch]
            train_step(model, lambda: F.cross_entropy(model(x[idx]), y[idx]), opt, timer)
            adaptive_ks(model, ks)
        curve.append(evaluate(model))
    return timer, ks, curve


MNIST_CONVS = ["0", "3", "5", "8"]


def mnist_cnn():
    """Four 3x3 convolutions (1->32 at 28x28, 32->64 and 64->128 at 14x14, 128->128 at 7x7), max-pooling before
    each ReLU (the same function as after it, on a quarter of the values), one Linear: the convolutions are
    most of the backward, as in larger CNNs."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(128 * 7 * 7, 10),
    )


def run_mnist(variant, seed, args, data):
    torch.manual_seed(seed)
    model = mnist_cnn()
    options = variant_options(variant, args)
    if options is not None:
        meprop.convert(model, target_modules=MNIST_CONVS, **options)  # every conv layer
    x = data.train_images[: args.train].float().div(255).unsqueeze(1)
    y = data.train_labels[: args.train]
    tx = data.test_images.float().div(255).unsqueeze(1)
    timer, ks, curve = train_classifier(model, x, y, seed, args, lambda m: {"test": accuracy(m, tx, data.test_labels)})
    return {"accuracy": curve[-1]["test"], "curve": curve, **timer.summary(),  # the final epoch's
            "mean_k": {n: statistics.mean(v) for n, v in ks.items()}}


# ---------------------------------------------------------------- text
def read_tsv(path):
    labels, texts = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line:
            continue
        label, _, text = line.partition("\t")
        labels.append(int(label))
        texts.append(text.lower().split())
    return texts, torch.tensor(labels)


def vocabulary(texts, size):
    counts = collections.Counter(w for t in texts for w in t)
    return {w: i + 2 for i, (w, _) in enumerate(counts.most_common(size - 2))}  # 0 pad, 1 unknown


def encode(texts, vocab, length):
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [vocab.get(w, 1) for w in t[:length]]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class Block(nn.Module):
    """A pre-norm Transformer encoder block with every projection an explicit nn.Linear."""

    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x, pad):
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(F.gelu(self.ff1(self.n2(x))))


class TextClassifier(nn.Module):
    def __init__(self, vocab, classes, d=128, heads=4, ff=256, layers=2, length=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        pad = ids == 0
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((x * keep).sum(1) / keep.sum(1).clamp(min=1))


def load_text(args):
    root = DATA / "text" / args.dataset
    train, ytrain = read_tsv(root / "train.tsv")
    valid, yvalid = read_tsv(root / "validation.tsv")
    test, ytest = read_tsv(root / "test.tsv")
    vocab = vocabulary(train, args.vocab)
    return {"train": (encode(train, vocab, args.length), ytrain),
            "validation": (encode(valid, vocab, args.length), yvalid),
            "test": (encode(test, vocab, args.length), ytest), "classes": int(ytrain.max()) + 1}


def run_text(variant, seed, args, data):
    xtr, ytr = (t[: args.train] for t in data["train"])
    torch.manual_seed(seed)
    model = TextClassifier(args.vocab, data["classes"], d=args.width, ff=args.ff, length=args.length)
    options = variant_options(variant, args)
    if options is not None:
        meprop.convert(model, exclude_modules=["head"] if args.dense_head else None, **options)  # every Linear
    splits = ("validation", "test")
    timer, ks, curve = train_classifier(
        model, xtr, ytr, seed, args, lambda m: {split: accuracy(m, *data[split], batch=500) for split in splits})
    best = max(range(len(curve)), key=lambda e: curve[e]["validation"])  # first epoch with the best validation
    return {"accuracy": curve[best]["test"], "best_epoch": best + 1, "curve": curve, **timer.summary(),
            "mean_k": {n: statistics.mean(v) for n, v in ks.items()}}


# ---------------------------------------------------------------- Hugging Face models from configs
def run_hf(variant, seed, args, data):
    import transformers

    (xtr, ytr), classes = data["train"], data["classes"]
    torch.manual_seed(seed)
    curves = {}
    timings = {}
    for kind in ("bert", "gpt2"):
        if kind == "bert":
            config = transformers.BertConfig(vocab_size=args.vocab, hidden_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=256,
                                             max_position_embeddings=args.length, num_labels=classes)
            model = transformers.BertForSequenceClassification(config)
            exclude = ["classifier"]
        else:
            config = transformers.GPT2Config(vocab_size=args.vocab, n_embd=128, n_layer=2, n_head=4,
                                             n_positions=args.length, bos_token_id=0, eos_token_id=0)
            model = transformers.GPT2LMHeadModel(config)
            exclude = ["lm_head"]  # tied to the embedding; the output layer stays dense
        options = variant_options(variant, args)
        if options is not None:
            meprop.convert(model, exclude_modules=exclude, **options)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
        timer, losses = Timer(), []
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for step in range(args.steps):
            idx = torch.randint(0, len(ytr), (args.batch,), generator=gen)
            ids = xtr[idx]
            mask = (ids != 0).long()
            if kind == "bert":
                fn = lambda: model(input_ids=ids, attention_mask=mask, labels=ytr[idx]).loss  # noqa: E731
            else:
                labels = ids.masked_fill(ids == 0, -100)
                fn = lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss  # noqa: E731
            losses.append(train_step(model, fn, opt, timer))
        curves[kind] = losses
        timings[kind] = timer.summary()
    return {"curves": curves, "timing": timings}


# ---------------------------------------------------------------- driver
RUNNERS = {"mnist": run_mnist, "text": run_text, "hf": run_hf}


def run(args):
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal gradients slow some steps many times over (every variant alike)
    data = load_mnist(DATA / "mnist", download=False) if args.experiment == "mnist" else load_text(args)
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            start = time.perf_counter()
            result = RUNNERS[args.experiment](variant, seed, args, data)
            result.update(variant=variant, seed=seed, seconds=time.perf_counter() - start)
            runs.append(result)
            brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()
                     if k in ("accuracy", "backward_ms", "step_ms", "seconds")}
            print(args.experiment, variant, seed, brief, flush=True)
            path = write(args, runs)  # after every run, so a run cut short keeps what finished
    print(f"wrote {path}")


def write(args, runs) -> Path:
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "out_dir")}
    out = {
        "experiment": args.experiment,
        "machine": describe_machine(torch.device("cpu")),
        "note": "2-core machine shared with other sessions' light work; runs under the heavy-job lock",
        "settings": settings,
        "runs": runs,
    }
    tag = f"-{args.tag}" if args.tag else ""
    path = args.out_dir / f"real_models-{args.experiment}{tag}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def summarize(runs):
    """Per variant: mean and std of accuracy over seeds, median times."""
    by = collections.defaultdict(list)
    for r in runs:
        by[r["variant"]].append(r)
    rows = {}
    for v, rs in by.items():
        acc = [r["accuracy"] for r in rs]
        rows[v] = {
            "seeds": len(rs),
            "accuracy_mean": statistics.mean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "backward_ms": statistics.median(r["backward_ms"] for r in rs),
            "step_ms": statistics.median(r["step_ms"] for r in rs),
            "mean_k": {n: statistics.mean(r["mean_k"][n] for r in rs) for n in rs[0].get("mean_k", {})},
        }
    dense = rows.get("dense")
    for row in rows.values():
        if dense:
            row["accuracy_vs_dense"] = row["accuracy_mean"] - dense["accuracy_mean"]
            row["backward_speedup"] = dense["backward_ms"] / row["backward_ms"]
    return rows


def plot(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# meProp on real models (benchmarks/real_models.py)", ""]
    for path in sorted(RESULTS.glob("real_models-*.json")):
        data = json.loads(path.read_text())
        lines += [f"## {path.name} ({data['machine']['date']}, {data['machine']['device']})", "",
                  f"Settings: {json.dumps({k: v for k, v in data['settings'].items() if k != 'experiment'})}", ""]
        if data["experiment"] in ("mnist", "text"):
            rows = summarize(data["runs"])
            lines += ["| variant | seeds | accuracy % (mean ± std) | vs dense | backward ms | speedup | step ms | "
                      "mean k per layer |", "|---|---|---|---|---|---|---|---|"]
            for v, r in rows.items():
                lines.append(f"| {v} | {r['seeds']} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
                             f"{r.get('accuracy_vs_dense', 0):+.2f} | {r['backward_ms']:.1f} | "
                             f"{r.get('backward_speedup', 1):.2f}x | {r['step_ms']:.1f} | "
                             f"{', '.join(f'{n}: {k:.1f}' for n, k in r['mean_k'].items())} |")
            selected = data["experiment"] == "text"
            lines += ["", "Accuracy: the test accuracy at the epoch of best validation accuracy." if selected
                      else "Accuracy: the test accuracy after the last epoch."]
            fig, (ax, curves) = plt.subplots(1, 2, figsize=(10, 3.5))
            for v, r in rows.items():
                ax.errorbar(r["backward_ms"], r["accuracy_mean"], yerr=r["accuracy_std"], fmt="o", label=v)
                per_epoch = [[c["validation" if selected else "test"] for c in run["curve"]]
                             for run in data["runs"] if run["variant"] == v and "curve" in run]
                if per_epoch:
                    curves.plot(range(1, len(per_epoch[0]) + 1), [statistics.mean(e) for e in zip(*per_epoch)],
                                marker="o", label=v)
            ax.set_xlabel("backward per step (ms, median)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(path.stem)
            ax.legend()
            curves.set_xlabel("epoch")
            curves.set_ylabel(f"{'validation' if selected else 'test'} accuracy (%, mean over seeds)")
            curves.legend()
        else:
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
            lines += ["| variant | model | final loss (mean of last 20) | backward ms | step ms |",
                      "|---|---|---|---|---|"]
            for r in data["runs"]:
                for ax, (kind, curve) in zip(axes, r["curves"].items()):
                    smooth = [statistics.mean(curve[max(0, i - 9) : i + 1]) for i in range(len(curve))]
                    ax.plot(smooth, label=r["variant"])
                    ax.set_title(f"{kind} from config (loss, 10-step mean)")
                    ax.set_xlabel("step")
                    t = r["timing"][kind]
                    lines.append(f"| {r['variant']} | {kind} | {statistics.mean(curve[-20:]):.3f} | "
                                 f"{t['backward_ms']:.1f} | {t['step_ms']:.1f} |")
            axes[0].legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=100)
        plt.close(fig)
        lines.append("")
    (RESULTS / "real_models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="experiment", required=True)
    for name in RUNNERS:
        p = sub.add_parser(name)
        p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
        p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
        p.add_argument("--ratio", type=float, default=0.125, help="fixed k as a share of each layer's width")
        p.add_argument("--mass", type=float, default=0.9)
        p.add_argument("--max-ratio", type=float, default=0.5)
        p.add_argument("--epochs", type=int, default=1)
        p.add_argument("--batch", type=int, default=64 if name == "mnist" else 32)
        p.add_argument("--train", type=int, default=20000, help="training examples used (mnist, text)")
        p.add_argument("--dataset", default="rotten_tomatoes")
        p.add_argument("--vocab", type=int, default=10000)
        p.add_argument("--length", type=int, default=48)
        p.add_argument("--steps", type=int, default=300, help="hf: training steps")
        p.add_argument("--width", type=int, default=256, help="text: model width")
        p.add_argument("--ff", type=int, default=1024, help="text: feed-forward width")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--dense-head", action="store_true", help="text: keep the output Linear dense")
        p.add_argument("--tag", default="")
        p.add_argument("--out-dir", type=Path, default=RESULTS)
        p.set_defaults(func=run)
    p = sub.add_parser("plot")
    p.set_defaults(func=plot)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
