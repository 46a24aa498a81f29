"""meprop.distributed: synchronised selection and the row-sparse all-reduce hook under DDP.

The multi-process tests start 2 or 3 gloo ranks on loopback as subprocesses (tests/distributed_worker.py);
the rest run in this process, on a one-rank gloo group where they need one.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import meprop
from meprop.distributed import SyncSelection, register_row_sparse_hook

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
CASES = [f"{d}-{o}" for d in ("float64", "float32") for o in ("sgd", "adam")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out, timeout: float = 150):
    """Run ``world`` ranks of the worker; returns [(returncode, stderr)] by rank."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(r), str(world), port, str(out)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def assert_weights_close(got, want, rtol=1e-6):
    """Every tensor within ``rtol`` of the expected one, relative to the largest expected magnitude."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """(world size, each rank's (exit code, stderr), each rank's training results) of one worker run."""
    world = request.param
    out = tmp_path_factory.mktemp(f"ddp{world}")
    exits = launch(world, out)
    missing = [r for r in range(world) if not (out / f"rank{r}.pt").exists()]
    assert not missing, f"ranks {missing} did not finish training: {exits}"
    return world, exits, [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture
def trained(ranks):
    return ranks[0], ranks[2]


@pytest.mark.parametrize("case", CASES)
def test_sync_selection_equals_one_process_on_the_global_batch(trained, case):
    """3 DDP steps with synchronised selection give the weights of one process training on the concatenated
    batches; local selection (each rank its own k columns) does not."""
    _, ranks = trained
    single = ranks[0][case]["single"]
    assert_weights_close(ranks[0][case]["sync"], single)
    with pytest.raises(AssertionError):
        assert_weights_close(ranks[0][case]["local"], single)
    for other in ranks[1:]:
        for a, b in zip(other[case]["sync"], ranks[0][case]["sync"]):
            assert torch.equal(a, b)  # the replicas stay identical


@pytest.mark.parametrize("case", CASES)
def test_row_sparse_hook_equals_dense_all_reduce(trained, case):
    """The hook gives DDP's weights, and all-reduces k rows per weight (exactly counted) and the biases."""
    world, ranks = trained
    weights, counts = ranks[0][case]["hook"]
    assert_weights_close(weights, ranks[0][case]["sync"], rtol=1e-6 if world > 2 else 0)
    elem = 8 if case.startswith("float64") else 4
    sizes = [(10, 32, 5), (32, 24, 5), (24, 6, 3)]  # (in, out, k) of the worker's layers
    assert counts["row"] == 3 * sum(k * n_in for n_in, _, k in sizes) * elem
    assert counts["dense"] == 3 * sum(out for _, out, _ in sizes) * elem  # the biases
    assert counts["score"] == 3 * sum(out for _, out, _ in sizes) * elem  # one score all-reduce per layer and step


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_no_sync_accumulation_with_and_without_the_hook(trained, dtype):
    """Two micro-steps under no_sync and a synchronised one equal one process accumulating the global batches."""
    _, ranks = trained
    results = ranks[0][f"{dtype}-accumulate"]
    assert_weights_close(results["sync"], results["single"])
    assert_weights_close(results["hook"], results["single"])


def test_a_rank_that_dies_makes_the_others_fail_clearly(ranks):
    """The last rank exits abruptly after two steps: the others' third step fails within the group's timeout
    with meprop's error, instead of hanging."""
    _, exits, _ = ranks
    assert exits[-1][0] == 7
    for rank, (code, err) in enumerate(exits[:-1]):
        assert code == 3, f"rank {rank} (exit {code}): {err}"
        match = re.search(r"step 2 failed after ([0-9.]+) s: .*could not reach the other ranks", err)
        assert match and float(match.group(1)) < 30, err


# --- in this process ------------------------------------------------------------------------------------------


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_options_and_errors_without_a_group():
    layer = meprop.Linear(6, 8, k=2, sync_selection=True)
    assert layer.sync_selection and "sync_selection=True" in repr(layer)
    assert not meprop.Linear(6, 8, k=2).sync_selection
    with pytest.raises(ValueError, match=r"meprop.Linear\(6, 8\): process_group is used with sync_selection=True"):
        meprop.Linear(6, 8, k=2, process_group=object())
    model = meprop.convert(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)), k=2, sync_selection=True)
    assert all(m.sync_selection for m in model)
    out = layer(torch.randn(4, 6, requires_grad=True)).sum()
    with pytest.raises(RuntimeError, match="sync_selection=True needs an initialised torch.distributed"):
        out.backward()
    with torch.no_grad():  # no backward, no group needed
        layer(torch.randn(4, 6))
    with pytest.raises(TypeError, match="register_row_sparse_hook: ddp_model must be"):
        register_row_sparse_hook(model)
    restored = pickle.loads(pickle.dumps(layer))  # the default group: picklable, nothing pending
    assert isinstance(restored.selection_sync, SyncSelection) and restored.selection_sync.process_group is None


def test_sync_selection_is_eager_only():
    torch._dynamo.reset()
    layer = meprop.Linear(6, 8, k=2, sync_selection=True)
    with pytest.raises(Exception, match="eager mode only"):
        torch.compile(layer, fullgraph=True, backend="aot_eager")(torch.randn(3, 6, requires_grad=True))
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["unified", "random_unified", "per_example"])
def test_one_rank_sync_selection_equals_local_selection(one_rank_group, mode):
    """On a group of one, the synchronised selection is the layer's own."""
    x = torch.randn(7, 6, dtype=torch.float64)
    grads = []
    for sync in (False, True):
        torch.manual_seed(3)
        layer = meprop.Linear(6, 9, k=3, mode=mode, dtype=torch.float64, sync_selection=sync)
        torch.manual_seed(4)
        layer(x).pow(2).sum().backward()
        grads.append((layer.weight.grad, layer.bias.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert (grads[0][0].abs().sum(1) > 0).sum() <= (3 if mode != "per_example" else 9)


def test_sparse_grad_under_ddp_points_to_the_hook(one_rank_group):
    model = nn.parallel.DistributedDataParallel(nn.Sequential(meprop.Linear(6, 8, k=2, sparse_grad=True)))
    with pytest.raises(
        RuntimeError, match="sparse_grad=True does not work under DistributedDataParallel.*register_row_sparse_hook"
    ):
        model(torch.randn(3, 6))
    layer = meprop.Linear(6, 8, k=2, sparse_grad=True)  # outside DDP it still works
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.weight.grad.is_sparse
    synced = nn.parallel.DistributedDataParallel(
        nn.Sequential(meprop.Linear(6, 8, k=2, sync_selection=True, sparse_grad=True))
    )
    with pytest.raises(ValueError, match="has sparse_grad=True, which DDP cannot all-reduce"):
        register_row_sparse_hook(synced)


def test_hook_reduces_dense_where_the_selection_is_not_row_sparse(one_rank_group):
    """k >= out (a dense backward), per-example mode, unsynchronised layers and a weight tied to another module
    are all-reduced whole; a synchronised unified layer sends its k rows."""
    torch.manual_seed(0)
    tied = meprop.Linear(5, 5, k=2, sync_selection=True)
    twin = nn.Linear(5, 5)
    twin.weight = tied.weight
    net = nn.Sequential(
        meprop.Linear(5, 12, k=None, sync_selection=True),
        meprop.Linear(12, 10, k=3, mode="per_example", sync_selection=True),
        meprop.Linear(10, 5, k=2),
        tied,
        twin,
        meprop.Linear(5, 8, k=2, sync_selection=True),
    )
    ddp = nn.parallel.DistributedDataParallel(net)
    state = register_row_sparse_hook(ddp)
    for _ in range(2):
        state.reset_counts()
        ddp(torch.randn(4, 5)).sum().backward()
        n_params = sum(p.numel() for p in net.parameters())  # (each parameter once, as DDP counts them)
        assert state.row_bytes == 2 * 5 * 4  # the last layer's 2 rows only
        assert state.dense_bytes == (n_params - 8 * 5) * 4
        assert state.bytes_reduced == state.row_bytes + state.dense_bytes
