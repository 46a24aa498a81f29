"""meProp speed benchmark: nn.Linear's dense backward against meProp's sparse backward, per backend.

Per-layer view (default): for every size (B, in, out), k, mode and available backend it times, on the same
inputs and interleaved round after round with the dense case (``benchmarks/timing.py``: torch.utils.benchmark
``blocked_autorange``, pooled median and IQR): the dense backward of ``torch.nn.functional.linear`` through
autograd (dx, dW, db), meProp's backward, the forward of each, and forward + backward of each. A ratio whose
two IQRs together exceed the difference of the medians is flagged ``noisy``. The *bound* column is the time
the sparse backward's FLOPs and bytes need at this machine's GEMM rate and copy bandwidth, both measured at
the start of the run (roofline: the larger of the two).

Step view (``--step``): the whole training step (zero_grad, forward, cross-entropy, backward, optimizer
step) of the paper's MNIST MLP 784-500-500-10 at batch 50: dense with Adam, meProp with Adam, and meProp
with the sparse step (row-sparse weight gradients, SparseAdam on them, Adam on the rest); also forward +
backward alone, so the optimizer's share shows.

LSTM view (``--lstm``): one ``nn.LSTM`` layer (input 300, hidden 500, 25 steps, batch 32 and 1) against
``meprop.LSTM`` at k=10 per gate, unified and per_example, per backend: the forward (with autograd on) and the
backward (``torch.autograd.grad`` of dx and every weight over a retained graph), interleaved; the peak memory
of one forward + backward is that of PyTorch's allocator (CUDA statistics; on CPU the profiler's allocation events).

Results go to benchmarks/results/speed-<device>-<dtype>[-quick].{csv,json,png} (per layer),
benchmarks/results/step-<device>.json (step view) and benchmarks/results/lstm-<device>.json (LSTM view).

    python benchmarks/speed.py            # default run (about 10 minutes on 2 CPU cores)
    python benchmarks/speed.py --quick    # the key cases only (a few minutes)
    python benchmarks/speed.py --step     # the training step of the MNIST MLP
    python benchmarks/speed.py --lstm     # the LSTM layer (issue 16)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import meprop  # noqa: E402
from meprop import backends  # noqa: E402

from timing import compare, interleaved  # noqa: E402  (benchmarks/timing.py)

RESULTS = Path(__file__).resolve().parent / "results"

# (B, in, out) -> ks. The paper's GPU table, a middle size (the per-example goal's), the paper's MNIST layer.
DEFAULT_SIZES = {
    (1024, 8192, 8192): [8, 16, 32, 64, 128, 256, 512],
    (1024, 4096, 4096): [16, 32, 64],
    (50, 500, 500): [20, 30, 80],
}
QUICK_SIZES = {(1024, 8192, 8192): [32], (1024, 4096, 4096): [32], (50, 500, 500): [30, 80]}
# (label, mode, sparse_grad)
VARIANTS = [("unified", "unified", False), ("unified+sparse", "unified", True), ("per_example", "per_example", False)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="key cases only, fewer rounds (a few minutes)")
    p.add_argument("--step", action="store_true", help="the training-step view (MNIST MLP) instead of per layer")
    p.add_argument("--lstm", action="store_true", help="the LSTM view (nn.LSTM vs meprop.LSTM) instead of per layer")
    p.add_argument("--lstm-peak-only", action="store_true",
                   help="measure only the LSTM view's peak memory and add it to an existing lstm-<device>.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--sizes", nargs="+", metavar="BxINxOUT[:K,...]", help="e.g. 1024x8192x8192:32 50x500x500:20,30")
    p.add_argument("--ks", nargs="+", type=int, help="k values for every size (default: per size)")
    p.add_argument("--backends", nargs="+", help="subset of the available backends (default: all)")
    p.add_argument("--modes", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS])
    p.add_argument("--all-reference", action="store_true",
                   help="time the reference backend at every k (default: only at the k nearest 32 of each size, "
                        "since its per-example path costs as much as the dense backward)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per size (default 5, 3 with --quick)")
    p.add_argument("--min-run-time", type=float, help="seconds per blocked_autorange (default 0.2, 0.1 with --quick)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where CSV/JSON/PNG go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.min_run_time = args.min_run_time or (0.1 if args.quick else 0.2)
    if args.rounds < 1 or args.min_run_time <= 0:
        p.error("--rounds must be >= 1 and --min-run-time > 0")
    return args


def machine_rates(device, dtype):
    """(GEMM FLOP/s, copy bytes/s) measured now: a square matmul and a large tensor copy."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    src = torch.randn(64 << 20, device=device)  # 256 MiB of float32
    dst = torch.empty_like(src)
    t = interleaved({"gemm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, rounds=1, min_run_time=0.5)
    return 2 * n**3 / t["gemm"].median, 2 * src.nbytes / t["copy"].median  # copy: read + write


def bound_ms(b, i, o, k, variant, elem, gemm, copy):
    """Roofline time of the sparse backward: max(FLOPs / GEMM rate, bytes / copy bandwidth), in ms."""
    flops = 2 * b * k * i * 2  # dx and dW, k products per row each
    dw_bytes = k * i if variant == "unified+sparse" else o * i
    w_rows = k if variant.startswith("unified") else o  # per-example: the union of selections is ~all rows
    nbytes = elem * (b * o + b * i + w_rows * i + b * i + dw_bytes)  # dy (one pass: selection + db), x, W rows, dx, dW
    return max(flops / gemm, nbytes / copy) * 1e3


def layer_cases(x, w, bias, dy, **options):
    """{forward, backward, forward+backward} closures of meprop.functional.linear (F.linear without options)."""
    inputs = [x, w, bias]

    def forward():
        return meprop.functional.linear(x, w, bias, **options) if options else F.linear(x, w, bias)

    y = forward()
    return {
        "forward": forward,
        "backward": lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
        "forward+backward": lambda: torch.autograd.grad(forward(), inputs, dy),
    }


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


def per_layer(args, device, dtype):
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.sizes:  # BxINxOUT or BxINxOUT:k1,k2,...
        sizes = {}
        for spec in args.sizes:
            shape, _, ks = spec.partition(":")
            sizes[tuple(int(v) for v in shape.lower().split("x"))] = [int(k) for k in ks.split(",")] if ks else None
    chosen = args.backends or backends.available(device)
    for name in chosen:
        backends.resolve(name, device, dtype)  # a clear error for an unavailable backend
    variants = [v for v in VARIANTS if v[0] in args.modes]
    gemm, copy = machine_rates(device, dtype)
    print(f"measured: GEMM {gemm / 1e9:.1f} GFLOP/s, copy {copy / 1e9:.1f} GB/s (read + write)", flush=True)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for (b, i, o), size_ks in sizes.items():
        ks = (size_ks if args.sizes else None) or args.ks or size_ks or [32]  # explicit size:ks, --ks, defaults
        reference_k = min(ks, key=lambda k: abs(k - 32))
        x = torch.randn(b, i, device=device, dtype=dtype, generator=gen, requires_grad=True)
        w = torch.randn(o, i, device=device, dtype=dtype, generator=gen, requires_grad=True)
        bias = torch.randn(o, device=device, dtype=dtype, generator=gen, requires_grad=True)
        dy = torch.randn(b, o, device=device, dtype=dtype, generator=gen)
        cases, keys = {}, []
        for phase, fn in layer_cases(x, w, bias, dy).items():
            cases[("dense", phase)] = fn
        for k in ks:
            for label, mode, sparse in variants:
                for name in chosen:
                    if name == "reference" and not (args.all_reference or k == reference_k):
                        continue
                    key = (k, label, name)
                    keys.append(key)
                    options = dict(k=k, mode=mode, backend=name, sparse_grad=sparse)
                    for phase, fn in layer_cases(x, w, bias, dy, **options).items():
                        cases[(key, phase)] = fn
        print(f"{b}x{i}x{o}: {len(cases)} cases, {args.rounds} interleaved rounds", file=sys.stderr, flush=True)
        t = interleaved(cases, rounds=args.rounds, min_run_time=args.min_run_time)
        dense = {phase: t[("dense", phase)] for phase in ("forward", "backward", "forward+backward")}
        for key in keys:
            k, label, name = key
            bwd, fwd, both = (t[(key, phase)] for phase in ("backward", "forward", "forward+backward"))
            c = compare(dense["backward"], bwd)
            rows.append(dict(
                B=b, d_in=i, d_out=o, k=k, mode=label, backend=name,
                dense_backward_ms=dense["backward"].median * 1e3, dense_backward_iqr_ms=dense["backward"].iqr * 1e3,
                backward_ms=bwd.median * 1e3, backward_iqr_ms=bwd.iqr * 1e3,
                speedup=c["ratio"], speedup_min=c["ratio_min"], speedup_max=c["ratio_max"], noisy=c["noisy"],
                dense_forward_ms=dense["forward"].median * 1e3, forward_ms=fwd.median * 1e3,
                forward_ratio=fwd.median / dense["forward"].median,
                forward_noisy=compare(dense["forward"], fwd)["noisy"],
                dense_step_ms=dense["forward+backward"].median * 1e3, step_ms=both.median * 1e3,
                step_speedup=compare(dense["forward+backward"], both)["ratio"],
                bound_ms=bound_ms(b, i, o, k, label, x.element_size(), gemm, copy),
            ))
    for r in rows:  # speedup of each kernel backend over the reference path, same case
        ref = next((q for q in rows if q["backend"] == "reference" and all(
            q[f] == r[f] for f in ("B", "d_in", "d_out", "k", "mode"))), None)
        r["vs_reference"] = ref["backward_ms"] / r["backward_ms"] if ref else float("nan")
    print_table(rows)
    return rows, dict(gemm_flops=gemm, copy_bytes_per_s=copy)


def mnist_mlp(mode=None, k=30, sparse_grad=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10))
    if mode is not None:
        model = meprop.convert(model, k=k, mode=mode, skip_last=True, sparse_grad=sparse_grad)
    return model


def step_view(args, device):
    """The whole training step of the MNIST MLP (batch 50), dense vs meProp, interleaved."""
    x = torch.rand(50, 784, device=device)
    y = torch.randint(10, (50,), device=device)
    configs = {  # name -> (model, optimizer)
        "dense, Adam": (m := mnist_mlp().to(device), torch.optim.Adam(m.parameters(), lr=1e-3)),
        "unified k=30, Adam": (m := mnist_mlp("unified").to(device), torch.optim.Adam(m.parameters(), lr=1e-3)),
        "per_example k=30, Adam": (m := mnist_mlp("per_example").to(device), torch.optim.Adam(m.parameters(), lr=1e-3)),
    }
    m = mnist_mlp("unified", sparse_grad=True).to(device)
    sparse, dense = meprop.optim.split_parameters(m)
    configs["unified k=30, sparse step"] = (m, meprop.optim.SplitOptimizer(
        torch.optim.SparseAdam(sparse, lr=1e-3), torch.optim.Adam(dense, lr=1e-3)))

    def step(model, optimizer, update=True):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if update:
            optimizer.step()

    cases = {}
    for name, (model, optimizer) in configs.items():
        cases[(name, "step")] = lambda model=model, optimizer=optimizer: step(model, optimizer)
        cases[(name, "forward+backward")] = lambda model=model, optimizer=optimizer: step(model, optimizer, False)
    t = interleaved(cases, rounds=args.rounds, min_run_time=args.min_run_time)
    base = {phase: t[("dense, Adam", phase)] for phase in ("step", "forward+backward")}
    rows = []
    for name in configs:
        row = dict(config=name)
        for phase in ("step", "forward+backward"):
            c = compare(base[phase], t[(name, phase)])
            row.update({f"{phase}_ms": t[(name, phase)].median * 1e3, f"{phase}_iqr_ms": t[(name, phase)].iqr * 1e3,
                        f"{phase}_speedup": c["ratio"], f"{phase}_speedup_min": c["ratio_min"],
                        f"{phase}_speedup_max": c["ratio_max"], f"{phase}_noisy": c["noisy"]})
        rows.append(row)
    print(f"{'MNIST MLP 784-500-500-10, batch 50':<28} {'step ms (IQR)':>16} {'x (per-round range)':>22} "
          f"{'fwd+bwd ms (IQR)':>18} {'x':>6}")
    for r in rows:
        flag = lambda key: " noisy" if r[key] else ""  # noqa: E731
        print(f"{r['config']:<28} {r['step_ms']:9.3f} ({r['step_iqr_ms']:.3f}) {r['step_speedup']:6.2f} "
              f"[{r['step_speedup_min']:.2f}-{r['step_speedup_max']:.2f}]{flag('step_noisy'):6} "
              f"{r['forward+backward_ms']:9.3f} ({r['forward+backward_iqr_ms']:.3f}) "
              f"{r['forward+backward_speedup']:5.2f}{flag('forward+backward_noisy')}")
    return rows


# (batch, steps, input, hidden, k per gate) of the LSTM view: the issue's goal size and the paper's batch of 1.
LSTM_SIZES = [(32, 25, 300, 500, 10), (1, 25, 300, 500, 10)]
LSTM_MODES = ("unified", "per_example")


def lstm_case(batch, steps, n_in, hidden, k, mode, backend, device):
    """(model, x, dout) of one LSTM case; mode None is the dense nn.LSTM."""
    torch.manual_seed(0)
    model = nn.LSTM(n_in, hidden) if mode is None else meprop.LSTM(n_in, hidden, k=k, mode=mode, backend=backend)
    model = model.to(device)
    x = torch.randn(steps, batch, n_in, device=device, requires_grad=True)
    return model, x, torch.randn(steps, batch, hidden, device=device)


def lstm_peak_mb(batch, mode, backend, device) -> float:
    """Peak memory (MB) allocated through PyTorch's allocator during one forward + backward of a case, above what
    was allocated before (CUDA: the allocator's peak statistic; CPU: the running sum of the profiler's
    allocation events, which include the blocks the meprop CPU kernels reuse for large outputs). The kernels' own
    small std::vector buffers are not counted."""
    size = next(s for s in LSTM_SIZES if s[0] == batch)
    model, x, dout = lstm_case(*size, None if mode == "dense" else mode, backend, device)
    with torch.no_grad():  # lazy initialisation first
        model(x)

    def step():
        out, _ = model(x)
        torch.autograd.grad(out, [x, *model.parameters()], dout)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def lstm_view(args, device):
    """nn.LSTM vs meprop.LSTM per backend and mode: forward and backward times, ratios, peak memory."""
    names = [b for b in backends.available(device) if b != "reference" and (not args.backends or b in args.backends)]
    rows = []
    for batch, steps, n_in, hidden, k in LSTM_SIZES:
        configs = {("dense", "nn.LSTM"): lstm_case(batch, steps, n_in, hidden, k, None, None, device)}
        for backend in names:
            for mode in LSTM_MODES:
                configs[(mode, backend)] = lstm_case(batch, steps, n_in, hidden, k, mode, backend, device)
        cases, graphs = {}, {}
        for key, (model, x, dout) in configs.items():
            inputs = [x, *model.parameters()]
            cases[key + ("forward",)] = lambda model=model, x=x: model(x)
            out, _ = model(x)
            graphs[key] = out
            cases[key + ("backward",)] = lambda out=out, inputs=inputs, dout=dout: torch.autograd.grad(
                out, inputs, dout, retain_graph=True)
        t = interleaved(cases, rounds=args.rounds, min_run_time=args.min_run_time)
        dense = {phase: t[("dense", "nn.LSTM", phase)] for phase in ("forward", "backward")}
        for key in configs:
            row = dict(batch=batch, steps=steps, d_in=n_in, hidden=hidden, k=k if key[0] != "dense" else None,
                       mode=key[0], backend=key[1])
            for phase in ("forward", "backward"):
                c = compare(t[key + (phase,)], dense[phase]) if phase == "forward" else compare(dense[phase], t[key + (phase,)])
                row.update({f"{phase}_ms": t[key + (phase,)].median * 1e3, f"{phase}_iqr_ms": t[key + (phase,)].iqr * 1e3,
                            f"{phase}_ratio": c["ratio"], f"{phase}_ratio_min": c["ratio_min"],
                            f"{phase}_ratio_max": c["ratio_max"], f"{phase}_noisy": c["noisy"]})
            row["peak_mb"] = lstm_peak_mb(batch, key[0], None if key[1] == "nn.LSTM" else key[1], device)
            rows.append(row)
        del graphs
    print(f"{'LSTM T=25 in=300 H=500':<24} {'mode':<12} {'backend':<8} {'fwd ms':>8} {'fwd/dense':>9} "
          f"{'bwd ms (IQR)':>15} {'dense/bwd [range]':>20} {'peak MB':>8}")
    for r in rows:
        print(f"{'batch ' + str(r['batch']):<24} {r['mode']:<12} {r['backend']:<8} {r['forward_ms']:8.2f} "
              f"{r['forward_ratio']:9.2f} {r['backward_ms']:8.2f} ({r['backward_iqr_ms']:.2f}) "
              f"{r['backward_ratio']:7.1f}x [{r['backward_ratio_min']:.1f}-{r['backward_ratio_max']:.1f}] "
              f"{r['peak_mb'] if r['peak_mb'] is not None else float('nan'):8.1f}"
              + ("  noisy" if r["backward_noisy"] else ""))
    print("fwd/dense = meprop forward / nn.LSTM forward; dense/bwd = nn.LSTM backward / meprop backward; "
          "peak MB = peak of the allocations during one forward + backward (CPU: the profiler's memory events, "
          "meprop's reused blocks included; CUDA: the allocator's peak)")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.lstm_peak_only:
        path = args.out_dir / f"lstm-{args.device}.json"
        result = json.loads(path.read_text())
        for row in result["results"]:
            row["peak_mb"] = lstm_peak_mb(row["batch"], row["mode"], None if row["backend"] == "nn.LSTM" else row["backend"],
                                          torch.device(args.device))
            print(row["batch"], row["mode"], row["backend"], f"peak {row['peak_mb']:.1f} MB")
        result["peak_note"] = (f"peak_mb measured separately ({describe_machine(torch.device(args.device))['date']}, "
                               "--lstm-peak-only): PyTorch allocations during one forward + backward")
        path.write_text(json.dumps(result, indent=1) + "\n")
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    machine = describe_machine(device)
    print(f"meprop speed benchmark on {machine['device']}, {args.dtype}, torch {machine['torch']}, "
          f"{machine['date']}", flush=True)
    meta = dict(machine=machine, dtype=args.dtype, rounds=args.rounds, min_run_time_s=args.min_run_time,
                command=" ".join(sys.argv))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.lstm:
        rows = lstm_view(args, device)
        path = args.out_dir / f"lstm-{args.device}{'-quick' if args.quick else ''}.json"
        path.write_text(json.dumps(dict(meta, results=rows), indent=1) + "\n")
        print(f"wrote {path}", flush=True)
        return
    if args.step:
        rows = step_view(args, device)
        path = args.out_dir / f"step-{args.device}{'-quick' if args.quick else ''}.json"
        path.write_text(json.dumps(dict(meta, results=rows), indent=1) + "\n")
        print(f"wrote {path}", flush=True)
        return
    rows, rates = per_layer(args, device, dtype)
    write_results(rows, dict(meta, measured=rates), args)


def print_table(rows):
    head = (f"{'B x in x out':>17} {'k':>4} {'mode':<15} {'backend':<9} {'dense ms':>8} {'(IQR)':>7} {'meprop ms':>9} "
            f"{'(IQR)':>7} {'speedup':>8} {'[round range]':>14} {'fwd x':>6} {'step x':>6} {'vs ref':>6} {'bound ms':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['B']:>5}x{r['d_in']:>5}x{r['d_out']:>5} {r['k']:>4} {r['mode']:<15} {r['backend']:<9} "
              f"{r['dense_backward_ms']:>8.3f} {r['dense_backward_iqr_ms']:>7.3f} {r['backward_ms']:>9.3f} "
              f"{r['backward_iqr_ms']:>7.3f} {r['speedup']:>7.1f}x {r['speedup_min']:>6.1f}-{r['speedup_max']:<6.1f} "
              f"{r['forward_ratio']:>6.2f} {r['step_speedup']:>5.1f}x {r['vs_reference']:>5.1f}x {r['bound_ms']:>8.3f}"
              + ("  noisy" if r["noisy"] else ""))
    print("speedup = dense backward / meProp backward (pooled medians); fwd x = meProp forward / nn.Linear forward; "
          "noisy = the two IQRs together exceed the difference of the medians")


def write_results(rows, meta, args):
    stem = args.out_dir / f"speed-{args.device}-{args.dtype}{'-quick' if args.quick else ''}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{stem}.json").write_text(json.dumps(dict(meta, results=rows), indent=1))
    print(f"wrote {stem}.csv and {stem}.json", flush=True)
    if not args.no_plot:
        plot(rows, meta["machine"], f"{stem}.png")
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
