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

import math
from collections import deque

import numpy as np

from dllm.generation.draft_memory import SAMPLES, low

WIDTH = 0.5  # doublings of forward size over which step times are smoothed (:func:`smoothed`)
BINS = 8  # groups of forward sizes per doubling that share their step times (:func:`canonical`)
PROBE_SLOPE = 0.05  # a probe's length: the best draft if each drafted token cost this share of a 1-token step


class StepCosts:
    """Measured step seconds per forward size, and the estimate of any size from them.

    Args:
        times: forward size -> recent step seconds (the model's ``DraftMemory.times``: updated in place).
    """

    def __init__(self, times: dict[int, deque]):
        self.times = times  # forward size -> recent step seconds
        self._table: tuple[np.ndarray, np.ndarray] | None = None  # sizes and their estimated seconds

    def record(self, size: int, seconds: float) -> None:
        """Add one measured step time for forwards of ``size`` = rows x columns (kept under :func:`canonical`)."""
        self.times.setdefault(canonical(size), deque(maxlen=SAMPLES)).append(seconds)
        self._table = None

    def samples(self, size: int) -> int:
        """How many step times the group of ``size`` (:func:`canonical`) holds."""
        return len(self.times.get(canonical(size), ()))

    def estimate(self, size: int) -> float | None:
        """The low quantile of the samples ``size`` joins (``None``: none yet): what its next step should take."""
        samples = self.times.get(canonical(size))
        return low(samples) if samples else None

    def cost(self, size):
        """Estimated seconds of a step of ``size`` rows x columns (an int or an array).

        Each group of sizes (:func:`canonical`) at a low quantile of its times,
        smoothed over its neighbours (:func:`smoothed`), made non-decreasing
        (:func:`monotone`); linear between them, flat below
        the smallest, the slope of the two largest above the largest (never
        cheaper); 1.0 before any measure.
        """
        if self._table is None:
            sizes = sorted(size for size, samples in self.times.items() if samples)
            weights = [len(self.times[s]) for s in sizes]
            seconds = monotone(smoothed(sizes, [low(self.times[s]) for s in sizes], weights), weights)
            if len(sizes) >= 2:  # a far point carries the slope of the two largest
                slope = max((seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2]), 0.0)
                sizes, seconds = sizes + [sizes[-1] * 1000], seconds + [seconds[-1] + slope * sizes[-1] * 999]
            self._table = (np.array(sizes, dtype=np.float64), np.array(seconds))
        sizes, seconds = self._table
        if len(sizes) == 0:
            return np.ones_like(np.asarray(size, dtype=np.float64))
        return np.interp(size, sizes, seconds)


def canonical(size: int) -> int:
    """The forward size whose samples a step of ``size`` joins: sizes ``1 / BINS`` of a doubling apart share one.

    In a batch the forward size is rows x columns, and rows leave one by one:
    batch 50 of the recipe model met 60 sizes in four calls, most of them once,
    so each size's estimate was one noisy time. Sizes within about 9% of each
    other cost nearly the same; sharing their samples gives each group enough
    for the low quantile to mean something. Sizes up to 13 keep their own.
    """
    return size if size <= 13 else round(2.0 ** (round(math.log2(size) * BINS) / BINS))


def smoothed(sizes: list[int], seconds: list[float], weights: list[int]) -> list[float]:
    """Each size's time from a local line through its neighbours (in ``log2`` size, within ``WIDTH`` doublings).

    One size's low quantile is noisy, and on a shared machine it drifts with
    the load between the moments each size was measured; and on one or two
    samples it is a typical time, not a quiet one, so a size the policy
    seldom chooses looks dearer than one it keeps choosing. At batch 50 on the
    recipe model, 724 columns on 3 samples cost 12.6 ms and 790 on 16 cost
    10.5 ms: 600 to 800 columns looked equally dear and the policy drafted 15
    tokens where 11 were 15% faster. A weighted line (weights: samples, and a
    Gaussian in ``log2`` size) through the neighbours of each size averages
    that noise; two sizes alone are kept as they are.
    """
    if len(sizes) < 3:
        return list(seconds)
    x, y, n = np.log2(np.array(sizes, dtype=np.float64)), np.array(seconds), np.array(weights, dtype=np.float64)
    w = n[None, :] * np.exp(-0.5 * ((x[None, :] - x[:, None]) / WIDTH) ** 2)  # [at, from]
    total = w.sum(1)
    mx, my = (w * x).sum(1) / total, (w * y).sum(1) / total
    dx = x[None, :] - mx[:, None]
    spread = (w * dx * dx).sum(1)
    slope = np.where(spread > 1e-12, (w * dx * (y[None, :] - my[:, None])).sum(1) / np.maximum(spread, 1e-12), 0.0)
    return list(my + slope * (x - mx))


def monotone(seconds: list[float], weights: list[int]) -> list[float]:
    """The closest non-decreasing sequence to ``seconds`` (weighted least squares: pool adjacent violators).

    A wider forward never costs less, but the low quantiles of different
    sizes rest on different numbers of samples: a size the policy keeps
    choosing has its 25th percentile of 16 times, one measured once (a
    calibration step) its only time. On the recipe model of
    ``bench/quality.py`` that priced 7 columns at 0.68x one column and 16 at
    1.08x, and the policy kept its short drafts because it kept measuring
    them. Pooling each violation into the weighted mean of its sizes (weights:
    their sample counts) keeps the well-measured sizes and pulls a lone
    outlier to them.
    """
    blocks: list[list[float]] = []  # [mean, weight, sizes pooled]
    for value, weight in zip(seconds, weights):
        blocks.append([value, float(max(weight, 1)), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1, n1), (m2, w2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
    return [mean for mean, _, count in blocks for _ in range(count)]


def optimistic_cost(size):
    """The cheapest plausible step cost, in one-token steps: ``PROBE_SLOPE`` of one per extra column.

    A probe drafts what this prior would choose (the measured costs may be the
    very thing that is wrong), so it measures the size a sane cost estimate
    would pick: an absurd step time at that size is then outvoted (:func:`low`).
    """
    return 1.0 + PROBE_SLOPE * (np.asarray(size, dtype=np.float64) - 1.0)
