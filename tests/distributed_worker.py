"""One rank of the data-parallel tests (tests/test_distributed.py starts the ranks as subprocesses).

Usage: ``python distributed_worker.py RANK WORLD PORT OUT_DIR``, gloo over loopback. Two phases:

- train: for float64 and float32, SGD (momentum) and Adam: 3 DDP steps of a converted MLP with synchronised
  selection, without and with the row-sparse hook, with local selection, and 2 ``no_sync`` micro-steps plus a
  synchronised one; rank 0 also trains one process on the global batches. Saves ``rank<r>.pt``.
- crash: two synchronised DDP steps, then the last rank exits abruptly (code 7); the others take a third step
  and must fail with a clear error within the group's timeout: they print it with the seconds it took and
  exit with code 3.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import meprop
from meprop.distributed import register_row_sparse_hook

SIZES = (10, 32, 24, 6)  # an MLP 10 -> 32 -> 24 -> 6
K = 5  # kept columns of the hidden layers (the 6-wide output layer keeps 3)
PER_RANK = 4  # examples per rank and step
STEPS = 3
TIMEOUT_S = 30  # the process group's timeout


def make_model(dtype: torch.dtype, sync: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(len(SIZES) - 1):
        layers += [nn.Linear(SIZES[i], SIZES[i + 1], dtype=dtype), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    model = meprop.convert(model, k=K, sync_selection=sync)
    model[-1].k = 3
    return model


def batches(world: int, dtype: torch.dtype, steps: int = STEPS):
    """The global batches of every step (the same on every rank): (x, y) of world * PER_RANK rows."""
    gen = torch.Generator().manual_seed(1)
    n = world * PER_RANK
    return [
        (torch.randn(n, SIZES[0], generator=gen, dtype=dtype), torch.randn(n, SIZES[-1], generator=gen, dtype=dtype))
        for _ in range(steps)
    ]


def optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def train_ddp(rank, world, dtype, opt_name, sync=True, hook=False, accumulate=False):
    """Final weights (and the hook's byte counts) of DDP training on this rank's slices of the global batches."""
    ddp = nn.parallel.DistributedDataParallel(make_model(dtype, sync))
    state = register_row_sparse_hook(ddp) if hook else None
    opt = optimizer(opt_name, ddp.parameters())
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    data = batches(world, dtype)
    if accumulate:  # one step over all the batches: two micro-steps under no_sync, then a synchronised one
        opt.zero_grad()
        with ddp.no_sync():
            for x, y in data[:-1]:
                nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        x, y = data[-1]
        nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        opt.step()
    else:
        for x, y in data:
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
            opt.step()
    counts = None
    if state is not None:
        syncs = [m.selection_sync for m in ddp.module if isinstance(m, meprop.Linear)]
        counts = {"row": state.row_bytes, "dense": state.dense_bytes, "score": sum(s.score_bytes for s in syncs)}
    return weights(ddp.module), counts


def train_single(world, dtype, opt_name, accumulate=False):
    """One process, the same model and optimizer, on the whole global batches."""
    model = make_model(dtype, sync=False)
    opt = optimizer(opt_name, model.parameters())
    data = batches(world, dtype)
    if accumulate:
        opt.zero_grad()
        for x, y in data:
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    else:
        for x, y in data:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    return weights(model)


def train(rank: int, world: int, out: str) -> None:
    results = {}
    for dtype in (torch.float64, torch.float32):
        for opt_name in ("sgd", "adam"):
            case = f"{str(dtype).removeprefix('torch.')}-{opt_name}"
            results[case] = {
                "sync": train_ddp(rank, world, dtype, opt_name)[0],
                "hook": train_ddp(rank, world, dtype, opt_name, hook=True),
                "local": train_ddp(rank, world, dtype, opt_name, sync=False)[0],
            }
            if rank == 0:
                results[case]["single"] = train_single(world, dtype, opt_name)
        case = f"{str(dtype).removeprefix('torch.')}-accumulate"
        results[case] = {
            "sync": train_ddp(rank, world, dtype, "sgd", accumulate=True)[0],
            "hook": train_ddp(rank, world, dtype, "sgd", hook=True, accumulate=True)[0],
        }
        if rank == 0:
            results[case]["single"] = train_single(world, dtype, "sgd", accumulate=True)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def crash(rank: int, world: int) -> None:
    ddp = nn.parallel.DistributedDataParallel(make_model(torch.float32, sync=True))
    register_row_sparse_hook(ddp)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for step, (x, y) in enumerate(batches(world, torch.float32)):
        if step == 2 and rank == world - 1:
            os._exit(7)  # dies without a word, as a killed process does
        start = time.monotonic()
        try:
            nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        except RuntimeError as exc:
            print(f"rank {rank} step {step} failed after {time.monotonic() - start:.1f} s: {exc}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(3)


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    train(rank, world, out)
    crash(rank, world)


if __name__ == "__main__":
    main()
