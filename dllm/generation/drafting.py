"""How long each jacobi draft should be: measured acceptance against the measured cost of a wider forward.

Hugging Face's assisted decoding adapts ``num_assistant_tokens`` with a fixed
rule (+2 when every candidate was accepted, -1 otherwise, never below 1),
blind to what a longer draft costs. A draft is only worth its tokens when the
forward that verifies it is not much dearer than a one-token forward, and that
depends on the model, the batch and the device. So:

- per row and per draft source (``dllm.generation.draft_sources``), a Kaplan-Meier
  estimate of how far a draft survives: at each draft position ``j`` the
  chance that it is rejected when every token before it was confirmed, counted
  over the recent forwards (older ones fade). A row starts from the model's
  estimate over its recent rows (``DraftMemory``; a flat 0.5 before any), worth
  two forwards of evidence. Per position matters because sources differ in
  shape: the model's own guesses fade geometrically, while an n-gram copied
  from the prompt is either wrong at once or right for a long run. While a
  row's model drafts are not tested, their evidence fades slowly toward the
  prior, so a row that turns predictable is tried again;
- every source is measured at every forward, not only the one verified: the
  forward's picks up to the first rejection are the exact next tokens, so each
  candidate that was not verified is judged against them for free (a censored
  observation when it matched all of them);
- per row, the source to verify: the one that commits the most over this
  forward and the next. A text candidate is charged for the model draft it
  displaces (when it is rejected, the predictions past the rejection were
  conditioned on its wrong tokens, so the next forward has no fresh model
  draft), never a text source that was measured useless for the row (fewer
  than 10% of 8 or more tested tokens confirmed);
- per forward size (rows x columns), the cost of a loop step: a low quantile
  (the lowest of up to four, then the 25th percentile of up to 16) of the
  measured times (CPU time of the process on a CPU, wall time on an
  accelerator): other programs slow a step, never speed it, so a few absurd
  times cannot swing it; other sizes are interpolated;
- each forward takes the draft length ``k`` in ``[0, max_draft]`` that
  minimises the expected time to finish the batch: row ``i`` needs about
  ``left_i / (1 + E_i(k))`` more forwards (``E_i(k)``: the expected confirmed
  tokens of a ``k``-token draft of its source, the sum of the survival curve), rows leave as they
  finish, and a forward of ``r`` rows costs ``time(r x (k + 1))``. With one row
  this is the most tokens per second; in a batch it sees that drafting for a
  row that will finish early anyway does not shorten the slowest row.

The batch shares one draft length (a forward is a rectangle: a row that drafts
less leaves padding that costs the same). The first two decode steps measure
the longest draft and no draft (committing only what every row confirmed, so
no holes); other lengths are interpolated (extrapolating from a short draft
magnified its noise: one slow 4-token step priced a 16-token draft at 9x a
one-token step on SmolLM2, where it cost 2.5x on a loaded CPU). A draft must promise to save
5% of the time (the measures are noisy), and a decision not to draft stands
for 8 forwards while only the model's own drafts are on offer (deciding costs
time too). Every 8 forwards (doubling after each probe, up to 64) the policy
asks what it would draft if each drafted token cost only 5% of a one-token
step; when that is longer than its decision it drafts that once (a probe): a
verdict reached from wrong step times is revisited at a bounded cost, and the
probe's own time corrects the estimate. A text source's prior curve is
optimistic past its first position (``TEXT_HAZARD``): a copy is either wrong
at once or right for a while. Only the number of
forwards depends on any of this, never the tokens.

What a call learns outlives it (:class:`DraftMemory`, one per model): the step
times, and the model's survival curve per source over its recent rows. A later call on
the same model and device skips the calibration steps and starts each row from
those curves (as two forwards of evidence) instead of the flat prior, so short answers
(a few forwards each) do not pay the calibration again and again.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from dllm.generation.draft_memory import (
    MODEL,
    PRIOR,
    QUANTILE,
    SAMPLES,
    TEXT_HAZARD,
    DraftMemory,
    forget,
    low,
    memory_of,
)
from dllm.generation.draft_sources import SOURCES

__all__ = [
    "DraftMemory",
    "DraftPolicy",
    "forget",
    "low",
    "memory_of",
    "MODEL",
    "PRIOR",
    "QUANTILE",
    "SAMPLES",
    "TEXT_HAZARD",
]

REMEMBERED = 2.0  # forwards' worth of evidence a row takes from the model's curve
FADE = 0.9  # weight kept by past evidence at each forward that tests the row's draft
IDLE_FADE = 0.99  # ... and at each forward that does not (the drift back toward the prior)
HOLD = 8  # forwards a "no draft" decision stands before it is reconsidered
PROBE_EVERY = 8  # forwards between probes: a draft longer than the costs say (doubling after each probe) ...
PROBE_MAX = 64  # ... up to this many
PROBE_SLOPE = 0.05  # a probe's length: the best draft if each drafted token cost this share of a 1-token step
MARGIN = 0.05  # a draft must promise to save this share of the time (noise in the measures)
PROBE = 3  # draft length of the prefill
USELESS_TRIALS = 8  # tested draft tokens before a text source can be judged useless for a row ...
USELESS_RATE = 0.1  # ... when fewer than this share of them were confirmed: never picked again for it


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
        shape = (rows, len(SOURCES), max(max_draft, 1))
        self.reached = np.zeros(shape)  # faded: drafts of a row and source that reached a position
        self.rejected = np.zeros(shape)  # ... and were rejected there
        self.prior = self.memory.hazard(shape[2])  # [source, position], the model's curve
        self.tested = np.zeros(shape[:2])  # unfaded tested / confirmed draft tokens: is a source useless?
        self.confirmed = np.zeros(shape[:2])
        self.times = self.memory.times  # forward size -> recent step seconds
        self.steps = 0  # forwards of this call
        self.calibrating = not self.memory.calibrated  # steps 0-2 measure costs
        self._last: tuple[int, float] | None = None  # (size, start) of the step being timed
        self._medians = {size: low(samples) for size, samples in self.times.items()}
        self._table: tuple[np.ndarray, np.ndarray] | None = None  # sizes and their median seconds
        self._held: tuple[int, int] = (0, 0)  # (forwards left, rows) of a standing "no draft" decision
        self.candidates = np.array(_candidates(max_draft))
        self._since = 0  # forwards since the last probe
        self._probe_every = PROBE_EVERY  # ... before the next one

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
        self._medians[size] = low(samples)
        self._table = None

    def accepted(
        self,
        rows: list[int],
        drafted: int,
        accepted: list[int],
        informative: list[bool],
        picks: list[int] | None = None,
        lengths: list[int] | None = None,
        shadows: list[list[tuple[int, int, bool]]] | None = None,
    ) -> None:
        """Record, per active row, how many of ``drafted`` draft tokens the forward confirmed.

        Args:
            rows: original indices of the active rows.
            drafted: the draft length of the forward.
            accepted: per row, the confirmed draft tokens.
            informative: per row, False when its draft held no guess (only placeholders after a step
                without a draft): it says nothing about the row's drafts and is left out.
            picks: per row, the source of its draft (``None``: all the model's own).
            lengths: per row, how many draft tokens its source offered (fewer than ``drafted`` when
                a candidate was short); ``None``: ``drafted``.
            shadows: per row, what the candidates that were not verified would have confirmed, judged
                against the tokens the forward committed: ``(source, reached, rejected)``, the candidate
                matched ``reached - 1`` committed tokens and then broke (``rejected``) or matched all
                ``reached`` that are known (censored). ``None``: none.
        """
        memory = (self.memory.reached[self.reached.shape[2]], self.memory.rejected[self.reached.shape[2]])
        faded = set()
        for i, (row, count, useful) in enumerate(zip(rows, accepted, informative)):
            source = picks[i] if picks is not None else MODEL
            offered = min(lengths[i], drafted) if lengths is not None else drafted
            tested = {source} if offered and useful else set()
            if tested:
                count = min(count, offered)
                tried = min(count + 1, offered)
                self._learn(row, source, tried, count < offered, faded, memory)
                self.tested[row, source] += tried
                self.confirmed[row, source] += count
            for other, reached, rejected in shadows[i] if shadows is not None else ():
                if reached and other not in tested:
                    self._learn(row, other, reached, rejected, faded, memory)
                    tested.add(other)
            if MODEL not in tested:  # the model's drafts untested: fade toward the prior
                self.reached[row, MODEL] *= IDLE_FADE
                self.rejected[row, MODEL] *= IDLE_FADE

    def _learn(self, row: int, source: int, reached: int, rejected: bool, faded: set, memory) -> None:
        """One forward's evidence on a row's source: positions ``< reached`` tested, a rejection at the last."""
        self.reached[row, source] *= FADE
        self.rejected[row, source] *= FADE
        self.reached[row, source, :reached] += 1.0
        memory_reached, memory_rejected = memory
        if source not in faded:  # the model's curve: one fade per forward that tested the source
            memory_reached[source] *= FADE
            memory_rejected[source] *= FADE
            faded.add(source)
        memory_reached[source, :reached] += 1.0
        if rejected:
            self.rejected[row, source, reached - 1] += 1.0
            memory_rejected[source, reached - 1] += 1.0

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

    def expected(self, rows: list[int]) -> np.ndarray:
        """``[rows, source, max_draft + 1]``: expected confirmed tokens of a draft of each length.

        The Kaplan-Meier survival curve of each row and source (its own faded
        evidence, plus the model's curve as ``REMEMBERED`` forwards of it),
        summed over the positions.
        """
        reached, rejected = self.reached[rows], self.rejected[rows]
        self.prior = self.memory.hazard(self.reached.shape[2])  # the model's curve as it stands: rows teach rows
        hazard = (rejected + REMEMBERED * self.prior) / (reached + REMEMBERED)
        survival = np.cumprod(1.0 - np.minimum(hazard, 1.0), axis=-1)
        return np.concatenate([np.zeros(survival.shape[:2] + (1,)), np.cumsum(survival, axis=-1)], axis=-1)

    def rate(self, row: int, source: int = MODEL) -> float:
        """Row ``row``'s estimated chance that the first draft token of ``source`` is confirmed."""
        return float(self.expected([row])[0, source, 1])

    def useless(self, row: int, source: int) -> bool:
        """Whether ``source`` was measured useless for ``row``: a text source that had its chance.

        The model's own drafts are never ruled out: the length decision weighs
        them each forward, and a row whose guesses turn good is tried again.
        """
        tested = self.tested[row, source]
        return source != MODEL and tested >= USELESS_TRIALS and self.confirmed[row, source] < USELESS_RATE * tested

    def pick(
        self, rows: list[int], offers: list[list], guesses: list[int] | None = None
    ) -> tuple[list[int], list[int]]:
        """Per active row, the source whose candidate to verify, and that candidate's length.

        Among the sources with a candidate for the row and not measured useless
        for it, the one that commits the most over this forward and the next.
        A text candidate is charged for the model draft it displaces: when it is
        rejected, the forward's predictions past the rejection were conditioned
        on its wrong tokens, so the next forward starts from what is left of the
        model's own draft (its guesses past the committed tokens), not from a
        fresh one. So a text candidate of ``E_t`` expected tokens that survives
        whole with chance ``S_t`` beats the model's draft of ``E_m(g)`` (``g``
        guesses) only when ``E_t - (1 - S_t) (E_m(n) - E_m(g - 1)) > E_m(g)``,
        ``n`` the longest draft; ties go to the model. Without the charge a
        trained model's placeholder drafts (``g = 0``, after a draft confirmed
        whole) lost to any n-gram, which spoilt the next draft in turn (with the
        other causes: 5.28 tokens per forward fell to 2.42 on the recipe model
        of ``bench/quality.py``; docs/method.md, section 3). Until the
        model's drafts were tested at all (on any row of any call), a row with
        model guesses verifies those.

        Args:
            rows: original indices of the active rows.
            offers: per row, per source, the candidate (``None``: none); the model's slot is ignored.
            guesses: per row, how many of the model's own draft tokens are guesses (the rest are
                placeholders); ``None``: ``max_draft``.

        Returns:
            ``(picks, lengths)``: the source per row, and its candidate's length (``max_draft`` for the model).
        """
        expected = self.expected(rows)
        unknown = not self.memory.reached[self.reached.shape[2]][MODEL, 0]  # the model's drafts never tested
        picks, lengths = [], []
        for i, (row, offer) in enumerate(zip(rows, offers)):
            best, length = MODEL, self.max_draft
            most = expected[i, MODEL, self.max_draft if guesses is None else min(guesses[i], self.max_draft)]
            if unknown and most > 0:  # try the model's own guesses first: they cost nothing to offer
                picks.append(best)
                lengths.append(length)
                continue
            guessed = self.max_draft if guesses is None else min(guesses[i], self.max_draft)
            displaced = expected[i, MODEL, self.max_draft] - expected[i, MODEL, max(guessed - 1, 0)]
            for source in range(len(SOURCES) - 1, MODEL, -1):
                candidate = offer[source]
                if candidate is not None and not self.useless(row, source):
                    n = min(len(candidate), self.max_draft)
                    whole = expected[i, source, n] - expected[i, source, n - 1] if n else 0.0  # survives whole
                    gain = expected[i, source, n] - (1.0 - whole) * displaced
                    if gain > most:
                        best, most, length = source, gain, len(candidate)
            picks.append(best)
            lengths.append(length)
        return picks, lengths

    def choose(
        self, rows: list[int], remaining: list[int], picks: list[int] | None = None, lengths: list[int] | None = None
    ) -> int:
        """The draft length of the next forward for the active ``rows``.

        Args:
            rows: original indices of the active rows.
            remaining: tokens each of them may still generate.
            picks: per row, the source of its draft (from :meth:`pick`; ``None``: the model's own).
            lengths: per row, its candidate's length (``None``: ``max_draft``).
        """
        longest = min(self.max_draft, max(remaining) - 1)
        if longest <= 0:
            return 0
        if not self.adaptive:
            return longest
        # calibration: the prefill drafts a short block (predictions for the next step to verify),
        # one step times the longest draft (shorter ones are then interpolated: extrapolating
        # from a short one magnifies its noise), one times no draft
        if self.calibrating and self.steps == 0:
            return min(longest, PROBE)
        if self.calibrating and self.steps == 1:
            return longest
        if self.calibrating and self.steps == 2:
            return 0
        picks = picks or [MODEL] * len(rows)
        only_model = not any(picks)
        self._since += 1
        probe = self._since >= self._probe_every  # a verdict from the measured costs is revisited at a bounded cost
        left, held_rows = self._held
        if left > 0 and held_rows == len(rows) and only_model and not probe:  # not drafting is cheap to keep
            self._held = (left - 1, held_rows)
            return 0
        k = self._decide(rows, remaining, longest, picks, lengths)
        self._held = (HOLD - 1, len(rows)) if k == 0 and only_model else (0, 0)
        if probe:
            self._since = 0
            optimistic = max(1, self._decide(rows, remaining, longest, picks, lengths, _optimistic))
            if optimistic > k:  # the costs may be what is wrong: measure the length a sane estimate picks
                self._probe_every = min(2 * self._probe_every, PROBE_MAX)
                self._held = (0, 0)
                return optimistic
            self._probe_every = PROBE_EVERY
        return k

    def _decide(self, rows, remaining, longest, picks, lengths, cost=None) -> int:
        cost = cost or self.cost
        ks = self.candidates[: np.searchsorted(self.candidates, longest, side="right")]
        curves = self.expected(rows)[np.arange(len(rows)), picks]  # [rows, max_draft + 1]
        left = np.array(remaining)[:, None]
        j = np.minimum(ks[None, :], left - 1)  # [rows, candidates]
        if lengths is not None:  # a short candidate confirms at most its own tokens
            j = np.minimum(j, np.array(lengths)[:, None])
        expected = np.take_along_axis(curves, j, axis=1)
        left = left.astype(np.float64)
        if len(rows) == 1:  # tokens per second
            total = (left / (1.0 + expected))[0] * cost(ks + 1)
        else:
            # 1. forwards each row still needs; rows leave the batch in that order
            finish = left / (1.0 + expected)
            finish.sort(axis=0)
            phases = finish.copy()
            phases[1:] -= finish[:-1]
            active = len(rows) - np.arange(len(rows))[:, None]
            # 2. each phase's forwards at their measured cost
            total = (phases * cost(active * (ks[None, :] + 1))).sum(0)
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


def _optimistic(size):
    """The cheapest plausible step cost, in one-token steps: ``PROBE_SLOPE`` of one per extra column.

    A probe drafts what this prior would choose (the measured costs may be the
    very thing that is wrong), so it measures the size a sane cost estimate
    would pick: an absurd step time at that size is then outvoted (:func:`low`).
    """
    return 1.0 + PROBE_SLOPE * (np.asarray(size, dtype=np.float64) - 1.0)


def _candidates(max_draft: int) -> list[int]:
    """Draft lengths worth comparing: all up to 16, then about 1.5x apart, and ``max_draft``."""
    ks = list(range(min(max_draft, 16) + 1))
    k = 16
    while k < max_draft:
        k = int(k * 1.5)
        ks.append(min(k, max_draft))
    return sorted(set(ks))
