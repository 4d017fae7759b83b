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
  times cannot swing it. Sizes within 9% share their samples, each size's
  estimate is smoothed over its neighbours and made non-decreasing
  (``dllm.generation.draft_costs``): one noisy or rarely measured size must not
  decide the length; other sizes are interpolated;
- the model's own drafts are judged on their guesses: a placeholder past them
  (the tail of a draft longer than what the last forward predicted) is never
  confirmed and is no evidence about the model;
- each forward takes the draft length ``k`` in ``[0, max_draft]`` that
  minimises the expected time to finish the batch: row ``i`` needs about
  ``left_i / (1 + E_i(k))`` more forwards, rows leave as they finish, and a
  forward of ``r`` rows costs ``time(r x (k + 1))``. ``E_i(k)``: for a text
  candidate, its expected confirmed tokens (the sum of its survival curve up
  to ``k``); for the model's own drafts, the confirmed tokens per forward of
  drafting ``k`` forward after forward (:func:`steady`: a forward that
  confirms ``a`` leaves ``k - a`` guesses for the next). With one row this is
  the most tokens per second; in a batch it sees that drafting for a row that
  will finish early anyway does not shorten the slowest row.

The batch shares one draft length (a forward is a rectangle: a row that drafts
less leaves padding that costs the same). The first two decode steps measure
the longest draft and no draft (committing only what every row confirmed, so
no holes); other lengths are interpolated (extrapolating from a short draft
magnified its noise: one slow 4-token step priced a 16-token draft at 9x a
one-token step on SmolLM2, where it cost 2.5x on a loaded CPU). A draft must promise to save
5% of the time (the measures are noisy); among the lengths within 2% of the
best the longest is taken. A decision stands for ``HOLD`` forwards while only
the model's own drafts are on offer and the rows are the same, unless a step
took twice its size's estimate (deciding costs time too: on a tiny model a
tenth of a step). Every 8 forwards (doubling after each probe, up to 64) the policy
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

import numpy as np

from dllm.generation.draft_acceptance import Acceptance
from dllm.generation.draft_costs import StepCosts, optimistic_cost
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
from dllm.generation.draft_steady import steady

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
    "steady",
]

# forwards a decision stands before it is reconsidered (deciding costs 0.1-0.3 ms: a tenth of a tiny model's step);
# 4 and 16 measured no better on SmolLM2's grounded prompts nor on the recipe model (docs/method.md, section 4) ...
HOLD = 8
SURPRISE = 2.0  # ... unless a step took this many times its size's estimate (a stall: decide afresh)
LONGER = 0.02  # the longest draft whose expected time is within this share of the best (noise in the costs)
PROBE_EVERY = 8  # forwards between probes: a draft longer than the costs say (doubling after each probe) ...
PROBE_MAX = 64  # ... up to this many
RETIME = 4  # a probe times no draft while the one-column size holds fewer step times than this
MARGIN = 0.05  # a draft must promise to save this share of the time (noise in the measures)
PROBE = 3  # draft length of the prefill


def _owned(part: str, name: str, doc: str) -> property:
    """An attribute of a model the policy owns, read (and changed in place) through the policy."""
    return property(lambda self: getattr(getattr(self, part), name), doc=doc)


class DraftPolicy:
    """Chooses the jacobi draft length per forward.

    It owns an acceptance model (:class:`~dllm.generation.draft_acceptance.Acceptance`: how far each
    row's drafts survive, per source, and which source to verify) and a cost model
    (:class:`~dllm.generation.draft_costs.StepCosts`: what a forward of each size costs); it times the
    steps, runs the calibration steps and the probes, and decides the length.

    Args:
        max_draft: the longest draft (``add_eos_length``).
        rows: rows in the batch (original indices ``0 .. rows - 1``).
        adaptive: ``False`` always drafts ``max_draft`` (within the budgets).
        clock: the timer (``time.perf_counter``); tests may pass a fake one.
        memory: what earlier calls on the same model measured; updated by this one. A calibrated memory
            skips the calibration steps.
    """

    # per-row tables (a slot's new row resets them: dllm.generation.stepper) and the step times
    reached = _owned("acceptance", "reached", "``[row, source, position]`` faded drafts that reached a position")
    rejected = _owned("acceptance", "rejected", "... and were rejected there")
    tested = _owned("acceptance", "tested", "``[row, source]`` unfaded tested draft tokens")
    confirmed = _owned("acceptance", "confirmed", "... and those confirmed")
    times = _owned("costs", "times", "forward size -> recent step seconds")

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
        self.acceptance = Acceptance(max_draft, rows, self.memory)
        self.costs = StepCosts(self.memory.times)
        self.steps = 0  # forwards of this call
        self.calibrating = not self.memory.calibrated  # steps 0-2 measure costs
        self._last: tuple[int, float] | None = None  # (size, start) of the step being timed
        self._held = (0, 0, 0)  # (forwards left, rows, k) of a standing decision
        self.candidates = np.array(_candidates(max_draft))
        self._chain, self._chain_at = {}, 0  # row -> steady() at every candidate, and when (in _choices)
        self._choices = 0  # lengths chosen past the calibration
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
            seconds = self.clock() - start
            estimate = self.costs.estimate(size)
            if estimate is not None and seconds > SURPRISE * estimate:  # the costs may be changing: decide afresh
                self._held = (0, 0, 0)
            self.record(size, seconds)
            self._last = None

    def record(self, size: int, seconds: float) -> None:
        """Add one measured step time for forwards of ``size`` = rows x columns (:meth:`StepCosts.record`)."""
        self.costs.record(size, seconds)

    def accepted(
        self, rows, drafted, accepted, informative, picks=None, lengths=None, shadows=None, guesses=None
    ) -> None:
        """Record, per active row, how many of ``drafted`` draft tokens the forward confirmed.

        The arguments are :meth:`Acceptance.accepted`'s, and ``guesses``: per row, how many of the model's
        own draft tokens were guesses (the rest placeholders; ``None``: all). A row that verified the
        model's draft is judged on its guesses only: a placeholder past them is no guess that failed
        (it is never confirmed), and counting it as one made a short draft look like the model's limit.
        """
        if guesses is not None:
            sources = picks if picks is not None else [MODEL] * len(rows)
            given = lengths if lengths is not None else [drafted] * len(rows)
            lengths = [g if s == MODEL else n for s, n, g in zip(sources, given, guesses)]
            picks = sources
        self.acceptance.accepted(rows, drafted, accepted, informative, picks, lengths, shadows)

    def reset_row(self, row: int) -> None:
        """A new row in slot ``row`` (a serving stepper reuses slots): its per-row state starts afresh."""
        for table in (self.reached, self.rejected, self.tested, self.confirmed):
            table[row] = 0.0
        self._chain.pop(row, None)

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
        """``[rows, source, max_draft + 1]``: expected confirmed tokens of a draft of each length."""
        return self.acceptance.expected(rows)

    def rate(self, row: int, source: int = MODEL) -> float:
        """Row ``row``'s estimated chance that the first draft token of ``source`` is confirmed."""
        return self.acceptance.rate(row, source)

    def useless(self, row: int, source: int) -> bool:
        """Whether ``source`` was measured useless for ``row`` (:meth:`Acceptance.useless`)."""
        return self.acceptance.useless(row, source)

    def pick(
        self, rows: list[int], offers: list[list], guesses: list[int] | None = None
    ) -> tuple[list[int], list[int]]:
        """Per active row, the source whose candidate to verify, and that candidate's length.

        The arguments and the rule are :meth:`Acceptance.pick`'s.
        """
        return self.acceptance.pick(rows, offers, guesses)

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
        self._choices += 1
        probe = self._since >= self._probe_every  # a verdict from the measured costs is revisited at a bounded cost
        left, held_rows, held_k = self._held
        if left > 0 and held_rows == len(rows) and only_model and not probe:  # a standing decision
            self._held = (left - 1, held_rows, held_k)
            return min(held_k, longest)
        k = self._decide(rows, remaining, longest, picks, lengths)
        self._held = (HOLD - 1, len(rows), k) if only_model else (0, 0, 0)
        if probe and k > 0 and self._retime(len(rows), k):
            self._since, self._held = 0, (0, 0, 0)
            return 0
        if probe and k < longest:  # (nothing is longer than the longest draft)
            self._since = 0
            optimistic = max(1, self._decide(rows, remaining, longest, picks, lengths, optimistic_cost))
            if optimistic > k:  # the costs may be what is wrong: measure the length a sane estimate picks
                self._probe_every = min(2 * self._probe_every, PROBE_MAX)
                self._held = (0, 0, 0)
                return optimistic
            self._probe_every = PROBE_EVERY
        elif probe:
            self._since, self._probe_every = 0, PROBE_EVERY
        return k

    def _retime(self, rows: int, k: int) -> bool:
        """Whether to time a step without a draft now: the probe the other way round.

        A policy that keeps drafting never times a one-column step again, so
        one slow time of it (a calibration step) stands: on ``bench/quality.py``'s
        sft model it was slower than the 9-column steps the policy then chose
        (1.46 ms on one sample against 1.3-1.4 ms on 16, where it takes 0.9),
        drafting looked free, and adaptive ran at 83% of fixed N=3 at batch 1.
        So while the no-draft size has fewer than ``RETIME`` times and its
        estimate is no cheaper than the draft chosen (a wider forward never
        costs less), a probe times it. Bounded: ``RETIME`` times per size.
        """
        estimate = self.costs.estimate(rows)
        return estimate is not None and self.costs.samples(rows) < RETIME and estimate >= self.cost(rows * (k + 1))

    def _decide(self, rows, remaining, longest, picks, lengths, cost=None) -> int:
        cost = cost or self.cost
        ks = self.candidates[: np.searchsorted(self.candidates, longest, side="right")]
        curves = self.expected(rows)[np.arange(len(rows)), picks]  # [rows, max_draft + 1]
        left = np.array(remaining)[:, None]
        j = np.minimum(ks[None, :], left - 1)  # [rows, candidates]
        if lengths is not None:  # a short candidate confirms at most its own tokens
            j = np.minimum(j, np.array(lengths)[:, None])
        expected = np.take_along_axis(curves, j, axis=1)
        own = np.array(picks) == MODEL
        if own.any():  # the model's own drafts: what drafting k every forward confirms, not the next forward
            expected[own] = self._steady([r for r, o in zip(rows, own) if o], curves[own], j[own])
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
        near = np.flatnonzero(total <= total.min() * (1.0 + LONGER))  # near-ties go to the longer draft: ...
        return int(ks[near[-1]])  # ... it measures further positions, and the cost estimates are noisy

    def _steady(self, rows: list[int], curves: np.ndarray, j: np.ndarray) -> np.ndarray:
        """:func:`steady` of each row at draft lengths ``j``, from a per-row table over every candidate length.

        The chain is the dearest part of a decision (about 2 ms for 50 rows), and a row's curve moves
        little in a few forwards: a row's table is kept for ``HOLD`` forwards, so a batch whose rows
        leave one by one does not recompute it at every decision. Between candidates (16 and up) linear.
        """
        if self._choices - self._chain_at >= HOLD:
            self._chain, self._chain_at = {}, self._choices
        missing = [i for i, row in enumerate(rows) if row not in self._chain]
        if missing:
            every = np.broadcast_to(self.candidates, (len(missing), len(self.candidates)))
            for i, values in zip(missing, steady(curves[missing], every)):
                self._chain[rows[i]] = values
        table = np.stack([self._chain[row] for row in rows])  # [rows, candidates]
        hi = np.minimum(np.searchsorted(self.candidates, j), len(self.candidates) - 1)
        lo = np.maximum(hi - 1, 0)
        x0, x1 = self.candidates[lo], self.candidates[hi]
        share = np.where(x1 > x0, (j - x0) / np.maximum(x1 - x0, 1), 0.0)
        y0, y1 = np.take_along_axis(table, lo, 1), np.take_along_axis(table, hi, 1)
        return y0 + share * (y1 - y0)

    def cost(self, size):
        """Estimated seconds of a step of ``size`` rows x columns (an int or an array; :meth:`StepCosts.cost`)."""
        return self.costs.cost(size)


def _candidates(max_draft: int) -> list[int]:
    """Draft lengths worth comparing: all up to 16, then about 1.5x apart, and ``max_draft``."""
    ks = list(range(min(max_draft, 16) + 1))
    k = 16
    while k < max_draft:
        k = int(k * 1.5)
        ks.append(min(k, max_draft))
    return sorted(set(ks))
