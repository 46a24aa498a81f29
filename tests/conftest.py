"""Shared test helpers: tie-free inputs and tolerances."""

from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Relative tolerances for values (indices are compared exactly on tie-free inputs).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Values equal up to the dtype's tolerance, relative to the largest magnitude of ``expected``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    rtol = RTOL[dtype or expected.dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True)


def tie_free_rows(n: int, out: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """(n, out) with distinct magnitudes in every row (a random permutation of 1..out, random signs)."""
    mags = torch.stack([torch.randperm(out, generator=generator) + 1 for _ in range(n)]) if n else torch.zeros(0, out)
    signs = torch.randint(0, 2, (n, out), generator=generator) * 2 - 1
    return (mags * signs).to(dtype)


def tie_free_columns(n: int, out: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """(n, out) whose column sums of |dy| are distinct: |dy[i, j]| = s_j, a random permutation of 1..out."""
    mags = (torch.randperm(out, generator=generator) + 1).expand(n, out)
    signs = torch.randint(0, 2, (n, out), generator=generator) * 2 - 1
    return (mags * signs).to(dtype)


def max_exact_int(dtype: torch.dtype) -> int:
    """Largest n such that every integer in 1..n is exact in ``dtype`` and sums stay exact in fp32."""
    return {torch.bfloat16: 256, torch.float16: 2048}.get(dtype, 1 << 20)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
