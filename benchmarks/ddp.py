"""Data-parallel meProp: bytes all-reduced per step and step time under DDP (gloo on CPU, NCCL on GPU).

A stack of ``--layers`` 4096 x 4096 layers (ReLU between), ``--batch`` examples per rank, SGD; one step is
``zero_grad``, forward, backward (DDP's all-reduce included) and ``optimizer.step()``. Four cases per ``k``:

- ``dense DDP``: ``nn.Linear`` layers, DDP as it comes;
- ``meProp local``: ``meprop.Linear`` (unified top-k), each rank selecting its own k columns;
- ``meProp sync``: ``sync_selection=True`` (the column scores all-reduced before the top-k);
- ``meProp sync + row-sparse``: the same with ``meprop.distributed.register_row_sparse_hook``.

Bytes are counted in a communication hook: for the row-sparse case its own counters; for the others a
counting wrapper of DDP's default all-reduce on a separate, untimed copy of the model (DDP sends every
gradient). The selection's score all-reduce is counted apart (``out`` floats per layer and step). Step
times: ``torch.utils.benchmark`` ``Timer.timeit`` with a fixed number of steps (every rank must run the same
number of collectives, which ``blocked_autorange`` cannot promise), the cases interleaved round by round;
median and IQR over the rounds, as rank 0 measured them.

    python benchmarks/ddp.py                     # 2 local ranks, gloo, 1 thread each, k = 16, 64, 256
    python benchmarks/ddp.py --ks 16 --rounds 5  # one k (results merge into the same file)
    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 benchmarks/ddp.py

Results: ``benchmarks/results/ddp-<device>.json`` (one entry per k, each with its machine and date).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import meprop
from meprop.distributed import register_row_sparse_hook

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("dense DDP", "meProp local", "meProp sync", "meProp sync + row-sparse")


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def build(case: str, args, device) -> nn.Module:
    """The layer stack of ``case`` (fresh weights from the same seed)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.features, args.features, device=device), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    if case != "dense DDP":
        model = meprop.convert(model, k=args.k, sync_selection=case != "meProp local")
    return model


def _counting_allreduce(state, bucket):
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return allreduce_hook(None, bucket)


class Case:
    """One DDP model of a case, its optimizer, inputs and step."""

    def __init__(self, case: str, args, device, count: bool = False) -> None:
        self.name = case
        module = build(case, args, device)
        # Every rank builds the same weights (same seed): skip DDP's initial broadcast where torch has the switch.
        no_init_sync = {"init_sync": False} if "init_sync" in inspect.signature(DDP).parameters else {}
        self.ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **no_init_sync)
        self.hook = register_row_sparse_hook(self.ddp) if case.endswith("row-sparse") else None
        self.counter = {"bytes": 0}
        if count and self.hook is None:
            self.ddp.register_comm_hook(self.counter, _counting_allreduce)
        self.syncs = [m.selection_sync for m in module.modules() if getattr(m, "selection_sync", None) is not None]
        self.opt = torch.optim.SGD(self.ddp.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(1 + dist.get_rank())
        self.x = torch.randn(args.batch, args.features, generator=gen).to(device)
        self.dy = torch.randn(args.batch, args.features, generator=gen).to(device)
        self.device = device

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.ddp(self.x).backward(self.dy)
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bytes_per_step(self) -> dict:
        """Bytes this rank all-reduces in one step: gradients (rows of synchronised weights, the rest) and scores."""
        for s in self.syncs:
            s.score_bytes = 0
        if self.hook is not None:
            self.hook.reset_counts()
        self.counter["bytes"] = 0
        self.step()
        scores = sum(s.score_bytes for s in self.syncs)
        if self.hook is not None:
            grads, rows, rest = self.hook.bytes_reduced, self.hook.row_bytes, self.hook.dense_bytes
        else:
            grads = self.counter["bytes"]
            weight_bytes = sum(p.numel() * p.element_size() for n, p in self.ddp.named_parameters() if "weight" in n)
            rows, rest = weight_bytes, grads - weight_bytes
        return {"gradient_bytes": grads, "weight_bytes": rows, "other_bytes": rest, "score_bytes": scores}


def rank_main(args, rank: int, world: int) -> None:
    """One rank: time the cases interleaved, then count bytes; rank 0 writes the results to ``args.result``."""
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    cases = [Case(name, args, device) for name in CASES]
    timers = {c.name: benchmark.Timer("step()", globals={"step": c.step}, num_threads=args.threads) for c in cases}
    samples = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name in CASES:
            dist.barrier()
            samples[name].append(timers[name].timeit(args.steps))  # (timeit first runs 2 warm-up steps)
    del cases, timers
    counts = {}
    for name in CASES:
        probe = Case(name, args, device, count=True)
        probe.step()  # DDP rebuilds its buckets after the first step
        counts[name] = probe.bytes_per_step()
        del probe
    if rank != 0:
        return
    out = {}
    for name in CASES:
        merged = benchmark.Measurement.merge(samples[name])[0]
        per_round = sorted(m.median * 1e3 for m in samples[name])
        out[name] = {
            "median_ms": merged.median * 1e3,
            "iqr_ms": merged.iqr * 1e3,
            "rounds_ms": per_round,
            **counts[name],
        }
    dense = out["dense DDP"]
    for r in out.values():
        r["time_vs_dense"] = r["median_ms"] / dense["median_ms"]
        r["weight_bytes_reduction"] = dense["weight_bytes"] / r["weight_bytes"]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "torch": torch.__version__,
        "backend": dist.get_backend(),
        "world_size": world,
        "threads_per_rank": args.threads,
        "layers": args.layers,
        "features": args.features,
        "batch_per_rank": args.batch,
        "steps_per_sample": args.steps,
        "rounds": args.rounds,
        "cases": out,
    }
    Path(args.result).write_text(json.dumps(report, indent=1) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_table(k: int, report: dict) -> None:
    print(
        f"k={k}: {report['world_size']} ranks ({report['backend']}), {report['layers']} x "
        f"{report['features']}^2 layers, batch {report['batch_per_rank']}/rank, {report['machine']}, {report['date']}"
    )
    print(
        f"  {'case':26s} {'step ms':>9s} {'IQR':>7s} {'vs dense':>8s} {'weight MB':>10s} {'reduction':>9s} {'other KB':>9s} {'scores KB':>9s}"
    )
    for name, r in report["cases"].items():
        print(
            f"  {name:26s} {r['median_ms']:9.1f} {r['iqr_ms']:7.1f} {r['time_vs_dense']:7.2f}x "
            f"{r['weight_bytes'] / 2**20:10.3f} {r['weight_bytes_reduction']:8.0f}x {r['other_bytes'] / 2**10:9.1f} "
            f"{r['score_bytes'] / 2**10:9.1f}"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256], help="kept columns per layer")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--features", type=int, default=4096, help="in = out features of every layer")
    p.add_argument("--batch", type=int, default=64, help="examples per rank and step")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median and IQR over them)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case and round")
    p.add_argument("--world", type=int, default=2, help="local ranks to start (ignored under torchrun)")
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: NCCL, one GPU per rank")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # set for the ranks this script starts
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if "TORCHELASTIC_RUN_ID" in os.environ or args.rank is not None:  # one rank (torchrun, or started below)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
        rank, world = dist.get_rank(), dist.get_world_size()
        for k in [args.k] if args.k is not None else args.ks:
            args.k = k
            args.result = args.result or str(args.out_dir / f"ddp-k{k}.json.tmp")
            rank_main(args, rank, world)
            if rank == 0 and args.rank is None:  # under torchrun rank 0 records the results itself
                record(args, k, json.loads(Path(args.result).read_text()))
                Path(args.result).unlink()
                args.result = None
        dist.destroy_process_group()
        return
    for k in args.ks:
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "rank0.json")
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
                "WORLD_SIZE": str(args.world),
                "OMP_NUM_THREADS": str(args.threads),
            }
            passed = [a for a in (argv if argv is not None else sys.argv[1:])]
            procs = [
                subprocess.Popen(
                    [sys.executable, __file__, *passed, "--rank", str(r), "--k", str(k), "--result", result],
                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                )
                for r in range(args.world)
            ]
            codes = [proc.wait() for proc in procs]
            if any(codes):
                sys.exit(f"ddp benchmark: ranks exited with {codes}")
            record(args, k, json.loads(Path(result).read_text()))


def record(args, k: int, report: dict) -> None:
    """Print ``report`` and store it as the entry of ``k`` in the results file."""
    print_table(k, report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"ddp-{args.device}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[str(k)] = report
    path.write_text(json.dumps(dict(sorted(results.items(), key=lambda kv: int(kv[0]))), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
