"""Throughput of Associated Learning: sequential on 2 threads vs a 2-stage al.pipeline with 1 thread per stage.

    python benchmarks/al_pipeline.py --model mlp     # MLP on MNIST
    python benchmarks/al_pipeline.py --model lstm    # BiLSTM on rotten_tomatoes

Sequential: ``ALModel.train_step`` with ``torch.set_num_threads(2)``. Pipeline: ``torchrun --standalone
--nproc-per-node 2 -m al.pipeline --threads 1`` (its last stage times the batches). Both train the same model
on the same batches (epoch 1's order) and report samples/s over the same ``--batches`` batches after
``--warmup`` batches; data loading is included in both. Every measurement runs in fresh processes with the
same environment (a process's speed drifts as its allocator warms up), repeated ``--repeats`` times,
alternating; the median is kept. The result is merged into ``benchmarks/results/al_pipeline.json`` under
``--name`` (default: the model), with the machine and date. Run it alone on the machine (``cpu-job timed``).
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

from al.train import parse_args  # noqa: E402
from al.training import build_data, make_loader, make_model, make_optimizers, unpack_batch  # noqa: E402

DATA = Path(os.environ.get("MEPROP_DATA", REPO_ROOT.parent / "shared" / "data"))
RT = DATA / "text" / "rotten_tomatoes"

# Sizes where the two stages do about the same work and a batch's compute dwarfs sending its (s, t).
CONFIGS = {
    "mlp": {
        "argv": ["--model", "mlp", "--dataset", "mnist", "--components", "4", "--hidden", "512",
                 "--label-dim", "128", "--batch-size", "16", "--lr", "1e-3"],
        "split": "2,2",
        "batches": 300,
        "why": "4 components of 512 units, two per stage (784->512 and 512->512 vs twice 512->512: about equal "
               "work); batch 16: a stage alone on one thread computes for 8-11 ms per batch and sends 40 KB "
               "(s 16x512, t 16x128, labels).",
    },
    "lstm": {
        "argv": ["--model", "lstm", "--train-file", str(RT / "train.tsv"), "--test-file", str(RT / "test.tsv"),
                 "--components", "2", "--hidden", "128", "--embedding-dim", "128", "--vocab-size", "5000",
                 "--max-len", "48", "--label-dim", "128", "--batch-size", "32", "--lr", "1e-3"],
        "split": "1,1",
        "batches": 80,
        "why": "2 BiLSTM components of 128 units per direction, one per stage; the first LSTM reads 128-d "
               "embeddings, the second 256-d outputs, which offsets the first stage's embedding, dropout and "
               "its dense 5,000-word embedding update; a stage alone on one thread computes for 70-85 ms per "
               "batch of 32 and sends up to 1.6 MB (s 32xLx256, L <= 48).",
    },
}


def sequential_samples_per_s(argv, threads: int, warmup: int, batches: int) -> float:
    """``ALModel.train_step`` on ``threads`` threads, timed over ``batches`` batches after ``warmup``."""
    args = parse_args([*argv, "--method", "al", "--no-progress"])
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    datasets, names, vocab, vectors, _ = build_data(args)
    model = make_model(args, len(names), vocab, vectors)
    optimizers = make_optimizers(model, args)
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


def _python_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def sequential_in_fresh_process(argv, threads: int, warmup: int, batches: int) -> float:
    """:func:`sequential_samples_per_s` in a new Python process."""
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); from al_pipeline import sequential_samples_per_s; "
            f"print(json.dumps(sequential_samples_per_s({argv!r}, {threads}, {warmup}, {batches})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_python_env(), capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"sequential run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def pipeline_samples_per_s(argv, split: str, warmup: int, batches: int) -> float:
    """A 2-stage ``al.pipeline`` with 1 thread per stage; its last stage's samples/s after ``warmup``."""
    with tempfile.TemporaryDirectory() as folder:
        results = Path(folder) / "pipeline.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "al.pipeline", *argv, "--threads", "1", "--split", split, "--no-eval", "--log-every", "0",
                   "--max-batches", str(warmup + batches), "--warmup-batches", str(warmup),
                   "--results", str(results)]
        done = subprocess.run(command, cwd=REPO_ROOT, env=_python_env(), capture_output=True, text=True, timeout=600)
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
    p.add_argument("--warmup", type=int, default=20, help="batches before the timing starts")
    p.add_argument("--batches", type=int, help="batches timed (default: the model's, 300 mlp, 80 lstm)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--al-args", default="", help="extra al.train/al.pipeline options overriding the model's sizes")
    p.add_argument("--split", help="components per stage (default: the model's)")
    p.add_argument("--name", help="key of the result in --out (default: --model)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "al_pipeline.json"))
    args = p.parse_args(argv)
    config = dict(CONFIGS[args.model])
    if args.al_args:
        config["argv"] = config["argv"] + args.al_args.split()
        config["why"] = "custom sizes (--al-args)"
    config["split"] = args.split or config["split"]
    args.batches = args.batches or config["batches"]
    sequential, pipeline = [], []
    for _ in range(args.repeats):
        sequential.append(sequential_in_fresh_process(config["argv"], 2, args.warmup, args.batches))
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
        "config": {"al_args": [os.path.relpath(a, REPO_ROOT) if a.startswith(str(DATA)) else a
                               for a in config["argv"]],
                   "split": config["split"], "why": config["why"],
                   "sequential_threads": 2, "pipeline_stages": 2, "threads_per_stage": 1,
                   "warmup_batches": args.warmup, "timed_batches": args.batches, "repeats": args.repeats,
                   "statistic": "median of the repeats, each in fresh processes",
                   "environment": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "MKL_"))}},
    }
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[args.name or args.model] = result
    merged["machine"] = machine()
    merged["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
