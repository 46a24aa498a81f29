"""The paper's MNIST experiment (Sun et al., ICML 2017, and meSimp) as an importable training loop.

The seed's protocol: an MLP 784-500-500-10 with ReLU and dropout 0.1, Adam (lr 1e-3), mini-batches of 50,
20 epochs; the first 5,000 training images are the dev set, the other 55,000 are trained on; the reported
test accuracy is the one at the epoch with the best dev accuracy (first such epoch). Hidden layers use
meProp; the output layer stays dense as in the seed's code (``output_k=True`` applies k there too, as the
paper describes). ``benchmarks/mnist.py`` is the command line over this module::

    from meprop import mnist
    data = mnist.load_splits("../shared/data/mnist")
    state = mnist.train(mnist.RunConfig("unified-30", mode="unified", k=30), data)
    state.test_at_best, state.history[-1]["backward_s"]

Times per epoch (training loop only, no evaluation): ``epoch_s`` (wall), ``backward_s`` (the
``loss.backward()`` calls: the paper's backprop time), ``linear_backward_s`` (time inside the linear layers'
own autograd nodes, measured with autograd node pre/post hooks), ``forward_s``, ``step_s`` (optimizer).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import optim
from .modules import convert
from .data import load_mnist, save_atomic
from .simp import Cycle, Simplifier

__all__ = [
    "PRESETS", "RunConfig", "RunState", "Splits", "StopRequested", "accuracy", "add_speedups", "aggregate",
    "build_model", "load_splits", "summarise", "train",
]

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
    """One training configuration. ``mode=None`` is a dense network (``hidden`` units in each of ``layers``
    hidden layers); ``sparse_step=True`` gives the meProp layers row-sparse weight gradients stepped by
    ``SparseAdam`` (the rest by ``Adam``), so that only the selected rows of a weight change."""

    name: str
    mode: str | None = None
    k: int | None = None
    simp: bool = False
    output_k: bool = False
    sparse_step: bool = False
    epochs: int = 20
    batch_size: int = 50
    hidden: int = 500
    layers: int = 2
    dropout: float = 0.1
    lr: float = 1e-3
    seed: int = 1
    train_size: int | None = None  # None: all 55,000 non-dev training images
    simp_threshold: float = 0.1
    simp_cycle_epochs: int = 5
    simp_prunes_per_epoch: int = 8

    def __post_init__(self) -> None:
        if self.mode is None and (self.k is not None or self.simp or self.sparse_step):
            raise ValueError(f"meprop.mnist.RunConfig {self.name!r}: k, simp and sparse_step need a meProp mode")
        if self.mode is not None and (self.k is None or self.k < 1):
            raise ValueError(f"meprop.mnist.RunConfig {self.name!r}: k must be >= 1 with mode={self.mode!r}, got {self.k}")
        if self.hidden < 1 or self.layers < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"meprop.mnist.RunConfig {self.name!r}: hidden and layers must be >= 1, 0 <= dropout < 1")


PRESETS = {  # name -> RunConfig fields; "kdim-30": the paper's k-dimensional baseline (a dense MLP of hidden size k)
    "dense": dict(),
    "unified-30": dict(mode="unified", k=30),
    "per_example-30": dict(mode="per_example", k=30),
    "random_unified-30": dict(mode="random_unified", k=30),
    "random_per_example-30": dict(mode="random_per_example", k=30),
    "unified-80": dict(mode="unified", k=80),
    "mesimp": dict(mode="per_example", k=160, simp=True),
    "kdim-30": dict(hidden=30),
    "unified-30-sparse_step": dict(mode="unified", k=30, sparse_step=True),
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


def load_splits(data_dir: str | Path, device: str | torch.device = "cpu") -> Splits:
    """The seed's split: dev = first 5,000 training images, train = the remaining 55,000 (on ``device``)."""
    mnist = load_mnist(Path(data_dir))
    train_x = mnist.train_images.reshape(len(mnist.train_images), -1).float().div_(255)
    test_x = mnist.test_images.reshape(len(mnist.test_images), -1).float().div_(255)
    splits = (train_x[DEV_SIZE:], mnist.train_labels[DEV_SIZE:], train_x[:DEV_SIZE], mnist.train_labels[:DEV_SIZE],
              test_x, mnist.test_labels)
    return Splits(*(t.to(device) for t in splits))


# ---------------------------------------------------------------------------------------------- model
def build_model(config: RunConfig, hidden_sizes: list[int] | None = None) -> nn.Sequential:
    """784 -> hidden x layers -> 10 MLP (ReLU, dropout); hidden layers meProp unless ``config.mode`` is None."""
    sizes = [784] + list(hidden_sizes or [config.hidden] * config.layers) + [10]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(config.dropout)]
    model = nn.Sequential(*layers)
    if config.mode is not None:
        model = convert(model, k=config.k, mode=config.mode, skip_last=not config.output_k,
                        sparse_grad=config.sparse_step)
    return model


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer | optim.SplitOptimizer:
    """Adam over every parameter; with ``sparse_step`` SparseAdam for the row-sparse weights, Adam for the rest."""
    if not config.sparse_step:
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    sparse, dense = optim.split_parameters(model)
    return optim.SplitOptimizer(torch.optim.SparseAdam(sparse, lr=config.lr), torch.optim.Adam(dense, lr=config.lr))


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


class StopRequested(Exception):
    """Raised when ``stop_after`` seconds have passed; the checkpoint is saved, resume to continue."""


def train(
    config: RunConfig,
    data: Splits,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: float | None = None,
    device: str | torch.device = "cpu",
) -> RunState:
    """Train ``config`` on ``data``; per-epoch dev/test accuracy and times in the returned state's history.

    With ``checkpoint`` (a file path) the model, optimizer, RNG states and progress are saved atomically
    after every epoch; with ``resume`` an existing checkpoint is continued (a resumed run ends with the
    same weights as an uninterrupted one). ``stop_at`` (a ``time.time()`` value) stops after the epoch
    during which it passes, raising :class:`StopRequested`. ``device``: where the model trains (``data``
    should be there too, see :func:`load_splits`); on CUDA the phase times are taken after a synchronize.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    train_x, train_y = data.train_x, data.train_y
    if config.train_size is not None:
        train_x, train_y = train_x[: config.train_size], train_y[: config.train_size]
    torch.manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    state = RunState()
    found = resume and checkpoint is not None and checkpoint.exists()
    saved = torch.load(checkpoint, weights_only=False, map_location=device) if found else None
    if saved is not None:
        if saved["config"] != asdict(config):
            raise ValueError(f"--resume: checkpoint {checkpoint} was made with a different configuration")
        state = RunState(**saved["state"])
        if state.finished:
            return state
    model = build_model(config, state.hidden_sizes or None).to(device)
    optimizer = build_optimizer(config, model)
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
            perm = torch.randperm(len(train_x), generator=order).to(device)
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
                sync()
                t1 = time.perf_counter()
                loss.backward()
                sync()
                t2 = time.perf_counter()
                optimizer.step()
                sync()
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
                save_atomic(
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
    keys = ("epoch_s", "backward_s", "linear_backward_s", "forward_s", "step_s")
    mean = {key: sum(r[key] for r in timed) / len(timed) for key in keys}
    row = dict(name=config.name, mode=config.mode or "dense", k=config.k, seed=config.seed, hidden=config.hidden,
               layers=config.layers, output_k=config.output_k, sparse_step=config.sparse_step, epochs=config.epochs,
               epochs_done=state.epoch, best_epoch=state.best_epoch, dev_acc=state.best_dev,
               test_acc=state.test_at_best, final_test_acc=state.history[-1]["test"], timed_epochs=len(timed),
               **mean, history=state.history)
    if config.simp:
        row["hidden_sizes"] = state.hidden_sizes
    return row


def add_speedups(rows: list[dict], baseline: str = "dense") -> None:
    """Add ``baseline``-time / run-time ratios (epoch, backward, linear backward) to every row in place,
    against the baseline row of the same seed; rows without one get none."""
    dense = {r.get("seed"): r for r in rows if r["name"] == baseline}
    for row in rows:
        base = dense.get(row.get("seed"))
        if base is None:
            continue
        for key in ("epoch_s", "backward_s", "linear_backward_s", "step_s"):
            row[f"{key.removesuffix('_s')}_speedup"] = base[key] / row[key] if row[key] > 0 else None

def aggregate(rows: list[dict]) -> list[dict]:
    """One row per run name over its seeds: mean and sample std of test/dev accuracy and of every time and
    speedup (std 0 for a single seed), the seeds, and each seed's test accuracy."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    out = []
    for name, group in by_name.items():
        agg = {key: group[0][key] for key in ("name", "mode", "k", "output_k", "epochs") if key in group[0]}
        agg.update(seeds=[r.get("seed") for r in group], test_accs=[r["test_acc"] for r in group])
        for key in group[0]:
            values = [r.get(key) for r in group]
            if key in agg or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                continue
            if key in ("seed", "epochs_done", "best_epoch", "timed_epochs"):
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            agg[key], agg[f"{key}_std"] = mean, std
        if "hidden_sizes" in group[0]:
            agg["hidden_sizes"] = [r["hidden_sizes"] for r in group]
        out.append(agg)
    return out
