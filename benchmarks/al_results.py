"""AL vs backprop results, scaled to finish on a 2-core CPU: one configuration per call, merged into
benchmarks/results/al.json; ``--table`` prints the Markdown table from that file.

    /work/bin/cpu-job heavy python benchmarks/al_results.py --run mnist-mlp-al
    python benchmarks/al_results.py --list
    python benchmarks/al_results.py --table

Each run calls ``al.train`` with the data of ``$MEPROP_DATA`` (default ../shared/data) and one torch thread.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from al.data import data_dir  # noqa: E402
from al.train import main as train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "al.json"
GLOVE = "vectors/glove.6B.50d.top5k_rounded6.txt"

# dataset -> (model -> extra CLI arguments); what each one scales down is in SCALED.
TEXT_COMMON = ["--max-len", "48", "--vocab-size", "10000", "--batch-size", "64"]
CONFIGS = {
    ("mnist", "mlp"): ["--epochs", "3", "--hidden", "256", "--components", "3", "--batch-size", "128"],
    ("mnist", "cnn"): ["--epochs", "2", "--channels", "16,32,64", "--batch-size", "128", "--train-limit", "30000"],
    ("rotten_tomatoes", "lstm"): ["--epochs", "4", *TEXT_COMMON],
    ("rotten_tomatoes", "transformer"): ["--epochs", "4", *TEXT_COMMON],
    ("emotion", "lstm"): ["--epochs", "4", "--train-limit", "8000", *TEXT_COMMON],
    ("emotion", "transformer"): ["--epochs", "4", "--train-limit", "8000", *TEXT_COMMON],
    ("sst2", "lstm"): ["--epochs", "2", "--train-limit", "12000", *TEXT_COMMON],
    ("sst2", "transformer"): ["--epochs", "2", "--train-limit", "12000", *TEXT_COMMON],
}
SCALED = {
    "mnist/mlp": "3 epochs; 3 components of 256 units",
    "mnist/cnn": "30,000 of the 60,000 training images, 2 epochs, 3 conv components of 16/32/64 channels",
    "text": "GloVe 50-d limited to the 5,050 most frequent words (the seed uses 300-d GloVe); 2 components "
            "(1 BiLSTM layer of 128 units per direction, or 1 Transformer layer d_model=128 with 4 heads, per "
            "component); 48 tokens per text; vocabulary 10,000; rotten_tomatoes full 8,530 training texts, 4 "
            "epochs; emotion 8,000 of 16,000, 4 epochs; sst2 12,000 of 67,349, 2 epochs; evaluated on the "
            "test split (sst2: GLUE's labelled dev set)",
}


def run_name(dataset, model, method):
    return f"{dataset}-{model}-{method}"


RUNS = {run_name(d, m, method): (d, m, method) for (d, m) in CONFIGS for method in ("al", "bp")}


def argv_for(dataset, model, method):
    argv = ["--model", model, "--method", method, "--dataset", dataset, "--threads", "1", "--no-progress",
            "--seed", "0", *CONFIGS[dataset, model]]
    if model in ("lstm", "transformer"):
        argv += ["--embeddings", str(data_dir() / GLOVE)]
    if method == "al":
        argv += ["--exit-threshold", "0.1"]
    return argv


def merge(name, record):
    """Adds ``record`` under ``runs[name]`` of the results file (locked against concurrent runs, atomic)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.parent / ".al.lock.tmp", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
        data["scaled_down"] = SCALED
        data["runs"][name] = record
        temporary = RESULTS.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, RESULTS)


def table(data) -> str:
    lines = ["| dataset | model | AL test acc. | BP test acc. | AL - BP | AL early exit (acc., avg depth) |",
             "|---|---|---|---|---|---|"]
    for dataset, model in CONFIGS:
        al = data["runs"].get(run_name(dataset, model, "al"))
        bp = data["runs"].get(run_name(dataset, model, "bp"))
        cell = lambda r: f"{100 * r['test_accuracy']:.2f}" if r else "—"  # noqa: E731
        diff = f"{100 * (al['test_accuracy'] - bp['test_accuracy']):+.2f}" if al and bp else "—"
        exit_ = (f"{100 * al['early_exit']['accuracy']:.2f}, {al['early_exit']['average_depth']:.2f}"
                 if al and al.get("early_exit") else "—")
        lines.append(f"| {dataset} | {model} | {cell(al)} | {cell(bp)} | {diff} | {exit_} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", choices=sorted(RUNS))
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(sorted(RUNS)))
    if args.run:
        dataset, model, method = RUNS[args.run]
        argv = argv_for(dataset, model, method)
        started = datetime.datetime.now(datetime.timezone.utc)
        summary = train(argv)
        merge(args.run, {
            "test_accuracy": summary["test_accuracy"],
            "test_examples": summary["test_examples"],
            "train_examples": summary["train_examples"],
            "early_exit": summary["early_exit"],
            "history": summary["history"],
            "parameters": summary["parameters"],
            "command": "python -m al.train " + " ".join(argv).replace(str(data_dir()), "$MEPROP_DATA"),
            "date_utc": started.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
                       "1 torch thread",
        })
    if args.table:
        print(table(json.loads(RESULTS.read_text())))


if __name__ == "__main__":
    main()
