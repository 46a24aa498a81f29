"""MNIST from the standard IDX files (gzipped or not)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "load_mnist"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def read_idx(path) -> np.ndarray:
    """An IDX file (``.gz`` read transparently) as a numpy array of its declared type and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + dtype.itemsize * int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, the header {dims} implies {expected}")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"MNIST file {name}(.gz) not found in {root}")


def load_mnist(root, split: str = "train", normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 (standardised with MNIST's mean/std when ``normalize``, else in
    [0, 1]) and labels ``(N,)`` int64 of the ``split`` ("train" or "test") found in the folder ``root``."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = read_idx(_find(root, _FILES[split][0]))
    labels = read_idx(_find(root, _FILES[split][1]))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{root}: image shape {images.shape} and label shape {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    return x, torch.from_numpy(labels.astype(np.int64))
