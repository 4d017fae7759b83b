"""What a jacobi decode step costs, per forward size: the cost half of the draft policy.

:class:`~dllm.generation.drafting.DraftPolicy` weighs how many draft tokens a
forward will confirm (``dllm.generation.draft_acceptance``) against what a wider
forward costs. This is the second: the measured step times per forward size
(rows x columns, shared with the model's ``DraftMemory`` so later calls start
from them), each size priced at a low quantile of its times (:func:`low`),
other sizes interpolated; and the optimistic prior a probe prices drafts with.
It lives apart from the policy because it is a model of the device alone: it
knows nothing of drafts, rows or sources.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from dllm.generation.draft_memory import SAMPLES, low

PROBE_SLOPE = 0.05  # a probe's length: the best draft if each drafted token cost this share of a 1-token step


class StepCosts:
    """Measured step seconds per forward size, and the estimate of any size from them.

    Args:
        times: forward size -> recent step seconds (the model's ``DraftMemory.times``: updated in place).
    """

    def __init__(self, times: dict[int, deque]):
        self.times = times  # forward size -> recent step seconds
        self._medians = {size: low(samples) for size, samples in self.times.items()}
        self._table: tuple[np.ndarray, np.ndarray] | None = None  # sizes and their median seconds

    def record(self, size: int, seconds: float) -> None:
        """Add one measured step time for forwards of ``size`` = rows x columns."""
        samples = self.times.setdefault(size, deque(maxlen=SAMPLES))
        samples.append(seconds)
        self._medians[size] = low(samples)
        self._table = None

    def cost(self, size):
        """Estimated seconds of a step of ``size`` rows x columns (an int or an array).

        Linear between measured sizes, flat below the smallest, the slope of the
        two largest above the largest (never cheaper); 1.0 before any measure.
        """
        if self._table is None:
            sizes = sorted(self._medians)
            seconds = [self._medians[s] for s in sizes]
            if len(sizes) >= 2:  # a far point carries the slope of the two largest
                slope = max((seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2]), 0.0)
                sizes, seconds = sizes + [sizes[-1] * 1000], seconds + [seconds[-1] + slope * sizes[-1] * 999]
            self._table = (np.array(sizes, dtype=np.float64), np.array(seconds))
        sizes, seconds = self._table
        if len(sizes) == 0:
            return np.ones_like(np.asarray(size, dtype=np.float64))
        return np.interp(size, sizes, seconds)


def optimistic_cost(size):
    """The cheapest plausible step cost, in one-token steps: ``PROBE_SLOPE`` of one per extra column.

    A probe drafts what this prior would choose (the measured costs may be the
    very thing that is wrong), so it measures the size a sane cost estimate
    would pick: an absurd step time at that size is then outvoted (:func:`low`).
    """
    return 1.0 + PROBE_SLOPE * (np.asarray(size, dtype=np.float64) - 1.0)
