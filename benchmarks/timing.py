"""Timing that a noisy machine cannot fool: interleaved ``torch.utils.benchmark`` measurements.

:func:`interleaved` times several cases round after round (every case once per round, the order rotating),
each with ``blocked_autorange``, and pools every block's per-call time of a case: the median and the IQR of
that pool describe the case. :func:`compare` turns two such summaries into a ratio, the ratios' spread over
the rounds, and a ``noisy`` flag (the spread of the two times is larger than the difference between them).
The benchmarks (speed.py, overhead.py) share this module.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils import benchmark


@dataclass
class Timing:
    """Per-call times of one case, in seconds: the median and IQR of every block of every round."""

    median: float
    iqr: float
    rounds: list[float] = field(default_factory=list)  # each round's median
    blocks: int = 0

    def as_dict(self, unit: float = 1e3, suffix: str = "ms") -> dict:
        return {f"median_{suffix}": self.median * unit, f"iqr_{suffix}": self.iqr * unit,
                f"rounds_{suffix}": [r * unit for r in self.rounds], "blocks": self.blocks}


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def interleaved(cases: dict[str, Callable[[], object]], rounds: int = 5, min_run_time: float = 0.2) -> dict[str, Timing]:
    """Time every case ``rounds`` times, interleaved; ``blocked_autorange(min_run_time)`` per case and round.

    CUDA work is synchronised by ``torch.utils.benchmark`` itself. Each case is run once before the first
    round (warm-up: lazy initialisation, allocator growth)."""
    for fn in cases.values():
        fn()
    names = list(cases)
    pooled: dict[str, list[float]] = {name: [] for name in names}
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            m = benchmark.Timer("fn()", globals={"fn": cases[name]}).blocked_autorange(min_run_time=min_run_time)
            pooled[name].extend(m.times)
            per_round[name].append(m.median)
    out = {}
    for name in names:
        q1, q2, q3 = _quartiles(pooled[name])
        out[name] = Timing(median=q2, iqr=q3 - q1, rounds=per_round[name], blocks=len(pooled[name]))
    return out


def compare(base: Timing, other: Timing) -> dict:
    """``base / other`` (a speedup when ``other`` is the faster one), the range of the per-round ratios, and
    ``noisy``: True when the two IQRs together exceed the difference of the medians."""
    per_round = [b / o for b, o in zip(base.rounds, other.rounds) if o > 0]
    return {
        "ratio": base.median / other.median if other.median > 0 else float("inf"),
        "ratio_min": min(per_round, default=float("nan")),
        "ratio_max": max(per_round, default=float("nan")),
        "noisy": base.iqr + other.iqr > abs(base.median - other.median),
    }
