"""Shared helpers for the AL tests: the offline data folder and tiny model factories."""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEPROP_DATA", REPO_ROOT.parent / "shared" / "data"))


def need_data(*parts) -> Path:
    """``DATA/parts...``, or skip the test with the reason when it is absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found (set MEPROP_DATA to the shared data folder)")
    return path


def text_batch(n=6, length=9, vocab=50, classes=3, seed=0):
    """Random ids ``(n, length)``, a mask with lengths in [1, length] (one full row), labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    lengths[0] = length
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return ids * mask, mask, torch.randint(0, classes, (n,), generator=g)
