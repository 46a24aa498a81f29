"""MNIST from the four standard IDX files (gzipped or not), with a checked download.

``load_mnist(directory)`` reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ending in ``.gz``). When none of
the four is present and ``download`` is true, they are fetched from the usual mirrors and kept only if the
MD5 of their *decompressed* bytes matches the standard sums; otherwise a ``FileNotFoundError`` names the
directory and the missing files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["FILES", "MIRRORS", "MNIST", "download_mnist", "load_mnist", "read_idx", "save_atomic"]

# name -> MD5 of the decompressed file
FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class MNIST(NamedTuple):
    """The MNIST splits: images ``uint8 (N, 28, 28)``, labels ``int64 (N,)``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def read_idx(data: bytes, where: str = "IDX data") -> np.ndarray:
    """Parse the bytes of one (decompressed) IDX file into an array of its stored shape and type."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{where}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{where}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(f"{where}: expected {header + count * dtype.itemsize} bytes for shape {shape}, got {len(data)}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically: written to a temporary file beside it (parent folders
    created), then renamed over it, so a crash leaves the old file or the new one, never a partial one. The
    project's one atomic-save helper (MNIST runs, ``al.train``, ``al.pipeline`` stage checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download_mnist(directory: str | os.PathLike, mirrors=MIRRORS, timeout: float = 30.0) -> None:
    """Download the four gzipped files into ``directory``, each kept only if its decompressed MD5 matches.

    Files are written to a temporary name and renamed, so a failed download leaves nothing behind. Raises
    ``FileNotFoundError`` naming ``directory`` when no mirror delivers a file with the right checksum.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, md5 in FILES.items():
        target = directory / f"{name}.gz"
        if target.is_file():
            continue
        errors = []
        for mirror in mirrors:
            url = f"{mirror}{name}.gz"
            try:
                packed = _fetch(url, timeout)
                digest = hashlib.md5(gzip.decompress(packed)).hexdigest()
            except (urllib.error.URLError, OSError, EOFError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
                continue
            if digest != md5:
                errors.append(f"{url}: MD5 of decompressed bytes is {digest}, expected {md5}")
                continue
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(packed)
            os.replace(partial, target)
            break
        else:
            raise FileNotFoundError(
                f"MNIST: could not download {name}.gz into {directory} (offline?):\n  " + "\n  ".join(errors)
            )


def load_mnist(directory: str | os.PathLike, download: bool = True) -> MNIST:
    """Load MNIST from ``directory`` (the four IDX files, ``.gz`` or not).

    With ``download`` the files are fetched (checksums verified) when none of them is in ``directory``.
    Raises ``FileNotFoundError`` naming the directory when files are missing and cannot be fetched, and
    ``ValueError`` for a malformed file or mismatched image/label counts.
    """
    directory = Path(directory)
    paths = {name: _find(directory, name) for name in FILES}
    if download and all(p is None for p in paths.values()):
        download_mnist(directory)
        paths = {name: _find(directory, name) for name in FILES}
    missing = [name for name, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST: {', '.join(missing)} (optionally .gz) not found in {directory.resolve()}"
            + ("" if download else " (download=False)")
        )
    arrays = {name: read_idx(_read_bytes(path), str(path)) for name, path in paths.items()}
    splits = []
    for split in ("train", "t10k"):
        images = arrays[f"{split}-images-idx3-ubyte"]
        labels = arrays[f"{split}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"MNIST in {directory}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
        splits += [torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))]
    return MNIST(*splits)
