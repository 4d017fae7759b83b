"""How far a row's jacobi drafts survive, per draft source: the acceptance half of the draft policy.

:class:`~dllm.generation.drafting.DraftPolicy` weighs two measured things
against each other: how many draft tokens a forward will confirm, and what a
wider forward costs (``dllm.generation.draft_costs``). This is the first: per
row and per source, a Kaplan-Meier estimate of how far a draft survives (at each
draft position the chance that it is rejected when every token before it was
confirmed, over the recent forwards, older ones fading), starting from the
model's curve (``DraftMemory``) as ``REMEMBERED`` forwards of evidence, and
which source to verify for each row. It lives apart from the policy because it
is a model of the drafts alone: it knows nothing of step times or of the draft
length decision. The reasoning behind the estimates is in
``dllm.generation.drafting``'s docstring and docs/method.md, section 4.
"""

from __future__ import annotations

import numpy as np

from dllm.generation.draft_memory import MODEL, DraftMemory
from dllm.generation.draft_sources import SOURCES

REMEMBERED = 2.0  # forwards' worth of evidence a row takes from the model's curve
FADE = 0.9  # weight kept by past evidence at each forward that tests the row's draft
IDLE_FADE = 0.99  # ... and at each forward that does not (the drift back toward the prior)
USELESS_TRIALS = 8  # tested draft tokens before a text source can be judged useless for a row ...
USELESS_RATE = 0.1  # ... when fewer than this share of them were confirmed: never picked again for it


class Acceptance:
    """Per row and source, the measured survival of drafts; updated by every forward, read by every decision.

    Args:
        max_draft: the longest draft (``add_eos_length``).
        rows: rows in the batch (original indices ``0 .. rows - 1``).
        memory: the model's :class:`DraftMemory`; its curve seeds new rows and learns from this call's.
    """

    def __init__(self, max_draft: int, rows: int, memory: DraftMemory):
        self.max_draft, self.memory = max_draft, memory
        # a new row starts near the model's recent rate, as if it had seen REMEMBERED draft tokens; like
        # its own evidence this fades toward PRIOR while the row does not draft, so it is tried again
        shape = (rows, len(SOURCES), max(max_draft, 1))
        self.reached = np.zeros(shape)  # faded: drafts of a row and source that reached a position
        self.rejected = np.zeros(shape)  # ... and were rejected there
        self.prior = self.memory.hazard(shape[2])  # [source, position], the model's curve
        self.tested = np.zeros(shape[:2])  # unfaded tested / confirmed draft tokens: is a source useless?
        self.confirmed = np.zeros(shape[:2])

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
        of ``bench/quality.py``; docs/method.md, section 3).

        Until the model's drafts were tested at all (on any row of any call),
        every row verifies the model's draft, even one of placeholders only (the
        prefill's). Before that the choice is between two priors, and the text
        prior (``TEXT_HAZARD``) is the optimistic one, while a model trained to
        predict after placeholders drafts best from them: on the packed model of
        ``bench/quality.py`` every row of a model's first batch verified an
        n-gram at the prefill, all 50 broke, and the predictions conditioned on
        them kept its drafts wrong (310 forwards of a 15-token draft of guesses
        confirming none); that batch took 1,227 forwards where the model's own
        drafts take 631, 4.67 tokens per forward at batch 50 against 5.71 with
        ``draft_sources="none"``. Verifying the placeholders costs an untrained
        model at most one forward per row of its first call.

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
            if unknown:  # the model's draft first, placeholders too: priors alone must not pick a text source
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
