"""The jacobi loop: verify one candidate draft per row each forward, commit the confirmed prefix + 1.

Each forward, per active row, the sources (``dllm.draft_sources``) offer
candidates (the model's unconfirmed predictions of the last forward, the
continuation of an earlier occurrence of the last committed tokens, a recycled
n-gram), the policy (``dllm.drafting``) picks one per row and the draft length
of the batch, and the forward verifies them all at once. A row commits the
longest prefix of its draft that the forward's own picks (greedy, or the keyed
sample) confirm, plus the first pick after it: exactly what one-token decoding
would have written, whatever the candidate's source.
"""

from __future__ import annotations

import torch

from dllm.draft_sources import POOL, DraftSources
from dllm.drafting import MODEL, DraftPolicy


def jacobi_loop(run, add_eos_length: int, policy: DraftPolicy, sources: DraftSources) -> None:
    """Verify a draft each forward; commit the confirmed prefix + 1.

    Args:
        run: the generation's per-row bookkeeping (``dllm.generation._Run``).
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
        policy.accepted(batch.rows, k, confirmed, informative, picks, lengths)
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
        pending, predicted = _next_drafts(run, pending, predicted, tokens, accepted, k)
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


def _next_drafts(run, pending, predicted: list[int], tokens, accepted, k: int):
    """Each row's next model draft, and how many of its leading tokens are predictions.

    After a draft of ``k``: the predictions after the row's new token, then
    placeholders. After no draft: the old draft minus its first token (the
    guess for the position just committed).
    """
    if k:
        steps = torch.arange(pending.size(1), device=tokens.device)[None, :]
        index = accepted[:, None] + 1 + steps
        pending = torch.where(index <= k, tokens.gather(1, index.clamp(max=k)), run.placeholder)
        return pending, [k - a for a in accepted.tolist()]
    if pending.size(1) and any(predicted):
        pending = torch.cat([pending[:, 1:], torch.full_like(pending[:, :1], run.placeholder)], dim=1)
        predicted = [max(p - 1, 0) for p in predicted]
    return pending, predicted
