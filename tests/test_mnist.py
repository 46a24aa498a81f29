"""MNIST loader, the reproduction script's training loop, checkpoint/resume and CLI (short runs only).

The data are found through ``MEPROP_DATA`` (default ``<repo>/../shared/data``); tests that need them
skip with the reason when ``$MEPROP_DATA/mnist`` is absent.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch

from meprop import data as mdata
from meprop.data import FILES, load_mnist, read_idx

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("MEPROP_DATA", ROOT.parent / "shared" / "data")) / "mnist"
needs_data = pytest.mark.skipif(
    not all((MNIST_DIR / f"{name}.gz").is_file() or (MNIST_DIR / name).is_file() for name in FILES),
    reason=f"MNIST files not found in {MNIST_DIR} (set MEPROP_DATA to the folder holding mnist/)",
)
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_mnist", ROOT / "benchmarks" / "mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_mnist"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


bench = _bench()


def _shared_bytes(name: str) -> bytes:
    path = MNIST_DIR / f"{name}.gz"
    return path.read_bytes() if path.is_file() else gzip.compress((MNIST_DIR / name).read_bytes(), compresslevel=1)


@pytest.fixture(scope="module")
def splits():
    if not MNIST_DIR.is_dir():
        pytest.skip(f"MNIST files not found in {MNIST_DIR}")
    return bench.load_splits(MNIST_DIR)


@pytest.fixture(scope="module")
def small_splits(splits):
    """Train as usual, evaluate on the first 1,000 dev and test images (short runs: evaluation dominates)."""
    return bench.Splits(splits.train_x, splits.train_y, splits.dev_x[:1000], splits.dev_y[:1000],
                        splits.test_x[:1000], splits.test_y[:1000])


# ------------------------------------------------------------------------------------------- loader
@needs_data
def test_loader_shapes_dtypes_and_label_counts():
    mnist = load_mnist(MNIST_DIR, download=False)
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10000, 28, 28) and mnist.test_images.dtype == torch.uint8
    assert mnist.train_labels.shape == (60000,) and mnist.train_labels.dtype == torch.int64
    assert mnist.test_labels.shape == (10000,) and mnist.test_labels.dtype == torch.int64
    assert torch.bincount(mnist.train_labels).tolist() == TRAIN_COUNTS
    assert torch.bincount(mnist.test_labels).tolist() == TEST_COUNTS
    assert 0 < mnist.train_images.float().mean() < 255 and int(mnist.train_images.max()) == 255


@needs_data
def test_loader_reads_uncompressed_files(tmp_path):
    for name in FILES:  # test split uncompressed, train split gzipped: both forms in one directory
        raw = gzip.decompress(_shared_bytes(name))
        if name.startswith("t10k"):
            (tmp_path / name).write_bytes(raw)
        else:
            (tmp_path / f"{name}.gz").write_bytes(_shared_bytes(name))
    mnist = load_mnist(tmp_path, download=False)
    reference = load_mnist(MNIST_DIR, download=False)
    assert all(torch.equal(a, b) for a, b in zip(mnist, reference))


def test_offline_and_empty_directory_names_the_directory(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mdata, "_fetch", offline)
    target = tmp_path / "mnist_here"
    with pytest.raises(FileNotFoundError, match="mnist_here"):
        load_mnist(target)
    assert not any(target.iterdir())  # nothing half-written


def test_partial_directory_is_an_error_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(mdata, "_fetch", lambda url, timeout: pytest.fail("must not download into a non-empty dir"))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.*" + tmp_path.name):
        load_mnist(tmp_path)


@needs_data
def test_download_checks_md5_of_decompressed_bytes(tmp_path, monkeypatch):
    served = []

    def fake_fetch(url, timeout):
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        served.append(name)
        return gzip.compress(gzip.decompress(_shared_bytes(name)), compresslevel=1, mtime=0)  # other .gz, same content

    monkeypatch.setattr(mdata, "_fetch", fake_fetch)
    mnist = load_mnist(tmp_path / "fresh")
    assert sorted(served) == sorted(FILES)
    assert torch.bincount(mnist.test_labels).tolist() == TEST_COUNTS
    for name, md5 in FILES.items():
        assert hashlib.md5(gzip.decompress((tmp_path / "fresh" / f"{name}.gz").read_bytes())).hexdigest() == md5


def test_download_rejects_wrong_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(mdata, "_fetch", lambda url, timeout: gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))
    with pytest.raises(FileNotFoundError, match="MD5"):
        load_mnist(tmp_path)
    assert not list(tmp_path.iterdir())


def test_read_idx_validates():
    labels = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    assert read_idx(labels).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="magic"):
        read_idx(b"\x01\x00\x08\x01" + labels[4:])
    with pytest.raises(ValueError, match="expected"):
        read_idx(labels[:-1])


# ----------------------------------------------------------------------------------------- training
@needs_data
@pytest.mark.parametrize("mode,k", [(None, None), ("per_example", 160)])
def test_one_epoch_on_2000_images_beats_85_percent(splits, mode, k):
    # batch 10 (200 steps): 40 steps of the protocol's batch 50 reach only ~82% even dense; meProp with k=30
    # learns more slowly in its first steps (75% unified, 51% per-example here), so the smoke run uses k=160
    config = bench.RunConfig("smoke", mode=mode, k=k, epochs=1, train_size=2000, batch_size=10)
    state = bench.train(config, splits, progress=False)
    assert state.test_at_best > 85.0, state.history
    record = state.history[0]
    assert 0 < record["linear_backward_s"] < record["backward_s"] < record["epoch_s"]


@needs_data
def test_mesimp_shrinks_hidden_layers_and_still_trains(splits):
    config = bench.RunConfig("simp", mode="per_example", k=160, simp=True, epochs=1, train_size=2000, batch_size=10)
    state = bench.train(config, splits, progress=False)
    sizes = state.hidden_sizes
    assert all(size < 500 for size in sizes), sizes
    model = state.final_model
    assert model[0].weight.shape == (sizes[0], 784) and model[3].weight.shape == (sizes[1], sizes[0])
    assert model[6].weight.shape == (10, sizes[1])
    assert state.test_at_best > 85.0, state.history


@needs_data
@pytest.mark.parametrize(
    "preset",
    [dict(mode="random_per_example", k=30), dict(mode="per_example", k=160, simp=True, simp_cycle_epochs=1)],
    ids=["random_per_example", "mesimp"],
)
def test_resume_ends_with_the_same_weights(small_splits, tmp_path, preset):
    splits = small_splits
    config = bench.RunConfig("tiny", epochs=3, train_size=600, **preset)
    straight = bench.train(config, splits, checkpoint=tmp_path / "straight.pt", progress=False)
    with pytest.raises(bench.StopRequested):
        bench.train(config, splits, checkpoint=tmp_path / "cut.pt", progress=False, stop_at=time.time())
    assert bench.torch.load(tmp_path / "cut.pt", weights_only=False)["state"]["epoch"] == 1
    assert not (tmp_path / "cut.pt.tmp").exists()
    resumed = bench.train(config, splits, checkpoint=tmp_path / "cut.pt", resume=True, progress=False)
    a, b = straight.final_model.state_dict(), resumed.final_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert [r["test"] for r in straight.history] == [r["test"] for r in resumed.history]
    finished = bench.train(config, splits, checkpoint=tmp_path / "cut.pt", resume=True, progress=False)
    assert finished.finished and finished.history == resumed.history


@needs_data
def test_resume_refuses_a_different_configuration(small_splits, tmp_path):
    splits = small_splits
    config = bench.RunConfig("tiny", epochs=1, train_size=200)
    bench.train(config, splits, checkpoint=tmp_path / "run.pt", progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        bench.train(bench.RunConfig("tiny", epochs=1, train_size=300), splits, checkpoint=tmp_path / "run.pt",
                    resume=True, progress=False)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_help():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mnist.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--epochs", "--k", "--mode", "--seed", "--data-dir", "--quick", "--checkpoint", "--resume", "--threads"):
        assert flag in result.stdout


@needs_data
def test_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = bench.main(["--mode", "unified", "--k", "20", "--epochs", "1", "--train-size", "500", "--data-dir",
                       str(MNIST_DIR), "--json", str(out), "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "dense" in table and "unified-20" in table
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["runs"]] == ["dense", "unified-20"]
    assert result["runs"][0]["epoch_speedup"] == 1.0 and result["runs"][1]["k"] == 20
    assert result["machine"]["date"]
