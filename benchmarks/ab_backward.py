"""A/B timing of meprop.Linear's backward between two checkouts (e.g. before and after a change).

Each measurement runs in a fresh process that imports meprop from one checkout (its in-place build), and the
checkouts alternate, round after round, so that both see the same machine state. Times are
torch.utils.benchmark medians (blocked_autorange) of ``y.backward(dy)`` with the gradients reset.

    python benchmarks/ab_backward.py --repos ../before . --cases 50x500x500:30:unified 1024x8192x8192:32:unified
Results: benchmarks/results/ab-backward.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, meprop
from torch.utils import benchmark
size, k, mode, sparse, min_time = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1", float(sys.argv[6])
batch, n_in, out = (int(v) for v in size.split("x"))
torch.manual_seed(0)
x = torch.randn(batch, n_in, requires_grad=True)
layer = meprop.Linear(n_in, out, k=k, mode=mode, sparse_grad=sparse)
dy = torch.randn(batch, out)
y = layer(x)
def backward():
    x.grad = layer.weight.grad = layer.bias.grad = None
    y.backward(dy, retain_graph=True)
backward()
t = benchmark.Timer("f()", globals={"f": backward}).blocked_autorange(min_run_time=min_time)
print(json.dumps({"median_us": t.median * 1e6, "iqr_us": t.iqr * 1e6, "runs": len(t.times)}))
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repos", nargs=2, required=True, help="the two checkouts (each built in place)")
    p.add_argument("--python", nargs=2, help="their interpreters (default: <repo>/.venv/bin/python)")
    p.add_argument("--cases", nargs="+", required=True, metavar="BxINxOUT:K:MODE[:sparse]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ab-backward.json")
    args = p.parse_args(argv)
    repos = [str(Path(r).resolve()) for r in args.repos]
    pythons = args.python or [str(Path(r) / ".venv" / "bin" / "python") for r in repos]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.processor() or platform.machine(),
        "repos": repos,
        "cases": {},
    }
    for case in args.cases:
        size, k, mode, *rest = case.split(":")
        sparse = "1" if rest == ["sparse"] else "0"
        runs = {repo: [] for repo in repos}
        for _ in range(args.rounds):
            for repo, python in zip(repos, pythons):
                cmd = [python, "-c", _CHILD, repo, size, k, mode, sparse, str(args.min_run_time)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs[repo].append(json.loads(out.strip().splitlines()[-1]))
        report["cases"][case] = {
            repo: {"median_us": statistics.median(r["median_us"] for r in rs), "rounds": rs}
            for repo, rs in runs.items()
        }
        a, b = (report["cases"][case][r]["median_us"] for r in repos)
        print(f"{case:32s} A {a:10.1f} us   B {b:10.1f} us   B/A {b / a:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
