"""What one model's jacobi drafts taught earlier calls: step times per forward size and per-source survival curves.

A later call on the same model (and device and dtype) starts from these
instead of from nothing: it skips the calibration steps, and each row starts
from the model's curve per source. Step costs are a low quantile of the
recent times (:func:`low`), so a few absurd ones that a call met (a stall, a
busy core) do not carry a "drafts are dear" verdict into the calls after it.
"""

from __future__ import annotations

import weakref
from collections import deque

import numpy as np

from dllm.generation.draft_sources import SOURCES

PRIOR = 0.5  # chance of confirming a draft token, per position, before anything was measured
SAMPLES = 16  # step times kept per forward size
QUANTILE = 0.25  # a size's step cost: this low quantile of its samples (the lowest of up to four)
TEXT_HAZARD = 0.2  # prior chance that a text source's draft breaks at a position past its first ...
MODEL = 0  # the model's own drafts: index in SOURCES


class DraftMemory:
    """What earlier calls on one model measured: step times per forward size and the acceptance rate."""

    def __init__(self):
        self.times: dict[int, deque] = {}  # forward size -> recent step seconds
        self.reached: dict[int, np.ndarray] = {}  # max_draft -> [source, position] faded tested drafts
        self.rejected: dict[int, np.ndarray] = {}  # ... and those rejected at that position

    @property
    def calibrated(self) -> bool:
        """Two forward sizes measured: enough to interpolate and extrapolate costs."""
        return len(self.times) >= 2

    def hazard(self, max_draft: int) -> np.ndarray:
        """``[source, position]``: the model's chance that a draft is rejected at a position it reached."""
        reached = self.reached.setdefault(max_draft, np.zeros((len(SOURCES), max_draft)))
        rejected = self.rejected.setdefault(max_draft, np.zeros((len(SOURCES), max_draft)))
        prior = np.full(reached.shape, 1.0 - PRIOR)
        prior[MODEL + 1 :, 1:] = TEXT_HAZARD  # ... for a copy is either wrong at once or right for a while
        return (rejected + prior) / (reached + 1.0)


_MEMORIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def memory_of(model, device, dtype) -> DraftMemory:
    """The :class:`DraftMemory` of ``model`` on ``device`` in ``dtype`` (a new one when either changed)."""
    where = (str(device), dtype)
    held = _MEMORIES.get(model)
    if held is None or held[0] != where:
        held = _MEMORIES[model] = (where, DraftMemory())
    return held[1]


def forget() -> None:
    """Drop every model's :class:`DraftMemory` (tests that count calibration steps start from nothing)."""
    _MEMORIES.clear()


def low(samples) -> float:
    """A low quantile of a size's step times (``QUANTILE``; the lowest of up to four samples).

    Not the median: on a shared machine other programs slow a step down, never
    speed it up, so the low end is the step's own cost, and a few absurd times (a
    stall, a busy core) cannot swing it once a sane one is among the samples.
    """
    ordered = sorted(samples)
    return ordered[int(QUANTILE * (len(ordered) - 1))]
