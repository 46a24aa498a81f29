"""Per-call cost of meprop's autograd layer: the forward of a meprop layer against nn.Linear's.

meprop registers its layer as a ``torch.autograd.Function`` whose ``forward`` takes ``ctx`` (eager mode and
torch.compile), with a ``setup_context`` form for torch.func transforms. This script times, interleaved and
on the same inputs (``benchmarks/timing.py``: blocked_autorange, pooled median and IQR):

- ``nn.Linear`` forward;
- ``meprop.Linear`` forward (inputs require grad, so the sparse-backward path is taken);
- the alternative the op-contract issue asked to compare: the same dense forward registered as a
  ``torch.library.custom_op`` with ``register_autograd`` (the pytorch/extension-cpp pattern);
- ``meprop.Linear`` forward + backward against ``nn.Linear``'s.

    python benchmarks/overhead.py                  # 50 x 500 -> 500 (the paper's MNIST layer) and 2 x 8 -> 8
Results: benchmarks/results/overhead-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import meprop  # noqa: E402

from timing import interleaved  # noqa: E402  (benchmarks/timing.py)

RESULTS = Path(__file__).resolve().parent / "results"


@torch.library.custom_op("meprop_bench::linear", mutates_args=())
def _custom_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    return F.linear(x, w, b)


@_custom_linear.register_fake
def _(x, w, b, k):
    return x.new_empty(x.shape[0], w.shape[0])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _backward(ctx, grad):
    return None, None, None, None


_custom_linear.register_autograd(_backward, setup_context=_setup)


def measure(batch: int, features: int, k: int, rounds: int, min_run_time: float) -> dict:
    torch.manual_seed(0)
    dense = torch.nn.Linear(features, features)
    layer = meprop.Linear(features, features, k=k)
    layer.load_state_dict(dense.state_dict())
    x = torch.randn(batch, features, requires_grad=True)
    dy = torch.randn(batch, features)

    def step(module):
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    cases = {
        "nn.Linear forward": lambda: dense(x),
        "meprop.Linear forward": lambda: layer(x),
        "custom_op + register_autograd forward": lambda: _custom_linear(x, dense.weight, dense.bias, k),
        "nn.Linear forward+backward": lambda: step(dense),
        "meprop.Linear forward+backward": lambda: step(layer),
    }
    out = {name: t.as_dict(1e6, "us") for name, t in interleaved(cases, rounds, min_run_time).items()}
    base = out["nn.Linear forward"]["median_us"]
    for name in ("meprop.Linear forward", "custom_op + register_autograd forward"):
        out[name]["overhead_us"] = out[name]["median_us"] - base
        out[name]["ratio"] = out[name]["median_us"] / base
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per blocked_autorange")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "cases": {},
    }
    for batch, features, k in ((50, 500, 30), (2, 8, 3)):
        key = f"{batch}x{features}x{features} k={k}"
        report["cases"][key] = result = measure(batch, features, k, args.rounds, args.min_run_time)
        print(key)
        for name, r in result.items():
            extra = f"  (+{r['overhead_us']:.1f} us, {r['ratio']:.3f}x)" if "overhead_us" in r else ""
            print(f"  {name:40s} {r['median_us']:9.1f} us  IQR {r['iqr_us']:6.1f}{extra}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "overhead-cpu.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
