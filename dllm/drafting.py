"""How long each jacobi draft should be: measured acceptance against the measured cost of a wider forward.

Hugging Face's assisted decoding adapts ``num_assistant_tokens`` with a fixed
rule (+2 when every candidate was accepted, -1 otherwise, never below 1),
blind to what a longer draft costs. A draft is only worth its tokens when the
forward that verifies it is not much dearer than a one-token forward, and that
depends on the model, the batch and the device. So:

- per row, an acceptance rate ``a``: the chance that a draft token is confirmed
  when the tokens before it were, counted over the recent forwards (older ones
  fade), starting from a prior of 0.5. While a row does not draft, its count
  fades slowly toward the prior, so a row that turns predictable gets tried
  again;
- per forward size (rows x columns), the measured time of a loop step (the
  median of the recent ones; CPU time of the process on a CPU, where other
  programs make wall time noisy; wall time on an accelerator); other sizes are
  interpolated;
- each forward takes the draft length ``k`` in ``[0, max_draft]`` that
  minimises the expected time to finish the batch: row ``i`` needs about
  ``left_i / (1 + a_i + ... + a_i ** k)`` more forwards, rows leave as they
  finish, and a forward of ``r`` rows costs ``time(r x (k + 1))``. With one row
  this is the most tokens per second; in a batch it sees that drafting for a
  row that will finish early anyway does not shorten the slowest row.

The batch shares one draft length (a forward is a rectangle: a row that drafts
less leaves padding that costs the same). The first two decode steps measure
a short draft and no draft (committing only what every row confirmed, so no
holes); longer drafts are extrapolated until they are tried. A draft must
promise to save 5% of the time (the measures are noisy), and a decision not
to draft stands for 8 forwards (deciding costs time too). Only the number of
forwards depends on any of this, never the tokens.

What a call learns outlives it (:class:`DraftMemory`, one per model): the step
times, and the model's acceptance rate over its recent rows. A later call on
the same model and device skips the calibration steps and starts each row from
that rate (as a few draft tokens of evidence) instead of the flat prior, so short answers (a few forwards each)
do not pay the calibration again and again.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from statistics import median

import numpy as np

PRIOR = 0.5  # acceptance rate of a row nobody has measured
REMEMBERED = 4.0  # draft tokens' worth of evidence a new row takes from the model's recent rate
FADE = 0.9  # weight kept by past evidence at each forward that tests the row's draft
IDLE_FADE = 0.99  # ... and at each forward that does not (the drift back toward the prior)
SAMPLES = 5  # step times kept per forward size
HOLD = 8  # forwards a "no draft" decision stands before it is reconsidered
MARGIN = 0.05  # a draft must promise to save this share of the time (noise in the measures)
PROBE = 3  # draft length of the prefill and the first timed step (longer ones are extrapolated)


class DraftMemory:
    """What earlier calls on one model measured: step times per forward size and the acceptance rate."""

    def __init__(self):
        self.times: dict[int, deque] = {}  # forward size -> recent step seconds
        self.hits, self.trials = 0.0, 0.0  # faded confirmed / tested draft tokens over all rows

    @property
    def calibrated(self) -> bool:
        """Two forward sizes measured: enough to interpolate and extrapolate costs."""
        return len(self.times) >= 2

    def prior(self) -> float:
        """The model's recent acceptance rate over all rows (``PRIOR`` before any)."""
        return (self.hits + PRIOR) / (self.trials + 1.0)


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


class DraftPolicy:
    """Chooses the jacobi draft length per forward.

    Args:
        max_draft: the longest draft (``add_eos_length``).
        rows: rows in the batch (original indices ``0 .. rows - 1``).
        adaptive: ``False`` always drafts ``max_draft`` (within the budgets).
        clock: the timer (``time.perf_counter``); tests may pass a fake one.
        memory: what earlier calls on the same model measured; updated by this one. A calibrated memory
            skips the calibration steps.
    """

    def __init__(
        self,
        max_draft: int,
        rows: int,
        adaptive: bool = True,
        clock=time.perf_counter,
        memory: DraftMemory | None = None,
    ):
        self.max_draft, self.adaptive, self.clock = max_draft, adaptive, clock
        self.memory = memory or DraftMemory()
        # a new row starts near the model's recent rate, as if it had seen REMEMBERED draft tokens; like
        # its own evidence this fades toward PRIOR while the row does not draft, so it is tried again
        start = REMEMBERED if self.memory.trials > 0 else 0.0
        self.hits = [start * self.memory.prior()] * rows  # faded confirmed draft tokens per row
        self.trials = [start] * rows  # faded tested draft tokens per row
        self.times = self.memory.times  # forward size -> recent step seconds
        self.steps = 0  # forwards of this call
        self.calibrating = not self.memory.calibrated  # steps 0-2 measure costs
        self._last: tuple[int, float] | None = None  # (size, start) of the step being timed
        self._medians = {size: median(samples) for size, samples in self.times.items()}
        self._table: tuple[np.ndarray, np.ndarray] | None = None  # sizes and their median seconds
        self._held: tuple[int, int] = (0, 0)  # (forwards left, rows) of a standing "no draft" decision
        self.candidates = np.array(_candidates(max_draft))

    # --- what the loop reports --------------------------------------------------

    def started(self, size: int, timed: bool = True) -> None:
        """A forward of ``size`` = rows x columns starts now (``timed=False``: do not time this step)."""
        self._last = (size, self.clock()) if timed else None
        self.steps += 1

    def finished(self) -> None:
        """The step begun by :meth:`started` is done (its forward and its bookkeeping): record its time."""
        if self._last is not None:
            size, start = self._last
            self.record(size, self.clock() - start)
            self._last = None

    def record(self, size: int, seconds: float) -> None:
        """Add one measured step time for forwards of ``size`` = rows x columns."""
        samples = self.times.setdefault(size, deque(maxlen=SAMPLES))
        samples.append(seconds)
        self._medians[size] = median(samples)
        self._table = None

    def accepted(self, rows: list[int], drafted: int, accepted: list[int], informative: list[bool]) -> None:
        """Record, per active row, how many of ``drafted`` draft tokens the forward confirmed.

        ``informative[i]`` is False when the row's draft held no prediction yet
        (only placeholders after a step without a draft): it says nothing about
        the row's drafts and is left out.
        """
        hits = trials = 0.0
        for row, count, useful in zip(rows, accepted, informative):
            if drafted and useful:
                tried = min(count + 1, drafted)
                self.hits[row] = self.hits[row] * FADE + count
                self.trials[row] = self.trials[row] * FADE + tried
                hits, trials = hits + count, trials + tried
            else:
                self.hits[row] *= IDLE_FADE
                self.trials[row] *= IDLE_FADE
        if trials:  # the model's rate, over all rows: one fade per forward
            memory = self.memory
            memory.hits, memory.trials = memory.hits * FADE + hits, memory.trials * FADE + trials

    # --- the decision -------------------------------------------------------------

    def holes_ok(self) -> bool:
        """Whether rows may commit different counts now (masked holes).

        Not in a call's first three forwards (the calibration steps, when it
        calibrates): holes make every later forward of a batch without padding
        build a 4-D mask, a cost that a batch which ends up not drafting should
        not pay. Committing only what every row confirmed loses nothing: the
        rest stays in the rows' drafts.
        """
        return not self.adaptive or self.steps > 2

    def rate(self, row: int) -> float:
        """Row ``row``'s estimated chance that a draft token is confirmed."""
        return (self.hits[row] + PRIOR) / (self.trials[row] + 1.0)

    def choose(self, rows: list[int], remaining: list[int]) -> int:
        """The draft length of the next forward for the active ``rows``.

        Args:
            rows: original indices of the active rows.
            remaining: tokens each of them may still generate.
        """
        longest = min(self.max_draft, max(remaining) - 1)
        if longest <= 0:
            return 0
        if not self.adaptive:
            return longest
        # calibration: the prefill drafts a short block (predictions for the next step
        # to verify), one step times a short draft, one times no draft
        if self.calibrating and self.steps <= 1:
            return min(longest, PROBE)
        if self.calibrating and self.steps == 2:
            return 0
        left, held_rows = self._held
        if left > 0 and held_rows == len(rows):  # not drafting is cheap to keep deciding: decide less often
            self._held = (left - 1, held_rows)
            return 0
        k = self._decide(rows, remaining, longest)
        self._held = (HOLD - 1, len(rows)) if k == 0 else (0, 0)
        return k

    def _decide(self, rows: list[int], remaining: list[int], longest: int) -> int:
        ks = self.candidates[: np.searchsorted(self.candidates, longest, side="right")]
        rates = np.array([min(self.rate(r), 0.999) for r in rows])[:, None]
        left = np.array(remaining, dtype=np.float64)[:, None]
        j = np.minimum(ks[None, :], left - 1)  # [rows, candidates]
        expected = rates * (1.0 - rates**j) / (1.0 - rates)
        if len(rows) == 1:  # tokens per second
            total = (left / (1.0 + expected))[0] * self.cost(ks + 1)
        else:
            # 1. forwards each row still needs; rows leave the batch in that order
            finish = left / (1.0 + expected)
            finish.sort(axis=0)
            phases = finish.copy()
            phases[1:] -= finish[:-1]
            active = len(rows) - np.arange(len(rows))[:, None]
            # 2. each phase's forwards at their measured cost
            total = (phases * self.cost(active * (ks[None, :] + 1))).sum(0)
        total[1:] *= 1.0 + MARGIN  # ks[0] == 0
        return int(ks[len(ks) - 1 - int(np.argmin(total[::-1]))])  # ties go to the longer draft: it costs nothing more

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


def _candidates(max_draft: int) -> list[int]:
    """Draft lengths worth comparing: all up to 16, then about 1.5x apart, and ``max_draft``."""
    ks = list(range(min(max_draft, 16) + 1))
    k = 16
    while k < max_draft:
        k = int(k * 1.5)
        ks.append(min(k, max_draft))
    return sorted(set(ks))
