"""The jacobi loop: verify one candidate draft per row each forward, commit the confirmed prefix + 1.

Each forward, per active row, the sources (``dllm.generation.draft_sources``) offer
candidates (the model's unconfirmed predictions of the last forward, the
continuation of an earlier occurrence of the last committed tokens, a recycled
n-gram), the policy (``dllm.generation.drafting``) picks one per row and the draft length
of the batch, and the forward verifies them all at once. A row commits the
longest prefix of its draft that the forward's own picks (greedy, or the keyed
sample) confirm, plus the first pick after it: exactly what one-token decoding
would have written, whatever the candidate's source.
"""

from __future__ import annotations

import torch

from dllm.generation.draft_sources import POOL, DraftSources
from dllm.generation.drafting import MODEL, DraftPolicy


def jacobi_loop(run, add_eos_length: int, policy: DraftPolicy, sources: DraftSources) -> None:
    """Verify a draft each forward; commit the confirmed prefix + 1.

    Args:
        run: the generation's per-row bookkeeping (``dllm.generation.engine._Run``).
        add_eos_length: the longest draft.
        policy: picks each row's source and the draft length.
        sources: the text-derived candidates (may have none enabled).
    """
    batch, placeholder = run.batch, run.placeholder
    # each row's next model draft: its unconfirmed predictions, then placeholders
    pending = batch.ids.new_full((len(batch.rows), add_eos_length), placeholder)
    predicted = [0] * len(batch.rows)  # leading predictions in each row's pending draft
    step = 0
    while batch.rows:
        remaining = run.remaining()
        b = len(batch.rows)
        offers = sources.offers(batch.rows) if sources.active else None
        picks, lengths = policy.pick(batch.rows, offers, predicted) if offers is not None else (None, None)
        k = policy.choose(batch.rows, remaining, picks, lengths)
        policy.started(b * (k + 1), timed=step > 0)  # the prefill is not a decode step
        draft = pending[:, :k]
        if k and picks is not None and any(picks):
            draft = _with_candidates(draft, picks, offers, placeholder)
        tokens, logits = run.forward_and_pick(draft)  # [b, k + 1]
        if k:
            accepted = (draft == tokens[:, :k]).long().cumprod(-1).sum(-1)  # confirmed prefix per row
            counts_accepted = confirmed = accepted.tolist()
            if not policy.holes_ok():  # commit what every row confirmed; the rest stays in the drafts
                accepted = accepted.clamp(max=min(confirmed))
                counts_accepted = [min(confirmed)] * b
        else:
            accepted, counts_accepted = None, [0] * b
            confirmed = counts_accepted
        informative = (
            [p > 0 for p in predicted] if picks is None else [s != MODEL or p > 0 for s, p in zip(picks, predicted)]
        )
        shadows = _shadows(pending, predicted, tokens, confirmed, k, picks, offers) if offers is not None else None
        policy.accepted(batch.rows, k, confirmed, informative, picks, lengths, shadows, guesses=predicted)
        if run.tracing():
            draft0, tokens0 = draft[0].tolist(), tokens[0].tolist()
            run.emit(
                logits, k + 1, mode="jacobi", block=step, round=0, draft=draft0, tokens=tokens0,
                changed=[t != d for t, d in zip(tokens0, draft0)] + [True], accepted=counts_accepted[0],
            )  # fmt: skip
        before = [len(run.generated[r]) for r in batch.rows] if sources.active else None
        going = run.accept(tokens, [min(a + 1, r) for a, r in zip(counts_accepted, remaining)])
        if sources.active:
            _observe(run, sources, draft, tokens, confirmed, before, picks, lengths, offers, predicted)
        # Columns: the confirmed draft tokens (already cached), holes for rows that
        # confirmed fewer, then each row's new exact token, fed on the next forward.
        most, start = max(counts_accepted), batch.width
        batch.commit_draft(most, accepted if min(counts_accepted) < most else None)
        batch.commit(tokens.gather(1, accepted[:, None]) if k else tokens)
        batch.rollback(start + most)  # the rejected draft columns
        failed = _failed_candidates(picks, lengths, confirmed, k)
        extra = () if failed is None else (failed,)  # the old six-argument call when no text candidate failed
        pending, predicted = _next_drafts(run, pending, predicted, tokens, accepted, k, *extra)
        policy.finished()
        step += 1
        if not bool(going.all()):
            batch.keep(going)
            pending = pending[going]
            predicted = [p for p, g in zip(predicted, going.tolist()) if g]


def _with_candidates(draft: torch.Tensor, picks: list[int], offers, placeholder: int) -> torch.Tensor:
    """The draft with each row that picked a text source holding its candidate (then placeholders)."""
    k = draft.size(1)
    values = draft.tolist()
    for i, source in enumerate(picks):
        if source != MODEL:
            candidate = list(offers[i][source][:k])
            values[i] = candidate + [placeholder] * (k - len(candidate))
    return torch.tensor(values, dtype=draft.dtype, device=draft.device)


def _observe(run, sources: DraftSources, draft, tokens, confirmed, before, picks, lengths, offers, predicted) -> None:
    """Tell the sources what the forward committed and which of its guesses it rejected."""
    rows, k = run.batch.rows, draft.size(1)
    draft_values, token_values = draft.tolist(), tokens.tolist()
    drafts, stale, new = [], [], []
    for i, row in enumerate(rows):
        source = picks[i] if picks is not None else MODEL
        real = min(lengths[i], k) if source != MODEL else min(predicted[i], k)  # the guesses, not placeholders
        drafts.append(draft_values[i][:real])
        stale.append((sources.last(row), tuple(offers[i][source])) if source == POOL else None)
        new.append(run.generated[row][before[i] :])
    sources.observe(rows, drafts, token_values, confirmed, new, stale)


def _shadows(pending, predicted: list[int], tokens, confirmed: list[int], k: int, picks, offers) -> list[list]:
    """Per row, what each candidate that was not verified would have confirmed: ``(source, reached, rejected)``.

    The forward's picks up to the first rejection are the exact next tokens
    whatever was verified, so every other candidate can be judged against them
    for free: broken after ``reached - 1`` matches (``rejected``), or matching
    all the ``reached`` tokens that are known (censored). Without this a source
    that is not picked is never measured, and a text candidate that wins on its
    prior keeps a trained model's better drafts from ever being tried.
    """
    known = tokens[:, : (max(confirmed) + 1) if k else 1].tolist()
    own = pending[:, : max(predicted, default=0)].tolist()
    out = []
    for i, truth in enumerate(known):
        truth = truth[: confirmed[i] + 1] if k else truth
        candidates = [own[i][: predicted[i]], *offers[i][MODEL + 1 :]]
        row = []
        for source, candidate in enumerate(candidates):
            if candidate is None or (k and source == picks[i]):
                continue
            limit = min(len(truth), len(candidate))
            matched = next((j for j in range(limit) if candidate[j] != truth[j]), limit)
            if limit:
                row.append((source, matched + 1, True) if matched < limit else (source, limit, False))
        out.append(row)
    return out


def _failed_candidates(picks, lengths, confirmed: list[int], k: int) -> list[bool] | None:
    """Per row, whether it verified a text candidate that the forward rejected inside the candidate."""
    if not k or picks is None or not any(picks):
        return None
    return [s != MODEL and a < min(n, k) for s, n, a in zip(picks, lengths, confirmed)]


def _next_drafts(run, pending, predicted: list[int], tokens, accepted, k: int, failed: list[bool] | None = None):
    """Each row's next model draft, and how many of its leading tokens are predictions.

    After a draft of ``k``: the predictions after the row's new token, then
    placeholders. After no draft: the old draft minus its first token (the
    guess for the position just committed).

    A row whose text candidate was rejected (``failed``) keeps its own earlier
    draft instead, moved past the tokens just committed: the forward's
    predictions past the rejection were conditioned on the candidate's wrong
    tokens, while the model's own draft was conditioned on its own converging
    guesses. Taking the spoilt predictions cost the packed model of
    ``bench/quality.py`` more than half its tokens per forward at batch 50
    (2.11 against 4.67; docs/method.md, section 3).
    """
    if k:
        steps = torch.arange(pending.size(1), device=tokens.device)[None, :]
        index = accepted[:, None] + 1 + steps
        fresh = torch.where(index <= k, tokens.gather(1, index.clamp(max=k)), run.placeholder)
        counts = [k - a for a in accepted.tolist()]
        if failed is not None and pending.size(1):
            shifted = [p - a - 1 for p, a in zip(predicted, accepted.tolist())]  # own guesses left past the commit
            keep = [f and s > 0 for f, s in zip(failed, shifted)]
            if any(keep):
                width = pending.size(1)
                own = torch.where(index < width, pending.gather(1, index.clamp(max=width - 1)), run.placeholder)
                mask = torch.tensor(keep, device=tokens.device)[:, None]
                fresh = torch.where(mask, own, fresh)
                counts = [s if kept else c for s, c, kept in zip(shifted, counts, keep)]
        return fresh, counts
    if pending.size(1) and any(predicted):
        pending = torch.cat([pending[:, 1:], torch.full_like(pending[:, :1], run.placeholder)], dim=1)
        predicted = [max(p - 1, 0) for p in predicted]
    return pending, predicted
