"""meProp speed benchmark: nn.Linear's dense backward against meProp's sparse backward, per backend.

For every size (B, in, out), k, mode and available backend it times, on the same inputs and in one run:
the dense backward of ``torch.nn.functional.linear`` (through autograd, all of dx, dW, db), meProp's
backward, and the whole forward + backward step of each. Times are medians over repeats after a warm-up
(synchronised on GPU). The *bound* column is the time the sparse backward's FLOPs and bytes need at this
machine's GEMM rate and copy bandwidth, both measured at the start of the run (roofline: the larger of the
two). Results go to benchmarks/results/speed-<device>-<dtype>.{csv,json,png}.

    python benchmarks/speed.py            # default run (< 10 minutes on 2 CPU cores)
    python benchmarks/speed.py --quick    # the key cases only (< 2 minutes)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import meprop  # noqa: E402
from meprop import backends  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (B, in, out) -> ks. The paper's GPU table, a middle size (the per-example goal's), the paper's MNIST layer.
DEFAULT_SIZES = {
    (1024, 8192, 8192): [8, 16, 32, 64, 128, 256, 512],
    (1024, 4096, 4096): [16, 32, 64],
    (50, 500, 500): [20, 30, 80],
}
QUICK_SIZES = {(1024, 8192, 8192): [32], (1024, 4096, 4096): [32], (50, 500, 500): [30]}
# (label, mode, sparse_grad)
VARIANTS = [("unified", "unified", False), ("unified+sparse", "unified", True), ("per_example", "per_example", False)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="key cases only, fewer repeats (< 2 minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--sizes", nargs="+", metavar="BxINxOUT", help="e.g. 1024x8192x8192 50x500x500")
    p.add_argument("--ks", nargs="+", type=int, help="k values for every size (default: per size)")
    p.add_argument("--backends", nargs="+", help="subset of the available backends (default: all)")
    p.add_argument("--modes", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS])
    p.add_argument("--all-reference", action="store_true",
                   help="time the reference backend at every k (default: only at the k nearest 32 of each size, "
                        "since its per-example path costs as much as the dense backward)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 3, 2 with --quick)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where CSV/JSON/PNG go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def machine_rates(device, dtype, repeats):
    """(GEMM FLOP/s, copy bytes/s) measured now: a square matmul and a large tensor copy."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    gemm = 2 * n**3 / (median_ms(lambda: a @ b, device, repeats) / 1e3)
    src = torch.randn(64 << 20, device=device)  # 256 MiB of float32
    dst = torch.empty_like(src)
    copy = 2 * src.nbytes / (median_ms(lambda: dst.copy_(src), device, repeats) / 1e3)  # read + write
    return gemm, copy


def bound_ms(b, i, o, k, variant, elem, gemm, copy):
    """Roofline time of the sparse backward: max(FLOPs / GEMM rate, bytes / copy bandwidth), in ms."""
    flops = 2 * b * k * i * 2  # dx and dW, k products per row each
    dw_bytes = k * i if variant == "unified+sparse" else o * i
    w_rows = k if variant.startswith("unified") else o  # per-example: the union of selections is ~all rows
    nbytes = elem * (2 * b * o + b * i + w_rows * i + b * i + dw_bytes)  # dy twice (select, db), x, W rows, dx, dW
    return max(flops / gemm, nbytes / copy) * 1e3


def time_case(x, w, bias, dy, device, repeats, **options):
    """(backward ms, forward+backward ms) of meprop.functional.linear, or of F.linear when options is empty."""
    inputs = [x, w, bias]

    def forward():
        return meprop.functional.linear(x, w, bias, **options) if options else F.linear(x, w, bias)

    y = forward()
    backward = median_ms(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), device, repeats)
    step = median_ms(lambda: torch.autograd.grad(forward(), inputs, dy), device, repeats)
    return backward, step


def describe_machine(device):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
        info["device"] = f"{model or platform.processor()} ({os.cpu_count()} cores)"
    return info


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    repeats = args.repeats or (2 if args.quick else 3)
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.sizes:
        sizes = {tuple(int(v) for v in s.lower().split("x")): None for s in args.sizes}
    chosen = args.backends or backends.available(device)
    for name in chosen:
        backends.resolve(name, device, dtype)  # a clear error for an unavailable backend
    variants = [v for v in VARIANTS if v[0] in args.modes]

    from tqdm import tqdm

    machine = describe_machine(device)
    print(f"meprop speed benchmark on {machine['device']}, {args.dtype}, torch {machine['torch']}", flush=True)
    gemm, copy = machine_rates(device, dtype, repeats)
    print(f"measured: GEMM {gemm / 1e9:.1f} GFLOP/s, copy {copy / 1e9:.1f} GB/s (read + write)", flush=True)

    cases = []
    for (b, i, o), size_ks in sizes.items():
        ks = args.ks or size_ks or [32]
        reference_k = min(ks, key=lambda k: abs(k - 32))
        for k in ks:
            names = [n for n in chosen if n != "reference" or args.all_reference or k == reference_k]
            cases.extend(((b, i, o), k, v, name) for v in variants for name in names)
    rows, dense, bar = [], {}, tqdm(total=len(cases), desc="cases", file=sys.stderr, dynamic_ncols=True)
    gen = torch.Generator(device=device).manual_seed(0)
    for (b, i, o), k, (label, mode, sparse), name in cases:
        bar.set_postfix_str(f"{b}x{i}x{o} k={k} {label} {name}")
        x = torch.randn(b, i, device=device, dtype=dtype, generator=gen, requires_grad=True)
        w = torch.randn(o, i, device=device, dtype=dtype, generator=gen, requires_grad=True)
        bias = torch.randn(o, device=device, dtype=dtype, generator=gen, requires_grad=True)
        dy = torch.randn(b, o, device=device, dtype=dtype, generator=gen)
        if (b, i, o) not in dense:
            dense[(b, i, o)] = time_case(x, w, bias, dy, device, repeats)
        bwd, step = time_case(x, w, bias, dy, device, repeats, k=k, mode=mode, backend=name, sparse_grad=sparse)
        dense_bwd, dense_step = dense[(b, i, o)]
        rows.append(
            dict(B=b, d_in=i, d_out=o, k=k, mode=label, backend=name,
                 dense_backward_ms=dense_bwd, backward_ms=bwd, speedup=dense_bwd / bwd,
                 dense_step_ms=dense_step, step_ms=step, step_speedup=dense_step / step,
                 bound_ms=bound_ms(b, i, o, k, label, x.element_size(), gemm, copy))
        )
        bar.update()
    bar.close()
    for r in rows:  # speedup of each kernel backend over the reference path, same case
        ref = next((q for q in rows if q["backend"] == "reference" and all(
            q[f] == r[f] for f in ("B", "d_in", "d_out", "k", "mode"))), None)
        r["vs_reference"] = ref["backward_ms"] / r["backward_ms"] if ref else float("nan")
    print_table(rows)
    write_results(rows, machine, dict(gemm_flops=gemm, copy_bytes_per_s=copy), args)


def print_table(rows):
    head = f"{'B x in x out':>17} {'k':>4} {'mode':<15} {'backend':<9} {'dense ms':>9} {'meprop ms':>9} " \
           f"{'speedup':>8} {'step x':>7} {'vs ref':>7} {'bound ms':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['B']:>5}x{r['d_in']:>5}x{r['d_out']:>5} {r['k']:>4} {r['mode']:<15} {r['backend']:<9} "
              f"{r['dense_backward_ms']:>9.2f} {r['backward_ms']:>9.2f} {r['speedup']:>7.1f}x "
              f"{r['step_speedup']:>6.1f}x {r['vs_reference']:>6.1f}x {r['bound_ms']:>8.2f}")


def write_results(rows, machine, rates, args):
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"speed-{args.device}-{args.dtype}{'-quick' if args.quick else ''}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(machine=machine, dtype=args.dtype, measured=rates, command=" ".join(sys.argv))
    Path(f"{stem}.json").write_text(json.dumps(dict(meta, results=rows), indent=1))
    print(f"wrote {stem}.csv and {stem}.json", flush=True)
    if not args.no_plot:
        plot(rows, machine, f"{stem}.png")
        print(f"wrote {stem}.png", flush=True)


def plot(rows, machine, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({(r["B"], r["d_in"], r["d_out"]) for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for series in sorted({(r["mode"], r["backend"]) for r in rows}):
            pts = sorted((r["k"], r["speedup"]) for r in rows
                         if (r["B"], r["d_in"], r["d_out"]) == size and (r["mode"], r["backend"]) == series)
            ax.plot(*zip(*pts), marker="o", label=f"{series[1]} {series[0]}")
        ax.set(xscale="log", yscale="log", xlabel="k", ylabel="backward speedup vs dense",
               title=f"B={size[0]}, in={size[1]}, out={size[2]}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"meProp backward speedup, {machine['device']}, {machine['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
