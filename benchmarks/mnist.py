#!/usr/bin/env python3
"""Reproduce meProp (Sun et al., ICML 2017) and meSimp on MNIST; also a training CLI.

The seed's protocol: MLP 784-500-500-10 with ReLU and dropout 0.1, Adam (lr 1e-3), mini-batches of 50,
20 epochs; the first 5,000 training images are the dev set, the other 55,000 are trained on; the reported
test accuracy is the one at the epoch with the best dev accuracy (first such epoch). Hidden layers use
meProp; the output layer stays dense as in the seed's code (``--output-k`` applies k there too, as the
paper describes). Weights: ``nn.Linear``'s default initialisation (the seed's PyTorch code meant the old
default, but its transposed weight layout made the bound 1/sqrt(out_features): +-0.32 for the output layer).

Runs (``--runs``): dense, unified-30, per_example-30, random_unified-30, random_per_example-30,
unified-80, mesimp (per-example top-160, prune threshold 0.1, the seed's 5-epoch cycles with 8 prunes per
epoch in even cycles). ``--mode``/``--k`` train one custom configuration (plus the dense baseline).

Times per epoch (training loop only, no evaluation): ``epoch_s`` (wall), ``backward_s`` (the
``loss.backward()`` calls), ``linear_backward_s`` (time inside the linear layers' own autograd nodes,
measured with autograd node pre/post hooks), ``forward_s``, ``step_s`` (optimizer). Speedups are the dense
run's time divided by each run's, on the same machine in the same invocation.

Examples::

    python benchmarks/mnist.py --quick --data-dir ../shared/data/mnist
    python benchmarks/mnist.py --runs dense,unified-30 --checkpoint ckpt --resume --json out.json
    python benchmarks/mnist.py --combine full.json timing.json --json mnist.json --plot mnist.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import meprop  # noqa: E402
from meprop.data import load_mnist  # noqa: E402
from meprop.simp import Cycle, Simplifier  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("MEPROP_DATA", ROOT.parent / "shared" / "data")) / "mnist"
DEV_SIZE = 5000
PAPER = {  # the seed's reported test accuracies (%) for the same runs
    "dense": "97.94 (code log, unified script); 98.00 (code log, per-example script); 98.20 (README)",
    "unified-30": "98.04 (code log)",
    "per_example-30": "98.28 (code log; batch 32, hidden 512)",
    "unified-80": "98.27 (README, top-80)",
    "mesimp": "98.31 with 154 units (meSimp README, top-160)",
}


@dataclass
class RunConfig:
    """One training configuration. ``mode=None`` is the dense baseline."""

    name: str
    mode: str | None = None
    k: int | None = None
    simp: bool = False
    output_k: bool = False
    epochs: int = 20
    batch_size: int = 50
    hidden: int = 500
    dropout: float = 0.1
    lr: float = 1e-3
    seed: int = 1
    train_size: int | None = None  # None: all 55,000 non-dev training images
    simp_threshold: float = 0.1
    simp_cycle_epochs: int = 5
    simp_prunes_per_epoch: int = 8


PRESETS = {
    "dense": dict(),
    "unified-30": dict(mode="unified", k=30),
    "per_example-30": dict(mode="per_example", k=30),
    "random_unified-30": dict(mode="random_unified", k=30),
    "random_per_example-30": dict(mode="random_per_example", k=30),
    "unified-80": dict(mode="unified", k=80),
    "mesimp": dict(mode="per_example", k=160, simp=True),
}


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Splits:
    """Flattened float images in [0, 1] ``(N, 784)`` and int64 labels ``(N,)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    dev_x: torch.Tensor
    dev_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_splits(data_dir: Path) -> Splits:
    """The seed's split: dev = first 5,000 training images, train = the remaining 55,000."""
    mnist = load_mnist(data_dir)
    train_x = mnist.train_images.reshape(len(mnist.train_images), -1).float().div_(255)
    test_x = mnist.test_images.reshape(len(mnist.test_images), -1).float().div_(255)
    return Splits(
        train_x[DEV_SIZE:], mnist.train_labels[DEV_SIZE:], train_x[:DEV_SIZE], mnist.train_labels[:DEV_SIZE],
        test_x, mnist.test_labels,
    )


# ---------------------------------------------------------------------------------------------- model
def build_model(config: RunConfig, hidden_sizes: list[int] | None = None) -> nn.Sequential:
    """784 -> hidden -> hidden -> 10 MLP (ReLU, dropout); hidden layers meProp unless ``config.mode`` is None."""
    sizes = [784] + list(hidden_sizes or [config.hidden, config.hidden]) + [10]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(config.dropout)]
    model = nn.Sequential(*layers)
    if config.mode is not None:
        model = meprop.convert(model, k=config.k, mode=config.mode, skip_last=not config.output_k)
    return model


class LinearBackwardTimer:
    """Sums the time spent inside the autograd nodes of ``model``'s linear layers (pre/post node hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.seconds = 0.0
        self._started: dict[int, float] = {}
        self._handles = [m.register_forward_hook(self._attach) for m in model.modules() if isinstance(m, nn.Linear)]

    def _attach(self, module, inputs, output) -> None:
        node = output.grad_fn
        if node is None:
            return
        key = id(node)

        def pre(grad_outputs):
            self._started[key] = time.perf_counter()

        def post(grad_inputs, grad_outputs):
            self.seconds += time.perf_counter() - self._started.pop(key)

        node.register_prehook(pre)
        node.register_hook(post)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ------------------------------------------------------------------------------------------- training
@dataclass
class RunState:
    """Everything a checkpoint holds besides model/optimizer: progress, best-dev bookkeeping, history."""

    epoch: int = 0
    best_dev: float = -1.0
    best_epoch: int = -1
    test_at_best: float = float("nan")
    history: list = field(default_factory=list)
    hidden_sizes: list = field(default_factory=list)
    finished: bool = False


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Percent of correctly classified rows (model in eval mode)."""
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StopRequested(Exception):
    """Raised when ``stop_after`` seconds have passed; the checkpoint is saved, resume to continue."""


def train(
    config: RunConfig,
    data: Splits,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: float | None = None,
) -> RunState:
    """Train ``config`` on ``data``; per-epoch dev/test accuracy and times in the returned state's history.

    With ``checkpoint`` (a file path) the model, optimizer, RNG states and progress are saved atomically
    after every epoch; with ``resume`` an existing checkpoint is continued (a resumed run ends with the
    same weights as an uninterrupted one). ``stop_at`` (a ``time.time()`` value) stops after the epoch
    during which it passes, raising :class:`StopRequested`.
    """
    train_x, train_y = data.train_x, data.train_y
    if config.train_size is not None:
        train_x, train_y = train_x[: config.train_size], train_y[: config.train_size]
    torch.manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    state = RunState()
    saved = torch.load(checkpoint, weights_only=False) if resume and checkpoint and checkpoint.exists() else None
    if saved is not None:
        if saved["config"] != asdict(config):
            raise ValueError(f"--resume: checkpoint {checkpoint} was made with a different configuration")
        state = RunState(**saved["state"])
        if state.finished:
            return state
    model = build_model(config, state.hidden_sizes or None)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    simplifier = Simplifier(model, optimizer, config.simp_threshold) if config.simp else None
    cycle = Cycle(config.simp_cycle_epochs, config.simp_prunes_per_epoch)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if simplifier is not None:
            simplifier.load_state_dict(saved["simplifier"])
        torch.set_rng_state(saved["rng"])
        order.set_state(saved["order_rng"])
    timer = LinearBackwardTimer(model)
    steps = math.ceil(len(train_x) / config.batch_size)
    prune_steps = cycle.prune_steps(steps)
    try:
        while state.epoch < config.epochs:
            epoch = state.epoch
            if simplifier is not None and cycle.resets_optimizer_before(epoch):
                optimizer.state.clear()
            model.train()
            perm = torch.randperm(len(train_x), generator=order)
            times = dict(forward_s=0.0, backward_s=0.0, step_s=0.0)
            timer.seconds = 0.0
            loss_sum = 0.0
            bar = tqdm(range(steps), desc=f"{config.name} {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
            start = time.perf_counter()
            for step in bar:
                idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
                x, y = train_x[idx], train_y[idx]
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                optimizer.step()
                t3 = time.perf_counter()
                times["forward_s"] += t1 - t0
                times["backward_s"] += t2 - t1
                times["step_s"] += t3 - t2
                loss_sum += loss.item()
                if simplifier is not None and cycle.prunes_in(epoch) and step in prune_steps:
                    simplifier.prune()
            epoch_s = time.perf_counter() - start
            bar.close()
            dev, test = accuracy(model, data.dev_x, data.dev_y), accuracy(model, data.test_x, data.test_y)
            if dev > state.best_dev:
                state.best_dev, state.best_epoch, state.test_at_best = dev, epoch, test
            record = dict(epoch=epoch, loss=loss_sum / steps, dev=dev, test=test, epoch_s=epoch_s,
                          linear_backward_s=timer.seconds, **times)
            if simplifier is not None:
                record["hidden_sizes"] = simplifier.hidden_sizes()
                state.hidden_sizes = simplifier.hidden_sizes()
            state.history.append(record)
            state.epoch += 1
            state.finished = state.epoch == config.epochs
            tqdm.write(
                f"{config.name} epoch {epoch + 1}: loss {record['loss']:.4f} dev {dev:.2f} test {test:.2f} "
                f"epoch {epoch_s:.1f}s backward {times['backward_s']:.1f}s"
                + (f" sizes {record['hidden_sizes']}" if simplifier is not None else ""),
                file=sys.stderr,
            )
            if checkpoint is not None:
                _save_atomic(
                    dict(config=asdict(config), state=asdict(state), model=model.state_dict(),
                         optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), order_rng=order.get_state(),
                         simplifier=simplifier.state_dict() if simplifier is not None else None),
                    checkpoint,
                )
            if stop_at is not None and time.time() >= stop_at and not state.finished:
                raise StopRequested(f"{config.name}: stopped after epoch {state.epoch}/{config.epochs}")
    finally:
        timer.remove()
        if simplifier is not None:
            simplifier.remove_hooks()
    state.final_model = model  # not serialised: for callers that inspect the weights
    return state


# -------------------------------------------------------------------------------------------- results
def summarise(config: RunConfig, state: RunState, timing_epochs_skip: int = 0) -> dict:
    """A run's result row: accuracies at the best-dev epoch and mean per-epoch times."""
    timed = state.history[timing_epochs_skip:] or state.history
    mean = {key: sum(r[key] for r in timed) / len(timed) for key in ("epoch_s", "backward_s", "linear_backward_s", "forward_s", "step_s")}
    row = dict(name=config.name, mode=config.mode or "dense", k=config.k, output_k=config.output_k,
               epochs=config.epochs, epochs_done=state.epoch, best_epoch=state.best_epoch, dev_acc=state.best_dev, test_acc=state.test_at_best,
               final_test_acc=state.history[-1]["test"], timed_epochs=len(timed), **mean, history=state.history)
    if config.simp:
        row["hidden_sizes"] = state.hidden_sizes
    return row


def add_speedups(rows: list[dict]) -> None:
    """Add dense-time / run-time ratios to every row (in place) when a dense row is present."""
    dense = next((r for r in rows if r["mode"] == "dense"), None)
    if dense is None:
        return
    for row in rows:
        for key in ("epoch_s", "backward_s", "linear_backward_s"):
            row[f"{key.removesuffix('_s')}_speedup"] = dense[key] / row[key] if row[key] > 0 else None


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """Accuracy and time table; steps-per-epoch times in seconds, speedups vs the dense row."""
    header = ["run", "epochs", "dev %", "test %", "best ep", "epoch s", "x", "backward s", "x", "linear bwd s", "x", "sizes"]
    lines = []
    for r in rows:
        def ratio(key):
            value = r.get(key)
            return "-" if value is None else f"{value:.2f}"
        lines.append([r["name"], f"{r.get('epochs_done', r['epochs'])}/{r['epochs']}", f"{r['dev_acc']:.2f}", f"{r['test_acc']:.2f}", str(r["best_epoch"] + 1),
                      f"{r['epoch_s']:.2f}", ratio("epoch_speedup"), f"{r['backward_s']:.2f}", ratio("backward_speedup"),
                      f"{r['linear_backward_s']:.2f}", ratio("linear_backward_speedup"),
                      "-" if "hidden_sizes" not in r else "/".join(map(str, r["hidden_sizes"]))])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*line) for line in lines])


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), platform=platform.platform(),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def plot(report: dict, path: Path) -> None:
    """Test accuracy vs k and backward speedup vs k (per mode), dense baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_rows = report["accuracy"]["runs"]
    time_rows = report["timing"]["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    dense = next((r for r in acc_rows if r["mode"] == "dense"), None)
    modes = sorted({r["mode"] for r in acc_rows + time_rows if r["mode"] != "dense" and r.get("k")})
    for mode in modes:
        pts = sorted((r["k"], r["test_acc"]) for r in acc_rows if r["mode"] == mode and "hidden_sizes" not in r)
        if pts:
            left.plot(*zip(*pts), "o-", label=mode)
        pts = sorted((r["k"], r["linear_backward_speedup"], r["epoch_speedup"]) for r in time_rows if r["mode"] == mode)
        if pts:
            ks, bwd, ep = zip(*pts)
            right.plot(ks, bwd, "o-", label=f"{mode}: linear backward")
            right.plot(ks, ep, "s--", label=f"{mode}: epoch")
    if dense is not None:
        left.axhline(dense["test_acc"], color="k", ls=":", label="dense baseline")
    right.axhline(1.0, color="k", ls=":")
    left.set(xlabel="k (of 500)", ylabel="test accuracy at best dev (%)", title="MNIST MLP 500-500, 20 epochs")
    right.set(xlabel="k (of 500)", ylabel="speedup over dense", title="speedup vs k (timed runs)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="runs: " + ", ".join(PRESETS))
    parser.add_argument("--runs", default=",".join(PRESETS), help="comma-separated preset runs (default: all)")
    parser.add_argument("--mode", choices=meprop.MODES, help="train one custom meProp mode (with --k) plus the dense baseline")
    parser.add_argument("--k", type=int, help="k of the custom run (default 30), or override k of every preset run")
    parser.add_argument("--output-k", action="store_true", help="apply k to the output layer too (seed: dense)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--train-size", type=int, help="train on only the first N non-dev images")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help=f"MNIST IDX files (default {DEFAULT_DATA})")
    parser.add_argument("--quick", action="store_true", help="2 epochs on 10,000 images: a few minutes in all")
    parser.add_argument("--checkpoint", type=Path, metavar="DIR", help="save every run's state here after each epoch")
    parser.add_argument("--resume", action="store_true", help="continue the runs saved in --checkpoint DIR")
    parser.add_argument("--stop-after", type=float, metavar="SECONDS", help="stop (resumable) after the epoch that passes this")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--skip-epochs", type=int, default=0, help="leave the first N epochs out of the mean times (warm-up)")
    parser.add_argument("--json", type=Path, help="write the results (or the combined report) here")
    parser.add_argument("--plot", type=Path, help="with --combine: write the PNG here")
    parser.add_argument("--combine", nargs=2, type=Path, metavar=("ACCURACY_JSON", "TIMING_JSON"),
                        help="merge a full-protocol run's JSON (accuracy) and a timed run's JSON (speed) into one report")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--report-only", action="store_true",
                        help="no training: summarise the runs saved in --checkpoint DIR (unfinished ones marked)")
    args = parser.parse_args(argv)
    if args.report_only and args.checkpoint is None:
        parser.error("--report-only needs --checkpoint DIR")
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint DIR")
    if args.stop_after is not None and args.checkpoint is None:
        parser.error("--stop-after needs --checkpoint DIR (to resume from)")
    unknown = [r for r in args.runs.split(",") if r not in PRESETS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {list(PRESETS)}")
    return args


def configs_from_args(args) -> list[RunConfig]:
    common = dict(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, output_k=args.output_k,
                  train_size=args.train_size)
    if args.quick:
        common.update(epochs=2 if args.epochs == 20 else args.epochs, train_size=args.train_size or 10000)
    if args.mode is not None:
        return [RunConfig("dense", **common), RunConfig(f"{args.mode}-{args.k or 30}", mode=args.mode, k=args.k or 30, **common)]
    configs = []
    for name in args.runs.split(","):
        preset = dict(PRESETS[name])
        if args.k is not None and preset.get("k") is not None:
            preset["k"] = args.k
            name = f"{preset['mode']}-{args.k}" if not preset.get("simp") else name
        configs.append(RunConfig(name, **preset, **common))
    return configs


def combine(accuracy_path: Path, timing_path: Path) -> dict:
    """One report: accuracy from the full-protocol JSON, speed from the timed JSON."""
    full = json.loads(accuracy_path.read_text())
    timed = json.loads(timing_path.read_text())
    add_speedups(timed["runs"])  # the full runs' times were taken under load: no speedups from them
    full["runs"] = [{k: v for k, v in r.items() if not k.endswith("_speedup")} for r in full["runs"]]
    return dict(
        description="meProp / meSimp on MNIST (benchmarks/mnist.py). Accuracies: 'accuracy' (full protocol). "
        "Times and speedups: 'timing' (a separate short run with the CPU to itself).",
        accuracy=dict(how="full protocol, run as a background job next to other jobs on a shared CPU: its times are NOT "
                      "speed measurements", **full),
        timing=dict(how="short run of the same configurations under /work/bin/cpu-job timed (nothing else running); "
                    "epoch_s = wall time of the training loop per epoch (no evaluation); backward_s = loss.backward() "
                    "calls; linear_backward_s = time inside the linear layers' autograd nodes (node pre/post hooks); "
                    "means over the timed epochs; speedup = dense time / run time", **timed),
        paper=PAPER,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.combine:
        report = combine(*args.combine)
        print(format_table(report["accuracy"]["runs"], markdown=True))
        print()
        print(format_table(report["timing"]["runs"], markdown=True))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.plot:
            plot(report, args.plot)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_splits(args.data_dir)
    configs = configs_from_args(args)
    if args.checkpoint:
        args.checkpoint.mkdir(parents=True, exist_ok=True)
    stop_at = time.time() + args.stop_after if args.stop_after is not None else None
    rows = []
    for config in configs:
        path = args.checkpoint / f"{config.name}.pt" if args.checkpoint else None
        if args.report_only:
            if not path.exists():
                print(f"{config.name}: no checkpoint in {args.checkpoint}", file=sys.stderr)
                continue
            state = RunState(**torch.load(path, weights_only=False)["state"])
            rows.append(summarise(config, state, args.skip_epochs) | dict(complete=state.finished))
            continue
        try:
            state = train(config, data, path, args.resume, progress=not args.no_progress, stop_at=stop_at)
        except StopRequested as stop:
            print(f"{stop}; rerun with --resume to continue", file=sys.stderr)
            return 3
        rows.append(summarise(config, state, args.skip_epochs) | dict(complete=True))
    add_speedups(rows)
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = dict(machine=machine(), protocol=dict(args=vars(args) | dict(data_dir=str(args.data_dir))), runs=rows)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
