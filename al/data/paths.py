"""Where the offline data lives: ``$MEPROP_DATA``, default ``../shared/data`` relative to the repository root."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The data folder (it may not exist: callers check)."""
    return Path(os.environ.get("MEPROP_DATA", REPO_ROOT.parent / "shared" / "data"))
