"""Test session setup: Triton in its interpreter where there is no GPU, hypothesis without a database.

Without a GPU the session sets ``TRITON_INTERPRET=1`` before anything imports triton (which fixes its mode
at import, and reads the variable again when it loads parts of itself later), so the Triton backend runs
its kernels on CPU tensors in every test module. Tests that start subprocesses set their own environment.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import settings

# Derandomized (the same cases every run) and no example database (tests write only under tmp_path).
settings.register_profile("meprop", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("meprop")


if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
