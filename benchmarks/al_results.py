"""AL vs backprop over seeds, scaled to a shared 2-core CPU: runs ``python -m al.train`` per (row, method, seed),
keeps each run's summary in benchmarks/results/al.json, and writes al.md (mean +- std table) and al.png
(validation accuracy per epoch) from it.

    python benchmarks/al_results.py --rows 'rotten_tomatoes-*' --jobs 2
    python benchmarks/al_results.py --list
    python benchmarks/al_results.py --report

A row is a data set, a model and an architecture (``--arch compact`` or ``seed``); AL and BP train with the
same options (a row in SWEEPS: each method's options chosen on validation from a few candidates), are tested on
the model of their best validation epoch (validation split, or 10% held out of train for MNIST and sst2), one
torch thread per run. Runs already in al.json with the same command are skipped (``--force`` redoes them; a
changed row setting reruns its runs); ``--budget SECONDS`` stops starting new runs after that time, so a
campaign can be split into pieces.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = Path(os.environ.get("MEPROP_DATA", ROOT.parent / "shared" / "data"))
GLOVE = "vectors/glove.6B.50d.top5k_rounded6.txt"
README = ROOT / "al" / "README.md"  # its results tables are written by --report
METHODS = ("al", "bp")
OLD_MACHINE = "AMD EPYC (x86_64), 2 cores, torch 2.13.0+cpu"  # runs recorded before runs carried their machine

MNIST = ["--dataset", "mnist", "--valid-fraction", "0.1", "--batch-size", "64"]
TEXT = ["--vocab-size", "10000", "--batch-size", "32", "--embeddings", "$MEPROP_DATA/" + GLOVE]
SEED_TR = ["--heads", "5", "--feedforward", "256", "--autoencoder-lr", "5e-4"]  # 50-d GloVe: 5 heads of 10
COMPACT_TR = ["--d-model", "64", "--heads", "4", "--feedforward", "128"]
DATASETS = {  # dataset -> extra options (data scaled down; see SCALED)
    "rotten_tomatoes": ["--dataset", "rotten_tomatoes", "--max-len", "29", "--train-limit", "4000", "--epochs", "24"],
    "emotion": ["--dataset", "emotion", "--max-len", "57", "--train-limit", "4000", "--epochs", "25"],
    "sst2": ["--dataset", "sst2", "--max-len", "57", "--train-limit", "4000", "--valid-fraction", "0.1",
             "--epochs", "24"],
    "emotion_all": ["--dataset", "emotion", "--max-len", "57", "--epochs", "20"],  # the whole 16,000 texts
}
ROWS = {
    "mnist-mlp-compact": [*MNIST, "--model", "mlp", "--hidden", "256", "--components", "3", "--epochs", "10",
                          "--train-limit", "20000"],
    "mnist-cnn-compact": [*MNIST, "--model", "cnn", "--channels", "16,32,64", "--epochs", "30",
                          "--train-limit", "8000"],
}
for _name, _data in DATASETS.items():
    ROWS[f"{_name}-lstm-seed"] = [*_data, *TEXT, "--model", "lstm", "--arch", "seed", "--hidden", "64"]
    ROWS[f"{_name}-transformer-seed"] = [*_data, *TEXT, "--model", "transformer", "--arch", "seed", *SEED_TR]
    ROWS[f"{_name}-lstm-compact"] = [*_data, *TEXT, "--model", "lstm", "--hidden", "64"]
    ROWS[f"{_name}-transformer-compact"] = [*_data, *TEXT, "--model", "transformer", *COMPACT_TR]
LONGER = {"emotion-lstm-seed": 40}  # rows whose curves (both methods) still rose at the data set's budget
for _row, _epochs in LONGER.items():
    ROWS[_row][ROWS[_row].index("--epochs") + 1] = str(_epochs)
# Rows whose options are chosen on validation: per method, candidate extra options (``[]``: the row's own), each
# trained on SWEEP_SEED; the candidate with the best validation accuracy is used for every seed of the row.
SWEEPS = {
    "emotion_all-lstm-seed": {"al": ([], ["--autoencoder-lr", "5e-4"], ["--autoencoder-lr", "2e-3"]),
                              "bp": ([], ["--lr", "5e-4"], ["--lr", "2e-3"])},
}
SWEEP_SEED = 0
FIVE_SEEDS = ("rotten_tomatoes", "sst2")  # 1,066 and 872 test texts: 1-1.5 points of sampling noise per run


def seeds_for(row: str) -> tuple[int, ...]:
    """The row's default seeds: 0-4 on the data sets with small test sets, else 0-2."""
    return (0, 1, 2, 3, 4) if row.split("-")[0] in FIVE_SEEDS else (0, 1, 2)

# emotion's 4,000-text rows: a scale-down study, reported apart; the table (and the goals) use the whole set
SUPERSEDED = {f"emotion-{m}" for m in ("lstm-seed", "transformer-seed", "lstm-compact", "transformer-compact")}
SCALED = (
    "MNIST: MLP 3 components x 256 units, 20,000 training images, 10 epochs; CNN 3 conv components (16/32/64 "
    "channels), 8,000 training images, 30 epochs; 10% of the training images held out for validation. Text: "
    "rotten_tomatoes and sst2 on 4,000 training texts (of 8,530 and 67,349), 24 epochs, 5 seeds (small test "
    "sets); emotion (emotion_all) on "
    "the whole 16,000 texts, 20 epochs; batch 32, GloVe 50-d limited to the 5,050 most frequent words (the seed: "
    "300-d GloVe, so the seed Transformer's d_model is 50 with 5 heads instead of 300 with 4), vocabulary 10,000, "
    "max_len in tokens from the seed's presets (rotten_tomatoes 29; emotion and sst2 57); seed LSTM l1_dim 64 "
    "(seed presets: 256), seed Transformer d_ff 256, autoencoder lr 5e-4; compact LSTM 64 units per direction, "
    "compact Transformer d_model 64, 4 heads, d_ff 128. sst2 is tested on GLUE's labelled dev set (872), "
    "validated on 10% of train. The emotion rows on 4,000 texts (25 epochs, with the seed LSTM 40) are listed "
    "apart, outside the goal count."
)


def run_key(row: str, method: str, seed: int) -> str:
    return f"{row}/{method}/seed{seed}"


def argv_for(row: str, method: str, seed: int, extra=()) -> list[str]:
    return [*ROWS[row], *extra, "--method", method, "--seed", str(seed), "--threads", "1", "--no-progress"]


def load() -> dict:
    path = RESULTS / "al.json"
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save(data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    temporary = RESULTS / ".al.json.tmp"
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, RESULTS / "al.json")


def one_run(row: str, method: str, seed: int, extra=()) -> dict:
    argv = argv_for(row, method, seed, extra)
    real = [a.replace("$MEPROP_DATA", str(DATA)) for a in argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "al.train", *real, "--results", str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{row} {method} seed {seed} failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(out.read_text())
    monitor = "validation_accuracy"
    return {
        "test_accuracy": summary["test_accuracy"],
        "selected_epoch": summary["selected_epoch"],
        "best_validation_accuracy": summary["best_validation_accuracy"],
        "validation_curve": [h[monitor] for h in summary["history"]],
        "train_examples": summary["train_examples"],
        "test_examples": summary["test_examples"],
        "parameters": summary["parameters"],
        "seconds": round(time.perf_counter() - t0, 1),
        "command": command_for(row, method, seed, extra),
        "machine": _machine(),
        "date_utc": started.strftime("%Y-%m-%d %H:%M"),
    }


def campaign(patterns, seeds, jobs, budget, force) -> None:
    """First the validation sweeps of the chosen rows (SWEEPS, on SWEEP_SEED), then each row's seeds (``seeds``,
    or :func:`seeds_for` when None) with the selected options. A run whose command is already recorded (as a
    seed run or a sweep candidate) is copied, not redone; sweep candidates keep their own copy under "sweeps"."""
    rows = [r for r in ROWS if any(fnmatch.fnmatch(r, p) for p in patterns)]
    deadline = time.monotonic() + budget if budget else None
    data = load()
    sweep = []
    for r, m, c in ((r, m, c) for r in rows if r in SWEEPS for m in METHODS for c in SWEEPS[r][m]):
        known = None if force else find_record(data, command_for(r, m, SWEEP_SEED, c))
        if known is not None:
            data.setdefault("sweeps", {})[sweep_key(r, m, c)] = known
        else:
            sweep.append((r, m, SWEEP_SEED, tuple(c)))
    save(data)
    _run_all(sweep, jobs, deadline, lambda row, method, seed, extra: ("sweeps", sweep_key(row, method, extra)))
    data = load()
    todo = []
    for r, m, s in ((r, m, s) for r in rows for s in (seeds or seeds_for(r)) for m in METHODS):
        extra = selected_options(data, r, m)
        if extra is None:
            print(f"{r} {m}: its validation sweep is unfinished, no seed run started", file=sys.stderr)
            continue
        command = command_for(r, m, s, extra)
        if not force and data["runs"].get(run_key(r, m, s), {}).get("command") == command:
            continue
        known = None if force else find_record(data, command)
        if known is not None:
            data["runs"][run_key(r, m, s)] = known
        else:
            todo.append((r, m, s, tuple(extra)))
    save(data)
    _run_all(todo, jobs, deadline, lambda row, method, seed, extra: ("runs", run_key(row, method, seed)))


def _run_all(todo, jobs, deadline, where) -> None:
    """Runs ``(row, method, seed, extra)`` items ``jobs`` at a time; each record is saved at ``where(*item)``."""
    print(f"{len(todo)} runs to do", file=sys.stderr)

    def work(item):
        if deadline and time.monotonic() > deadline:
            return item, None
        return item, one_run(*item)

    with ThreadPoolExecutor(jobs) as pool:
        for item, record in pool.map(work, todo):
            if record is None:
                continue
            section, key = where(*item)
            data = load()
            data.setdefault(section, {})[key] = record
            data["runs_at_a_time"] = jobs
            data.pop("machine", None)  # each run now records its own
            data["scaled_down"] = SCALED
            save(data)
            print(f"{section} {key}: test {record['test_accuracy']:.4f} (epoch {record['selected_epoch']}), "
                  f"{record['seconds']} s", file=sys.stderr, flush=True)


def command_for(row: str, method: str, seed: int, extra=()) -> str:
    return "python -m al.train " + " ".join(argv_for(row, method, seed, extra))


def sweep_key(row: str, method: str, extra) -> str:
    return f"{row}/{method}/{' '.join(extra) or 'row options'}"


def find_record(data: dict, command: str) -> dict | None:
    """A recorded run (seed run or sweep candidate) made with exactly this command, else None."""
    for record in (*data["runs"].values(), *data.get("sweeps", {}).values()):
        if record["command"] == command:
            return record
    return None


def sweep_results(data: dict, row: str, method: str) -> list[tuple[list[str], dict | None]]:
    """The row's candidates for one method with their SWEEP_SEED record (None while not run with today's row)."""
    out = []
    for c in SWEEPS[row][method]:
        record = data.get("sweeps", {}).get(sweep_key(row, method, c))
        current = record is not None and record["command"] == command_for(row, method, SWEEP_SEED, c)
        out.append((list(c), record if current else None))
    return out


def selected_options(data: dict, row: str, method: str) -> list[str] | None:
    """Extra options for the row's runs: ``[]`` without a sweep; else the candidate with the best validation
    accuracy on SWEEP_SEED (the first of equals), or None while a candidate has not been run."""
    if row not in SWEEPS:
        return []
    results = sweep_results(data, row, method)
    if any(record is None for _, record in results):
        return None
    return max(results, key=lambda cr: cr[1]["best_validation_accuracy"])[0]


def _machine() -> str:
    return f"{_cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {version('torch')}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def current_runs(data: dict, row: str, method: str) -> list[dict]:
    """The row's runs for one method made with today's settings (a run from an older budget, or with options its
    validation sweep did not select, is left out)."""
    extra = selected_options(data, row, method)
    if extra is None:
        return []
    return [v for k, v in sorted(data["runs"].items()) if k.startswith(f"{row}/{method}/")
            and v["command"] == command_for(row, method, int(k.rsplit("seed", 1)[1]), extra)]


def aggregate(data: dict) -> list[dict]:
    """Per row and method: mean and std (sample, n-1) of the selected models' test accuracy over seeds."""
    out = []
    for row in ROWS:
        entry = {"row": row}
        for method in METHODS:
            runs = current_runs(data, row, method)
            acc = [100 * r["test_accuracy"] for r in runs]
            entry[method] = {"n": len(acc), "mean": statistics.mean(acc) if acc else None,
                             "best_epochs": [r["selected_epoch"] for r in runs],
                             "epochs": max((len(r["validation_curve"]) for r in runs), default=0),
                             "std": statistics.stdev(acc) if len(acc) > 1 else None,
                             "curve": [statistics.mean(c) * 100 for c in zip(*(r["validation_curve"] for r in runs))]
                             if runs else []}
            entry[method]["late_gain"] = late_gain(entry[method]["curve"])
        if entry["al"]["mean"] is not None and entry["bp"]["mean"] is not None:
            entry["al_minus_bp"] = entry["al"]["mean"] - entry["bp"]["mean"]
        out.append(entry)
    return out


def late_gain(curve: list[float]) -> float | None:
    """Mean of the last quarter of a validation curve minus the mean of the quarter before (None if < 4 epochs):
    about zero, or below, once training has converged."""
    q = len(curve) // 4
    return statistics.mean(curve[-q:]) - statistics.mean(curve[-2 * q:-q]) if q else None


def sync_blocks(path: Path, blocks: dict[str, str]) -> None:
    """Replaces the text between ``<!-- al_results:NAME -->`` and ``<!-- /al_results:NAME -->`` in ``path`` with
    ``blocks[NAME]``, for every name (each marker pair must be there once)."""
    text = path.read_text()
    for name, body in blocks.items():
        start, end = f"<!-- al_results:{name} -->\n", f"<!-- /al_results:{name} -->"
        if text.count(start) != 1 or text.count(end) != 1:
            raise ValueError(f"{path} needs one {start.strip()} ... {end} pair")
        head, rest = text.split(start)
        text = head + start + body + rest[rest.index(end):]
    path.write_text(text)


def report(readme: Path | None = None) -> None:
    """Writes al.md, al.png and the summary in al.json; with ``readme``, also its tables (see :func:`sync_blocks`)."""
    data = load()
    rows = aggregate(data)
    data["summary"] = [{k: v for k, v in r.items()} for r in rows]
    save(data)
    fmt = lambda m: f"{m['mean']:.2f} ± {m['std']:.2f}" if m["std"] is not None else (  # noqa: E731
        f"{m['mean']:.2f}" if m["mean"] is not None else "—")
    gain = lambda g: "—" if g is None else f"{g:+.2f}"  # noqa: E731

    def table(selected):
        lines = ["| row (data-model-arch) | AL test acc. (%) | BP test acc. (%) | AL − BP | seeds | best epochs AL; BP "
                 "| late gain AL; BP |", "|---|---|---|---|---|---|---|"]
        for r in selected:
            diff = f"{r['al_minus_bp']:+.2f}" if "al_minus_bp" in r else "—"
            best = "; ".join(",".join(map(str, r[m]["best_epochs"])) for m in METHODS)
            budget = max(r["al"]["epochs"], r["bp"]["epochs"])
            lines.append(f"| {r['row']} | {fmt(r['al'])} | {fmt(r['bp'])} | {diff} | {r['al']['n']}/{r['bp']['n']} | "
                         f"{f'{best} (of {budget})' if budget else '—'} | "
                         f"{'; '.join(gain(r[m]['late_gain']) for m in METHODS)} |")
        return lines

    counted = [r for r in rows if r["row"] not in SUPERSEDED]
    lines = table(counted)
    done = [r for r in counted if "al_minus_bp" in r]
    used = [run for row in ROWS for m in METHODS for run in current_runs(data, row, m)]
    blocks = {"table": "\n".join(lines) + "\n\n" + (
        f"{sum(r['al_minus_bp'] >= -0.5 for r in done)} of {len(done)} rows AL >= BP - 0.5; "
        f"{sum(r['al_minus_bp'] >= 0 for r in done)} of {len(done)} AL >= BP.\n")}
    text = blocks["table"] + "\n" + (
        f"Measured {min(r['date_utc'] for r in used)} to {max(r['date_utc'] for r in used)} UTC on "
        f"{'; '.join(sorted({r.get('machine', OLD_MACHINE) for r in used}))}; 1 torch thread per run, "
        f"{data.get('runs_at_a_time', 2)} runs at a time. Test accuracy of "
        f"each run's best validation epoch, mean ± sample std over the seeds. Late gain: the seed-mean validation "
        f"accuracy over the last quarter of the epochs minus over the quarter before (points; about zero or below "
        f"once a method has converged). Scaled down: {SCALED}\n")
    swept = [row for row in ROWS if row in SWEEPS and row not in SUPERSEDED]
    blocks["sweeps"] = ""
    if swept:
        text += (f"\nOptions chosen on validation (one run per candidate, seed {SWEEP_SEED}; its best validation "
                 "accuracy, %; the chosen one is used for every seed):\n\n")
        for row in swept:
            for method in METHODS:
                chosen = selected_options(data, row, method)
                tried = [f"{' '.join(c) or 'row options'} "
                         + (f"{100 * rec['best_validation_accuracy']:.2f}" if rec else "(not run)")
                         + (" (chosen)" if c == chosen else "") for c, rec in sweep_results(data, row, method)]
                blocks["sweeps"] += f"- {row} {method.upper()}: {'; '.join(tried)}\n"
        text += blocks["sweeps"]
    apart = [r for r in rows if r["row"] in SUPERSEDED]
    blocks["apart"] = "\n".join(table(apart)) + "\n"
    if apart:
        text += ("\nScale-down study, not in the count above: emotion on 4,000 of its 16,000 training texts (the "
                 "whole-set rows are emotion_all-*).\n\n" + blocks["apart"])
    (RESULTS / "al.md").write_text("# AL vs BP (benchmarks/al_results.py)\n\n" + text)
    if readme is not None:
        sync_blocks(readme, blocks)
    print(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["al"]["curve"] or r["bp"]["curve"]]
    cols = 4
    fig, axes = plt.subplots((len(shown) + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((len(shown) + cols - 1) // cols)),
                             squeeze=False)
    for ax, r in zip(axes.flat, shown):
        for method, style in (("al", "-o"), ("bp", "--s")):
            curve = r[method]["curve"]
            ax.plot(range(1, len(curve) + 1), curve, style, label=method.upper(), markersize=3)
        ax.set_title(r["row"], fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("validation acc. (%), seed mean", fontsize=8)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(RESULTS / "al.png", dpi=90)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", action="extend", default=[],
                   help="row name patterns (fnmatch) to run; may be given more than once")
    p.add_argument("--seeds", help="comma-separated (default: 0-4 for rotten_tomatoes and sst2 rows, else 0-2)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--budget", type=float, help="start no run after this many seconds")
    p.add_argument("--force", action="store_true", help="redo runs already in al.json")
    p.add_argument("--list", action="store_true")
    p.add_argument("--report", action="store_true",
                   help="write al.md, al.png, the summary in al.json and the tables in al/README.md")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(ROWS))
    if args.rows:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        campaign(args.rows, seeds, args.jobs, args.budget, args.force)
    if args.report:
        report(README)


if __name__ == "__main__":
    main()
