#!/usr/bin/env python3
"""Reproduce meProp (Sun et al., ICML 2017) and meSimp on MNIST: the command line over ``meprop.mnist``.

The seed's protocol (see ``meprop.mnist``): MLP 784-500-500-10, ReLU, dropout 0.1, Adam 1e-3, batch 50,
20 epochs, dev = the first 5,000 training images, test accuracy at the best-dev epoch, output layer dense
(``--output-k`` applies k there too). Weights: ``nn.Linear``'s default initialisation.

Runs (``--runs``): dense, unified-30, per_example-30, random_unified-30, random_per_example-30, unified-80,
mesimp (per-example top-160, prune threshold 0.1, the seed's 5-epoch cycles with 8 prunes per epoch in even
cycles), kdim-30 (the paper's k-dimensional baseline: a dense MLP whose hidden size is 30),
unified-30-sparse_step (row-sparse weight gradients stepped by SparseAdam: only the selected rows change).
``--mode``/``--k`` train one custom configuration (plus the dense baseline); ``--k 0`` means dense, as in the
seed. ``--seeds 1,2,3`` repeats every run per seed; the table then shows mean +- std over the seeds.

Times per epoch are the training loop's (no evaluation): ``epoch_s``, ``backward_s`` (the ``loss.backward()``
calls: the paper's backprop time), ``linear_backward_s`` (inside the linear layers' autograd nodes),
``forward_s``, ``step_s``. Speedups: the dense run's time (same seed, same invocation) over each run's.

Examples::

    python benchmarks/mnist.py --quick
    python benchmarks/mnist.py --runs dense,unified-30 --seeds 1,2,3 --checkpoint ckpt --resume --json out.json
    python benchmarks/mnist.py --combine full.json timing.json --json mnist.json --plot mnist.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from datetime import datetime, timezone

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import meprop  # noqa: E402
from meprop.mnist import (  # noqa: E402
    PAPER, PRESETS, RunConfig, RunState, StopRequested, add_speedups, aggregate, load_splits, summarise, train,
)

DEFAULT_DATA = Path(os.environ.get("MEPROP_DATA", ROOT.parent / "shared" / "data")) / "mnist"


# -------------------------------------------------------------------------------------------- results
def format_table(rows: list[dict], markdown: bool = False) -> str:
    """Accuracy and time table of :func:`meprop.mnist.aggregate` rows: mean +- std over the seeds; times per
    epoch in seconds, speedups vs the dense run of the same seed (means over the seeds)."""
    header = ["run", "seeds", "dev %", "test %", "epoch s", "x", "backward s", "x", "linear bwd s", "x", "step s", "x",
              "sizes"]
    lines = []
    for r in rows:
        def ratio(key):
            value = r.get(key)
            return "-" if value is None else f"{value:.2f}"

        sizes = "-" if "hidden_sizes" not in r else " ".join("/".join(map(str, h)) for h in r["hidden_sizes"])
        lines.append([r["name"], str(len(r["seeds"])), f"{r['dev_acc']:.2f}", f"{r['test_acc']:.2f} +- {r['test_acc_std']:.2f}",
                      f"{r['epoch_s']:.2f}", ratio("epoch_speedup"), f"{r['backward_s']:.2f}", ratio("backward_speedup"),
                      f"{r['linear_backward_s']:.2f}", ratio("linear_backward_speedup"), f"{r['step_s']:.2f}",
                      ratio("step_speedup"), sizes])
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

    def curve(rows):  # the plain top-k / random-k runs (no meSimp, no sparse step)
        return [r for r in aggregate(rows) if "hidden_sizes" not in r and not r["name"].endswith("sparse_step")]

    acc_rows, time_rows = curve(report["accuracy"]["runs"]), curve(report["timing"]["runs"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    dense = next((r for r in acc_rows if r["name"] == "dense"), None)
    modes = sorted({r["mode"] for r in acc_rows + time_rows if r["mode"] != "dense" and r.get("k")})
    for mode in modes:
        pts = sorted((r["k"], r["test_acc"], r["test_acc_std"]) for r in acc_rows if r["mode"] == mode)
        if pts:
            ks, acc, std = zip(*pts)
            left.errorbar(ks, acc, yerr=std, fmt="o-", capsize=3, label=mode)
        pts = sorted((r["k"], r["linear_backward_speedup"], r["epoch_speedup"]) for r in time_rows if r["mode"] == mode)
        if pts:
            ks, bwd, ep = zip(*pts)
            right.plot(ks, bwd, "o-", label=f"{mode}: linear backward")
            right.plot(ks, ep, "s--", label=f"{mode}: epoch")
    if dense is not None:
        left.axhline(dense["test_acc"], color="k", ls=":", label="dense baseline")
    for r in acc_rows:
        if r["name"].startswith("kdim-"):
            left.plot([r["hidden"]], [r["test_acc"]], "kx", label=f"dense, hidden {r['hidden']:.0f} (k-dim net)")
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
    parser.add_argument("--k", type=int, help="k of the custom run (default 30; 0: dense), or override k of every preset run")
    parser.add_argument("--output-k", action="store_true", help="apply k to the output layer too (seed: dense)")
    parser.add_argument("--sparse-step", action="store_true", help="the custom run steps its weights with SparseAdam")
    parser.add_argument("--hidden", type=int, default=500, help="units per hidden layer (default 500)")
    parser.add_argument("--layers", type=int, default=2, help="number of hidden layers (default 2)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout after each hidden layer (default 0.1)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="1", help="comma-separated seeds; every run once per seed (default 1)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--train-size", type=int, help="train on only the first N non-dev images")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
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
    if args.k is not None and args.k < 0:
        parser.error(f"--k: must be >= 0 (0: dense), got {args.k}")
    if args.k == 0 and args.mode is None:
        parser.error("--k 0 (dense) goes with --mode; the dense preset run is --runs dense")
    if args.hidden < 1 or args.layers < 1 or not 0 <= args.dropout < 1:
        parser.error("--hidden and --layers must be >= 1 and --dropout in [0, 1)")
    try:
        args.seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    unknown = [r for r in args.runs.split(",") if r not in PRESETS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {list(PRESETS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return args


def configs_from_args(args) -> list[RunConfig]:
    """The runs to train, seed after seed (every run of one seed before the next seed)."""
    common = dict(epochs=args.epochs, batch_size=args.batch_size, output_k=args.output_k, train_size=args.train_size,
                  hidden=args.hidden, layers=args.layers, dropout=args.dropout)
    if args.quick:
        common.update(epochs=2 if args.epochs == 20 else args.epochs, train_size=args.train_size or 10000)
    configs = []
    for seed in args.seeds:
        if args.mode is not None:
            k = 30 if args.k is None else args.k
            configs.append(RunConfig("dense", seed=seed, **common))
            if k > 0:
                name = f"{args.mode}-{k}" + ("-sparse_step" if args.sparse_step else "")
                configs.append(RunConfig(name, mode=args.mode, k=k, sparse_step=args.sparse_step, seed=seed, **common))
            continue
        for name in args.runs.split(","):
            preset = dict(common, **PRESETS[name])
            if args.k is not None and preset.get("k") is not None:
                preset["k"] = args.k
                name = name if preset.get("simp") else name.replace(f"-{PRESETS[name]['k']}", f"-{args.k}", 1)
            elif args.k is not None and name.startswith("kdim-"):
                preset["hidden"], name = args.k, f"kdim-{args.k}"
            configs.append(RunConfig(name, seed=seed, **preset))
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
        print(format_table(aggregate(report["accuracy"]["runs"]), markdown=True))
        print()
        print(format_table(aggregate(report["timing"]["runs"]), markdown=True))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.plot:
            plot(report, args.plot)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_splits(args.data_dir, args.device)
    configs = configs_from_args(args)
    if args.checkpoint:
        args.checkpoint.mkdir(parents=True, exist_ok=True)
    stop_at = time.time() + args.stop_after if args.stop_after is not None else None
    rows = []
    for config in configs:
        path = args.checkpoint / f"{config.name}-seed{config.seed}.pt" if args.checkpoint else None
        if args.report_only:
            if not path.exists():
                print(f"{config.name}: no checkpoint in {args.checkpoint}", file=sys.stderr)
                continue
            state = RunState(**torch.load(path, weights_only=False)["state"])
            rows.append(summarise(config, state, args.skip_epochs) | dict(complete=state.finished))
            continue
        try:
            state = train(config, data, path, args.resume, progress=not args.no_progress, stop_at=stop_at,
                          device=args.device)
        except StopRequested as stop:
            print(f"{stop}; rerun with --resume to continue", file=sys.stderr)
            return 3
        rows.append(summarise(config, state, args.skip_epochs) | dict(complete=True))
    add_speedups(rows)
    print(format_table(aggregate(rows)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = dict(machine=machine(), protocol=dict(args=vars(args) | dict(data_dir=str(args.data_dir))), runs=rows,
                      summary=[{k: v for k, v in r.items()} for r in aggregate(rows)])
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
