"""Conv2d backward: ``nn.Conv2d`` vs ``meprop.Conv2d`` (unified k) vs the masking approach, at a ResNet-like layer.

The masking approach (ssProp-style code) zeroes the dropped channels of ``dy`` with a hook and runs the dense
convolution backward: the same FLOPs as dense. meprop computes ``dx`` and ``dW[S]`` from the ``k`` kept channels
only (compacted operands, see ``meprop.conv``). Each case is the backward alone (``torch.autograd.grad`` of a
retained graph with respect to input, weight and bias), timed interleaved round after round
(``benchmarks/timing.py``); medians with IQR and the per-round ratio range are reported.

    python benchmarks/conv2d.py [--batch 64 --channels 64 --size 32 --ks 8,16,32 --rounds 5] [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import meprop  # noqa: E402
from speed import describe_machine  # noqa: E402  (benchmarks/speed.py)
from timing import compare, interleaved  # noqa: E402  (benchmarks/timing.py)

RESULTS = Path(__file__).resolve().parent / "results"


def masking_hook(k: int):
    """A hook keeping the top-k channels of dy (by sum |dy| over batch and positions) and zeroing the rest."""

    def hook(dy):
        kept = dy.abs().sum((0, 2, 3)).topk(k).indices
        mask = torch.zeros(dy.shape[1], dtype=dy.dtype, device=dy.device).index_fill_(0, kept, 1)
        return dy * mask[None, :, None, None]

    return hook


def cases(args):
    torch.manual_seed(0)
    c = args.channels
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    dense = nn.Conv2d(c, c, 3, padding=1).to(memory_format=layout)
    x = torch.randn(args.batch, c, args.size, args.size).contiguous(memory_format=layout).requires_grad_()
    dy = torch.randn(args.batch, c, args.size, args.size).contiguous(memory_format=layout)

    def backward_of(layer, hook=None):
        y = layer(x)
        if hook is not None:
            y.register_hook(hook)
        inputs = (x, layer.weight, layer.bias)
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)

    out = {"dense": backward_of(dense)}
    for k in args.ks:
        out[f"masking k={k}"] = backward_of(dense, masking_hook(k))
        layer = meprop.Conv2d.from_conv(dense, k=k)
        out[f"meprop k={k}"] = backward_of(layer)
    out["meprop adaptive(mass=0.5)"] = backward_of(meprop.Conv2d.from_conv(dense, k=meprop.Adaptive(0.5)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--channels-last", action="store_true", help="input, dy and weights channels-last")
    parser.add_argument("--out", type=Path, default=None, help="default: results/conv2d-cpu[-channels_last].json")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / f"conv2d-cpu{'-channels_last' if args.channels_last else ''}.json"
    machine = describe_machine(torch.device("cpu"))
    shape = f"batch {args.batch}, {args.channels}->{args.channels} channels, 3x3, {args.size}x{args.size}"
    shape += ", channels-last" if args.channels_last else ", NCHW"
    print(f"Conv2d backward on {machine['device']}, {shape}, torch {machine['torch']}, {machine['date']}")
    timings = interleaved(cases(args), rounds=args.rounds, min_run_time=args.min_run_time)
    base = timings["dense"]
    rows = {}
    for name, t in timings.items():
        rows[name] = {**t.as_dict(), **({} if name == "dense" else compare(base, t))}
        r = rows[name]
        ratio = "" if name == "dense" else f"  {r['ratio']:.2f}x [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]"
        print(f"{name:28s} {t.median * 1e3:8.2f} ms (IQR {t.iqr * 1e3:.2f}){ratio}")
    result = {
        "machine": machine,
        "note": "2-core machine shared with other sessions' light work; timed under the heavy-job lock",
        "shape": shape,
        "dtype": "float32",
        "goal": "meprop k=8 backward >= 4x faster than nn.Conv2d's",
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
