"""MNIST for the AL models, read by the project's one IDX reader (:func:`meprop.data.load_mnist`)."""

from __future__ import annotations

from pathlib import Path

import torch

from meprop.data import load_mnist as _load_idx_files

__all__ = ["load_mnist", "MNIST_MEAN", "MNIST_STD"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist(root, split: str = "train", normalize: bool = True, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` float32 (standardised with MNIST's mean/std when ``normalize``, else in
    [0, 1]) and labels ``(N,)`` int64 of the ``split`` ("train" or "test") found in the folder ``root``
    (the four IDX files, ``.gz`` or not; fetched when none is there and ``download``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    mnist = _load_idx_files(Path(root), download=download)
    images, labels = (mnist.train_images, mnist.train_labels) if split == "train" else (mnist.test_images,
                                                                                         mnist.test_labels)
    x = images.float().div_(255.0).unsqueeze(1)
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    return x, labels
