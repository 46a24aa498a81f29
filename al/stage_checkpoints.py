"""Per-stage checkpoints of a pipelined AL run and the consistent boundary to resume from.

Stage ``r`` of ``S`` writes ``root/stage-{r}-of-{S}/step-{g:09d}.pt`` after training global batch ``g`` (every
stage checkpoints at the same batch indices), atomically: a temporary file renamed over the name. A batch
index is a *consistent boundary* when every stage has its checkpoint; :func:`newest_common_step` picks the
newest one. Stages run ahead of the next one by a bounded number of batches, so each keeps just enough of
its newest files (:func:`checkpoints_to_keep`) that a crash between two stages' writes still leaves a common
index.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from meprop.data import save_atomic

__all__ = ["StageCheckpoints", "newest_common_step", "checkpoints_to_keep", "MAX_LEAD_PER_LINK"]

# A stage has trained at most this many batches more than the next one. A stage checkpoints batch n + 1
# after its send of batch n - 1 completed (it waits for each send before the next one), and gloo completes
# a send once the receiver has posted the receive. The next stage receives one message ahead of the one it
# trains on, so it posted the receive of batch n - 1 while training batch n - 2: it has trained n - 3.
MAX_LEAD_PER_LINK = 4
_NAME = re.compile(r"step-(\d{9})\.pt")
_FOLDER = re.compile(r"stage-(\d+)-of-(\d+)")


def checkpoints_to_keep(every: int, stages: int) -> int:
    """How many of its newest checkpoints a stage keeps: 2 when ``every`` covers the largest lead of the first
    stage over the last (``MAX_LEAD_PER_LINK`` per link), more for smaller ``every``."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return max(2, 1 + math.ceil(MAX_LEAD_PER_LINK * (stages - 1) / every))


def newest_common_step(steps_per_stage) -> int | None:
    """The largest batch index present in every stage's list, or None."""
    common = set.intersection(*(set(steps) for steps in steps_per_stage)) if steps_per_stage else set()
    return max(common) if common else None


class StageCheckpoints:
    """The checkpoint folder of stage ``stage`` of ``stages`` under ``root``; keeps the newest ``keep`` files."""

    def __init__(self, root, stage: int, stages: int, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.folder = self.root / f"stage-{stage}-of-{stages}"
        self.stages, self.keep = stages, keep

    def check_layout(self) -> None:
        """ValueError if ``root`` holds checkpoints of a pipeline with another number of stages."""
        if not self.root.exists():
            return
        others = sorted(p.name for p in self.root.iterdir()
                        if (m := _FOLDER.fullmatch(p.name)) and int(m.group(2)) != self.stages)
        if others:
            raise ValueError(f"--checkpoint-dir {self.root} holds checkpoints of a pipeline with another number of "
                             f"stages ({', '.join(others)}); this run has {self.stages}")

    def steps(self) -> list[int]:
        """Batch indices checkpointed by this stage, ascending."""
        if not self.folder.exists():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.fullmatch(p.name)))

    def remove_partial_writes(self) -> None:
        """Deletes temporary files left by a write that was interrupted (the file itself was never renamed)."""
        if self.folder.exists():
            for leftover in self.folder.glob(".step-*.tmp"):
                leftover.unlink(missing_ok=True)

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:09d}.pt"

    def save(self, step: int, state: dict) -> None:
        """Writes ``state`` for batch index ``step`` atomically, then drops all but the newest ``keep`` files."""
        save_atomic(state, self.path(step))
        for old in self.steps()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)

    def discard_after(self, step: int) -> None:
        """Deletes this stage's checkpoints of batches after ``step`` (left by a run that is resumed from ``step``)."""
        for newer in self.steps():
            if newer > step:
                self.path(newer).unlink(missing_ok=True)

    def load(self, step: int) -> dict:
        return torch.load(self.path(step), weights_only=False)
