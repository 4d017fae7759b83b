"""One step of a :class:`~dllm.generation.stepper.Stepper`'s batch: the forward, the acceptance, a jacobi
forward, a refine block.

``dllm.generation.stepper`` keeps the requests (admit, cancel, slots, joining and
retiring rows); this module runs the mode on one batch of them and returns
which rows go on and each row's :class:`Event`. The jacobi step is the body of
``dllm.generation.jacobi``'s loop (same ``DraftPolicy`` and ``DraftSources``), the
refine block the body of ``dllm.generation.engine._refine_loop``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dllm.generation.batch import Batch
from dllm.generation.drafting import MODEL, PROBE
from dllm.generation.jacobi import _next_drafts, _observe, _with_candidates
from dllm.generation.sampling import Sampler
from dllm.generation.stop_strings import StopChecks


@dataclass
class Event:
    """What one step did for one request.

    Attributes:
        id: the request's id (as given to :meth:`Stepper.admit`).
        tokens: the tokens committed by this step (a stop id included; none past a stop string).
        finish_reason: ``None`` while it runs; then ``"eos"`` (a stop id or stop string), ``"length"`` (its budget) or
            ``"cancelled"`` (by :meth:`Stepper.cancel`).
        forwards: model calls the request has taken part in so far.
    """

    id: object
    tokens: list[int]
    finish_reason: str | None = None
    forwards: int = 0


@dataclass
class Row:
    """One request's state in a stepper (its slot's row)."""

    id: object
    prompt: list[int]
    budget: int
    sampler: Sampler
    key: int
    generated: list[int] = field(default_factory=list)
    forwards: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    stops: StopChecks | None = None  # its stop strings / criterion (one row: its prompt is row 0)


def forward_and_pick(stepper, batch: Batch, draft: torch.Tensor) -> torch.Tensor:
    """One forward over the draft: each row's picks ``[b, k + 1]`` (greedy, or its own keyed sampler)."""
    logits = batch.forward(draft)
    tokens = logits.argmax(-1)
    for i, slot in enumerate(batch.rows):
        row = stepper.slots[slot]
        row.forwards += 1
        if not row.sampler.greedy:
            tokens[i] = row.sampler.pick(logits[i : i + 1], [row.key], [len(row.generated)])[0]
    return tokens


def accept(stepper, batch: Batch, tokens: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, list[Event]]:
    """Append ``tokens[i, :counts[i]]`` to each row, cut at its first stop id or stop string: which rows go on,
    and the events."""
    is_stop = torch.isin(tokens, stepper._eos).tolist()
    values = tokens.tolist()
    going, events = [], []
    for i, slot in enumerate(batch.rows):
        row, count = stepper.slots[slot], counts[i]
        stop = next((j for j in range(count) if is_stop[i][j]), None)
        if stop is not None:
            count, row.finish_reason = stop + 1, "eos"
        new, start = values[i][:count], len(row.generated)
        row.generated.extend(new)
        end = row.stops.ends([0], [row.generated], [start])[0] if row.stops is not None else None
        if end is not None:  # a stop string: like a stop id, without one
            del row.generated[end:]
            new, row.finish_reason = new[: end - start], "eos"
        if row.finish_reason is None and len(row.generated) >= row.budget:
            row.finish_reason = "length"
        going.append(row.finish_reason is None)
        events.append(Event(row.id, new, row.finish_reason, row.forwards))
    return torch.tensor(going, device=tokens.device), events


def remaining_of(stepper, batch: Batch) -> list[int]:
    """Each row's tokens still to generate."""
    return [stepper.slots[s].budget - len(stepper.slots[s].generated) for s in batch.rows]


def refine_block(stepper, batch: Batch) -> tuple[torch.Tensor, list[Event]]:
    """One refine block: draft under placeholders, refine up to ``refine_iter`` rounds, commit
    (``dllm.generation.engine._refine_loop``'s body)."""
    counts = [min(stepper.n + 1, r) for r in remaining_of(stepper, batch)]
    k, start = max(counts), batch.width
    draft = batch.ids.new_full((len(batch.rows), k - 1), stepper.placeholder)
    block = forward_and_pick(stepper, batch, draft)
    for _ in range(1, stepper.r):
        if torch.equal(block[:, : k - 1], draft):
            break
        batch.rollback(start)
        draft = block[:, : k - 1]
        block = forward_and_pick(stepper, batch, draft)
    if not torch.equal(block[:, : k - 1], draft):
        batch.rollback(start)
    going, events = accept(stepper, batch, block, counts)
    batch.commit(block)
    return going, events


def jacobi_step(stepper, batch: Batch, prefill: bool) -> tuple[torch.Tensor, list[Event]]:
    """One verifying forward (``dllm.generation.jacobi.jacobi_loop``'s body).

    A prefill drafts ``PROBE`` placeholders (the model's first guesses for the next
    forward to verify) and is neither timed nor learnt from.
    """
    policy, sources, rows = stepper.policy, stepper.sources, batch.rows
    remaining = remaining_of(stepper, batch)
    pending, predicted = batch.pending, batch.predicted
    offers = picks = lengths = None
    if prefill:
        k = min(PROBE, stepper.n, max(remaining) - 1)
    else:
        offers = sources.offers(rows) if sources.active else None
        if offers is not None:
            picks, lengths = policy.pick(rows, offers, predicted)
        k = policy.choose(rows, remaining, picks, lengths)
        policy.started(len(rows) * (k + 1), timed=policy.steps > 0)
    draft = pending[:, :k]
    if k and picks is not None and any(picks):
        draft = _with_candidates(draft, picks, offers, stepper.placeholder)
    tokens = forward_and_pick(stepper, batch, draft)
    if k:
        accepted = (draft == tokens[:, :k]).long().cumprod(-1).sum(-1)
        counts = confirmed = accepted.tolist()
        if prefill or not policy.holes_ok():  # commit what every row confirmed; the rest stays drafted
            accepted = accepted.clamp(max=min(confirmed))
            counts = [min(confirmed)] * len(rows)
    else:
        accepted, counts = None, [0] * len(rows)
        confirmed = counts
    if not prefill:
        informative = (
            [p > 0 for p in predicted] if picks is None else [s != MODEL or p > 0 for s, p in zip(picks, predicted)]
        )
        policy.accepted(rows, k, confirmed, informative, picks, lengths, guesses=predicted)
    before = [len(stepper.slots[s].generated) for s in rows]
    going, events = accept(stepper, batch, tokens, [min(a + 1, r) for a, r in zip(counts, remaining)])
    if sources.active:  # a prefill's draft holds no guess: the sources only read the new tokens
        view = _RunView(stepper, batch)
        _observe(view, sources, draft, tokens, confirmed, before, picks, lengths, offers, predicted)
    most, start = max(counts), batch.width
    batch.commit_draft(most, accepted if min(counts) < most else None)
    batch.commit(tokens.gather(1, accepted[:, None]) if k else tokens)
    batch.rollback(start + most)
    batch.pending, batch.predicted = _next_drafts(_RunView(stepper, batch), pending, predicted, tokens, accepted, k)
    if not prefill:
        policy.finished()
    return going, events


class _RunView:
    """What ``dllm.generation.jacobi``'s helpers read of a run: the batch, each row's tokens, the placeholder."""

    def __init__(self, stepper, batch: Batch):
        self.batch, self.placeholder = batch, stepper.placeholder
        self.generated = _Generated(stepper)


class _Generated:
    """``run.generated[slot]`` of a stepper: the row's generated tokens."""

    def __init__(self, stepper):
        self.stepper = stepper

    def __getitem__(self, slot: int) -> list[int]:
        return self.stepper.slots[slot].generated
