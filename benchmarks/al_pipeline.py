"""Throughput of Associated Learning: sequential on 2 threads vs a 2-stage al.pipeline with 1 thread per stage.

    python benchmarks/al_pipeline.py --model mlp     # MLP on MNIST
    python benchmarks/al_pipeline.py --model lstm    # BiLSTM on rotten_tomatoes

Sequential: ``ALModel.train_step`` in this process with ``torch.set_num_threads(2)``. Pipeline: ``torchrun
--standalone --nproc-per-node 2 -m al.pipeline --threads 1`` (its last stage times the batches). Both train
the same model on the same batches (epoch 1's order) and report samples/s over the same ``--batches`` batches
after ``--warmup`` batches; data loading is included in both. Each measurement is repeated ``--repeats``
times, alternating, and the median is kept. The result is merged into ``benchmarks/results/al_pipeline.json``
under the model's name, with the machine and date. Run it alone on the machine (``cpu-job timed``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from al.models import build_model  # noqa: E402
from al.train import build_data, make_loader, model_options, parse_args, unpack_batch  # noqa: E402

DATA = Path(os.environ.get("MEPROP_DATA", REPO_ROOT.parent / "shared" / "data"))
RT = DATA / "text" / "rotten_tomatoes"

# Sizes where the two stages do about the same work and a batch's compute dwarfs sending its (s, t).
CONFIGS = {
    "mlp": {
        "argv": ["--model", "mlp", "--dataset", "mnist", "--components", "4", "--hidden", "1024",
                 "--label-dim", "128", "--batch-size", "128", "--lr", "1e-3"],
        "split": "2,2",
        "why": "4 components of 1024 units (784->1024, then 1024->1024), two per stage: the stages differ only "
               "by the first layer's 784 vs 1024 inputs; a batch of 128 sends s (128x1024) and t (128x128).",
    },
    "lstm": {
        "argv": ["--model", "lstm", "--train-file", str(RT / "train.tsv"), "--test-file", str(RT / "test.tsv"),
                 "--components", "2", "--hidden", "128", "--embedding-dim", "256", "--vocab-size", "5000",
                 "--max-len", "48", "--label-dim", "128", "--batch-size", "64", "--lr", "1e-3"],
        "split": "1,1",
        "why": "2 BiLSTM components, one per stage, 128 units per direction; the 256-d embedding equals the "
               "second LSTM's input width so both LSTMs cost the same; a 5,000-word vocabulary keeps the "
               "first stage's dense embedding update small.",
    },
}


def sequential_samples_per_s(argv, threads: int, warmup: int, batches: int) -> float:
    """``ALModel.train_step`` on ``threads`` threads, timed over ``batches`` batches after ``warmup``."""
    args = parse_args([*argv, "--method", "al", "--no-progress"])
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    datasets, names, vocab, vectors = build_data(args)
    model = build_model(args.model, "al", **model_options(args, len(names), vocab, vectors))
    optimizers = model.make_optimizers(lambda params: torch.optim.Adam(params, lr=args.lr))
    model.train()
    loader = make_loader(datasets["train"], args, True, 1)
    if len(loader) < warmup + batches:
        raise ValueError(f"the training set has {len(loader)} batches, fewer than --warmup + --batches")
    samples, started = 0, None
    for i, batch in enumerate(islice(loader, warmup + batches)):
        x, mask, labels = unpack_batch(batch)
        model.train_step(x, labels, optimizers, mask, args.clip)
        if i + 1 == warmup:
            started = time.perf_counter()
        elif i + 1 > warmup:
            samples += labels.shape[0]
    return samples / (time.perf_counter() - started)


def pipeline_samples_per_s(argv, split: str, warmup: int, batches: int) -> float:
    """A 2-stage ``al.pipeline`` with 1 thread per stage; its last stage's samples/s after ``warmup``."""
    with tempfile.TemporaryDirectory() as folder:
        results = Path(folder) / "pipeline.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "al.pipeline", *argv, "--threads", "1", "--split", split, "--no-eval", "--log-every", "0",
                   "--max-batches", str(warmup + batches), "--warmup-batches", str(warmup),
                   "--results", str(results)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"pipeline run failed ({done.returncode}):\n{done.stderr[-4000:]}")
        throughput = json.loads(results.read_text())["throughput"]
        if throughput["timed_batches"] != batches:
            raise RuntimeError(f"pipeline timed {throughput['timed_batches']} batches, expected {batches}")
        return throughput["samples_per_s"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(CONFIGS))
    p.add_argument("--warmup", type=int, default=10, help="batches before the timing starts")
    p.add_argument("--batches", type=int, default=60, help="batches timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--al-args", default="", help="extra al.train/al.pipeline options overriding the model's sizes")
    p.add_argument("--split", help="components per stage (default: the model's)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "al_pipeline.json"))
    args = p.parse_args(argv)
    config = dict(CONFIGS[args.model])
    if args.al_args:
        config["argv"] = config["argv"] + args.al_args.split()
        config["why"] = "custom sizes (--al-args)"
    config["split"] = args.split or config["split"]
    sequential, pipeline = [], []
    for _ in range(args.repeats):
        sequential.append(sequential_samples_per_s(config["argv"], 2, args.warmup, args.batches))
        pipeline.append(pipeline_samples_per_s(config["argv"], config["split"], args.warmup, args.batches))
        print(f"{args.model}: sequential {sequential[-1]:.1f} samples/s, pipeline {pipeline[-1]:.1f} samples/s",
              file=sys.stderr)
    seq, pipe = statistics.median(sequential), statistics.median(pipeline)
    result = {
        "sequential_samples_per_s": round(seq, 1),
        "pipeline_samples_per_s": round(pipe, 1),
        "speedup": round(pipe / seq, 3),
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sequential_runs": [round(v, 1) for v in sequential],
        "pipeline_runs": [round(v, 1) for v in pipeline],
        "config": {"al_args": config["argv"], "split": config["split"], "why": config["why"],
                   "sequential_threads": 2, "pipeline_stages": 2, "threads_per_stage": 1,
                   "warmup_batches": args.warmup, "timed_batches": args.batches, "repeats": args.repeats,
                   "statistic": "median of the repeats"},
    }
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[args.model] = result
    merged["machine"] = machine()
    merged["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
