"""The two CPU backward paths of meprop.Conv2d (stride 1) side by side, to place ``SHIFTS_MIN_INPUT``.

Per geometry (batch 64, 3x3, padding 1; the MNIST CNN's layers and the ResNet-like layer), the k-channel
products ``dx`` and ``dW[S]`` through the shifted-copies GEMMs and through oneDNN's convolutions in
channels-last, interleaved; writes ``benchmarks/results/conv2d-paths-cpu.json``.

    python benchmarks/conv2d_paths.py [--batch 64] [--rounds 3] [--min-run-time 0.2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import meprop.conv as conv  # noqa: E402
from speed import describe_machine  # noqa: E402  (benchmarks/speed.py)
from timing import compare, interleaved  # noqa: E402  (benchmarks/timing.py)

# (C_in, C_out, H = W, k)
GEOMETRIES = [(1, 32, 28, 4), (1, 32, 28, 16), (32, 64, 14, 8), (32, 64, 14, 32), (64, 64, 32, 8), (64, 64, 32, 32)]
# The k-channel products dx, dW[S] of each path (stride 1, padding 1, no dilation).
PATHS = {
    "shifts": lambda dy, kept, x, w, need_dx: conv._compacted_shifts(dy, kept, x, w, [1, 1], [1, 1], need_dx, True),
    "onednn": lambda dy, kept, x, w, need_dx: conv._compacted_aten(dy, kept, x, w, [1, 1], [1, 1], [1, 1], need_dx, True),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--geometries", help="C_in,C_out,H,k;... (default: the list above)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "conv2d-paths-cpu.json")
    args = p.parse_args(argv)
    geometries = ([tuple(int(v) for v in g.split(",")) for g in args.geometries.split(";")] if args.geometries
                  else GEOMETRIES)
    torch.manual_seed(0)
    rows = []
    for c_in, c_out, size, k in geometries:
        x, dy = torch.randn(args.batch, c_in, size, size), torch.randn(args.batch, c_out, size, size)
        kept = torch.randperm(c_out)[:k].sort().values
        w_kept = torch.randn(c_out, c_in, 3, 3)[kept].contiguous()
        need_dx = c_in > 1  # a first layer needs no dx
        cases = {name: (lambda f=f: f(dy, kept, x, w_kept, need_dx)) for name, f in PATHS.items()}
        t = interleaved(cases, rounds=args.rounds, min_run_time=args.min_run_time)
        c = compare(t["onednn"], t["shifts"])
        rows.append(dict(c_in=c_in, c_out=c_out, size=size, k=k, dx=need_dx, shifts_ms=t["shifts"].median * 1e3,
                         onednn_ms=t["onednn"].median * 1e3, onednn_over_shifts=c["ratio"],
                         range=[c["ratio_min"], c["ratio_max"]]))
        print(f"C_in {c_in:3d} C_out {c_out:3d} {size}x{size} k={k:3d}: shifts {rows[-1]['shifts_ms']:7.2f} ms, "
              f"oneDNN {rows[-1]['onednn_ms']:7.2f} ms, oneDNN/shifts {c['ratio']:.2f}", flush=True)
    args.out.write_text(json.dumps(dict(machine=describe_machine(torch.device("cpu")), batch=args.batch, results=rows),
                                   indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
