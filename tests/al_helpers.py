"""Shared helpers for the AL tests: the offline data folder and tiny model factories."""

import os
import random
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


POSITIVE = ["good", "great", "fine", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "actors", "it", "very", "quite"]


def write_sentiment(path, n, seed):
    """A learnable two-class TSV: the class decides which word list the one sentiment word comes from."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            label = rng.randrange(2)
            words = rng.choices(FILLER, k=rng.randrange(3, 12))
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
            handle.write(f"{label}\t{' '.join(words)}\n")
    return path
