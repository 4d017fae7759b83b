"""Step-wise generation for continuous batching: admit a request, run one step for every row, retire, cancel.

``iterative_generate`` runs a fixed batch to its end. A server cannot: requests
arrive while others are half done, and a request must not wait for the slowest
row of a batch it did not ask to join. A :class:`Stepper` holds the running
rows of one decoding configuration (mode, block size, refine rounds, draft
sources); each :meth:`Stepper.step`:

1. drops the rows that were cancelled (a client left, a stop string appeared);
2. prefills the newly admitted rows in a batch of their own, one step of the
   mode (jacobi: the exact next token plus the model's first guesses; refine:
   one block);
3. runs one step on the running rows: jacobi one forward that verifies each
   row's draft (the loop body of ``dllm.generation.jacobi``, with the same
   ``DraftPolicy`` and ``DraftSources``); refine one block (up to
   ``refine_iter`` forwards);
4. joins the new rows to the running batch (``dllm.generation.batch_merge``) and retires
   the finished ones;
5. compacts the running batch (``batch_merge.compact``: each row's real columns
   moved right, so the batch is as wide as its longest row) when that drops
   more than ``compact_share`` of its cached columns: a batch that never ends
   otherwise widens at the pace of its best row each forward (jacobi holes in
   the others) and pays for every column in every forward's attention.

Newcomers are prefilled in a forward of their own, not inside the running
batch's forward: one forward is a rectangle, so a newcomer's prompt would make
every running row pay for as many query columns. On the trained tiny model of
``bench/quality.py`` on a CPU (``bench/stepper_load.py --forward-costs``) a
step's forward of 15 rows x 4 columns costs ~2.3 ms, a prefill of 2 newcomers
x 28 columns ~1.5 ms, one forward of 17 rows x 32 columns ~7 ms; and gathering
newcomers for a few steps to share one prefill saved forwards (130 against 150
at every 4 steps, 16 clients back to back) but no CPU time, and delays their
first token.

Every row's tokens are exactly what ``iterative_generate`` gives for it alone:
jacobi commits only what plain decoding would (greedy, or the draw keyed on
(seed, prompt, position) of ``dllm.generation.sampling``), and refine blocks start where
the row's own blocks start. Each request has its own sampler (temperature,
top-k, top-p, seed), so requests with different settings share forwards.

This module keeps the requests (admit, cancel, slots, joining and retiring
rows); ``dllm.generation.stepper_steps`` runs the mode's step on a batch of them.

Run a quick check on CPU::

    python -m pytest tests/generation/test_stepper.py -q
"""

from __future__ import annotations

import time

import torch

from dllm.attention import attention_layout
from dllm.generation.batch import Batch
from dllm.generation.batch_merge import compact, holes, merge, trim
from dllm.generation.draft_sources import DraftSources, parse_sources
from dllm.generation.drafting import DraftPolicy, memory_of
from dllm.generation.sampling import Sampler, draw_seed, prompt_keys
from dllm.generation.stepper_steps import Event, Row, jacobi_step, refine_block
from dllm.generation.stop_strings import StopChecks, StopCriterion

__all__ = ["Event", "Stepper"]


class Stepper:
    """The running rows of one decoding configuration; see the module docstring.

    Args:
        model: a Hugging Face causal LM.
        eos_token_id: stop ids; the first is the placeholder.
        mode: ``"jacobi"`` (lossless) or ``"refine"``.
        add_eos_length: N: the longest jacobi draft, or the refine block size minus one.
        refine_iter: refine forwards per block.
        max_length: prompt + generated tokens per row.
        max_rows: running rows at most (admitted requests wait beyond it).
        use_cache: keep a KV cache of the committed columns.
        adaptive_draft: jacobi: choose the draft length per forward (``dllm.generation.drafting``).
        draft_sources: jacobi: ``"all"``, ``"none"`` or a comma list of ``ngram`` / ``pool``.
        static: admit only when no row runs (static batching: a batch runs to its end; the baseline
            that continuous batching is measured against).
        tokenizer: the model's tokenizer; needed for requests with ``stop_strings``.
        compact_share: compact the running batch (``dllm.generation.batch_merge.compact``) when that drops more
            than this share of its cached columns; 1 or more: never. Compacting moves the whole cache (~1 ms for
            16 rows of the tiny model on a CPU), so it waits until the forwards it saves are worth it.
    """

    def __init__(
        self,
        model,
        eos_token_id: list[int],
        *,
        mode: str = "jacobi",
        add_eos_length: int = 15,
        refine_iter: int = 2,
        max_length: int = 8192,
        max_rows: int = 16,
        use_cache: bool = True,
        adaptive_draft: bool = True,
        draft_sources: str = "all",
        static: bool = False,
        tokenizer=None,
        compact_share: float = 0.1,
    ):
        if mode not in ("jacobi", "refine"):
            raise ValueError(f"mode must be 'refine' or 'jacobi', got {mode!r}")
        self.model, self.eos_ids, self.mode = model, list(eos_token_id), mode
        self.n, self.r, self.max_length, self.use_cache = add_eos_length, refine_iter, max_length, use_cache
        self.layout = attention_layout(model)
        # models whose batches run one row at a time in iterative_generate get one row here too
        self.max_rows = max_rows if self.layout[0] in ("plain", "window") else 1
        self.static, self.tokenizer = static, tokenizer
        if compact_share < 0:
            raise ValueError(f"compact_share must be >= 0, got {compact_share}")
        self.compact_share = compact_share
        self.device = next(model.parameters()).device
        self.placeholder = self.eos_ids[0]
        self._eos = torch.tensor(self.eos_ids, device=self.device)
        self.slots: list[Row | None] = [None] * self.max_rows  # a running row's index in the batch is its slot
        self.waiting: list[Row] = []
        self.batch: Batch | None = None
        self.pending: torch.Tensor | None = None  # jacobi: each running row's next model draft [b, N]
        self.predicted: list[int] = []  # ... and how many of its leading tokens are predictions
        self.steps = 0
        if mode == "jacobi":
            clock = time.process_time if self.device.type == "cpu" else time.perf_counter
            memory = memory_of(model, self.device, model.dtype) if adaptive_draft else None
            self.policy = DraftPolicy(add_eos_length, self.max_rows, adaptive_draft, clock, memory)
            self.source_names = parse_sources(draft_sources)
            self.sources = DraftSources(self.source_names, [[self.placeholder]] * self.max_rows, add_eos_length)

    # --- the requests ---------------------------------------------------------------

    def admit(
        self,
        request_id,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_strings: str | list[str] | None = None,
        stop_criterion: StopCriterion | None = None,
    ) -> None:
        """Queue a request; it joins the running rows at the next :meth:`step` with a free slot.

        ``seed`` gives the same tokens as ``iterative_generate(generator=torch.Generator().manual_seed(seed))``
        for this prompt alone; ``None`` draws a fresh seed. ``stop_strings`` / ``stop_criterion`` end the row
        as they end it in ``iterative_generate`` (``dllm.generation.stop_strings``): its last event's tokens
        end at the token that completed a stop string, with ``finish_reason`` ``"eos"``.
        """
        if not prompt_ids or len(prompt_ids) >= self.max_length:
            raise ValueError(f"the prompt must hold 1 to {self.max_length - 1} tokens, got {len(prompt_ids)}")
        stops = StopChecks.build(stop_strings, self.tokenizer, stop_criterion, [list(prompt_ids)])
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sampler = Sampler(temperature, top_k, top_p, draw_seed(generator) if temperature > 0 else 0)
        ids = torch.tensor([prompt_ids])
        key = prompt_keys(ids, torch.ones_like(ids))[0] if temperature > 0 else 0
        budget = min(max_new_tokens, self.max_length - len(prompt_ids))
        self.waiting.append(Row(request_id, list(prompt_ids), budget, sampler, key, stops=stops))

    def cancel(self, request_id) -> None:
        """Retire a request at the next step (waiting or running); its last event says ``"cancelled"``."""
        for row in self.waiting + [r for r in self.slots if r is not None]:
            if row.id == request_id:
                row.cancelled = True

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        return not self.waiting and all(r is None for r in self.slots)

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return sum(r is not None for r in self.slots)

    # --- one step ---------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Cancel, admit, run one step of every row, retire: the events of this step (see the module docstring)."""
        events = self._drop_cancelled()
        new = self._admit_waiting()
        if self.batch is not None:
            events += self._advance(self.batch, prefill=False)
        if new is not None:
            events += self._advance(new, prefill=True)
            if new.rows:
                self._join(new)
        if self.batch is not None and holes(self.batch) > self.compact_share * self.batch.cached:
            compact(self.batch)
        self.steps += 1
        return events

    def _drop_cancelled(self) -> list[Event]:
        events = []
        for row in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(row)
            events.append(Event(row.id, [], "cancelled", 0))
        gone = [s for s, r in enumerate(self.slots) if r is not None and r.cancelled]
        if gone and self.batch is not None:
            for slot in gone:
                row = self.slots[slot]
                events.append(Event(row.id, [], "cancelled", row.forwards))
            self._keep(torch.tensor([s not in gone for s in self.batch.rows], device=self.device))
        return events

    def _admit_waiting(self) -> Batch | None:
        free = [s for s, r in enumerate(self.slots) if r is None]
        if (self.static or self.max_rows == 1) and self.batch is not None:
            free = []  # the next rows start when these are done
        taken = []
        while free and self.waiting:
            slot, row = free.pop(0), self.waiting.pop(0)
            self.slots[slot] = row
            taken.append(slot)
            if self.mode == "jacobi":
                self._reset_slot(slot, row.prompt)
        if not taken:
            return None
        prompts = [self.slots[s].prompt for s in taken]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(taken), width), self.placeholder, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        new = Batch(self.model, ids, mask, self.use_cache, self.layout)
        new.rows = taken
        new.pending = ids.new_full((len(taken), self.n), self.placeholder)
        new.predicted = [0] * len(taken)
        return new

    def _reset_slot(self, slot: int, prompt: list[int]) -> None:
        """A new row in ``slot``: the draft policy's and the sources' per-row state start afresh."""
        self.policy.reset_row(slot)
        fresh = DraftSources(self.source_names, [prompt], self.n)
        if self.sources.ngram is not None:
            self.sources.ngram[slot] = fresh.ngram[0]
        if self.sources.pool is not None:
            self.sources.pool[slot] = fresh.pool[0]
        self.sources._last[slot] = fresh._last[0]

    def _join(self, new: Batch) -> None:
        if self.batch is None or not self.batch.rows:
            self.batch = new
            return
        merge(self.batch, new)
        self.batch.pending = torch.cat([self.batch.pending, new.pending])
        self.batch.predicted = self.batch.predicted + new.predicted

    def _keep(self, going: torch.Tensor) -> None:
        """Keep the running rows where ``going``; free the others' slots."""
        batch = self.batch
        flags = going.tolist()
        for slot, keep in zip(batch.rows, flags):
            if not keep:
                self.slots[slot] = None
        if all(flags):
            return
        if not any(flags):
            self.batch = None
            return
        pending, predicted = batch.pending[going], [p for p, g in zip(batch.predicted, flags) if g]
        batch.keep(going)
        batch.pending, batch.predicted = pending, predicted
        trim(batch)

    def _advance(self, batch: Batch, prefill: bool) -> list[Event]:
        """One step of the mode for ``batch``, then retire its finished rows."""
        if self.mode == "refine":
            going, events = refine_block(self, batch)
        else:
            going, events = jacobi_step(self, batch, prefill)
        if prefill:  # not the running batch yet: drop its finished rows here
            flags = going.tolist()
            for slot, keep in zip(batch.rows, flags):
                if not keep:
                    self.slots[slot] = None
            if any(flags) and not all(flags):
                pending, predicted = batch.pending[going], [p for p, g in zip(batch.predicted, flags) if g]
                batch.keep(going)
                batch.pending, batch.predicted = pending, predicted
            elif not any(flags):
                batch.rows = []
        else:
            self._keep(going)
        return events
