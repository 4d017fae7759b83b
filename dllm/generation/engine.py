"""Block-EOS iterative generation for any Hugging Face causal LM.

Two modes share one engine (the contract is in ``docs/method.md``):

- ``mode="refine"`` (the original method): append N EOS placeholders to the
  text so far, read N+1 tokens off one forward, re-run the forward on the
  drafted block up to ``refine_iter - 1`` times, commit the block, stop at EOS.
- ``mode="jacobi"``: lossless. Keep a draft after the committed text; each
  forward verifies the draft and commits the longest confirmed prefix plus one
  exact token, so the output is exactly greedy (or sampled) next-token
  decoding, with fewer forwards when the drafts are good. The draft length
  adapts per forward to the measured acceptance and the measured cost of a
  longer forward (``dllm.generation.drafting``), down to plain one-token decoding. The
  draft's tokens come from the model's own guesses, from an earlier occurrence
  of the last committed tokens in the text, or from recycled n-grams
  (``dllm.generation.draft_sources``); the loop is ``dllm.generation.jacobi``.

The rows share one column axis with masked holes where they committed different
numbers of tokens (``dllm.generation.batch``, which also keeps sliding windows exact);
finished rows leave the batch; a row also finishes at the token that completes one of
its ``stop_strings``, where HF's ``generate`` would stop (``dllm.generation.stop_strings``).
Sampling draws one keyed uniform per (seed, row key, position)
(``dllm.generation.sampling``), so decoding is a deterministic function of the prefix:
refine rounds converge as under greedy, jacobi accepts exactly what plain sampling
would have drawn, and a prompt's sample does not depend on its batch.

Run a quick check on CPU::

    python -c "import dllm; help(dllm.iterative_generate)"
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from dllm.attention import attention_layout
from dllm.distributed import distributed
from dllm.generation.batch import Batch, warn_one_row
from dllm.generation.contract import GenerateOutput, TraceStep, check_inputs
from dllm.generation.draft_sources import DraftSources, parse_sources
from dllm.generation.drafting import DraftPolicy, memory_of
from dllm.generation.jacobi import jacobi_loop
from dllm.generation.rank_sync import RankSync
from dllm.generation.sampling import Sampler, draw_seed, filter_logits, prompt_keys, top_candidates
from dllm.generation.stop_strings import StopChecks, StopCriterion

Mode = Literal["refine", "jacobi"]
__all__ = ["GenerateOutput", "TraceStep", "filter_logits", "iterative_generate"]


# ----------------------------------------------------------------------------
# The public entry point


@torch.inference_mode()
def iterative_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    add_eos_length: int = 127,  # refine's block too; for adaptive jacobi 15-127 measure alike (docs/method.md, 4)
    refine_iter: int = 2,
    max_new_tokens: int = 1024,
    max_length: int = 8192,
    mode: Mode = "refine",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    sample_keys: Sequence[int] | None = None,
    sample_offsets: Sequence[int] | None = None,
    use_cache: bool = True,
    adaptive_draft: bool = True,
    draft_sources: str | Sequence[str] = "all",
    sync_ranks: bool = False,
    trace: Callable[[TraceStep], None] | None = None,
    return_dict: bool = False,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    stop_criterion: StopCriterion | None = None,
) -> torch.Tensor | GenerateOutput:
    """Generate a block of tokens per forward pass (refine), or exactly greedy/sampled text in fewer forwards (jacobi).

    Args:
        model: any Hugging Face causal LM (``AutoModelForCausalLM``).
        input_ids: ``[B, W]`` prompts, left-padded.
        attention_mask: ``[B, W]``, 0 on padding. ``None`` means no padding.
        eos_token_id: stop id or list of stop ids; the first is the placeholder.
        pad_token_id: fills the output after a row stops; defaults to the first eos id.
        add_eos_length: N, placeholders per block; a block yields N + 1 tokens.
            Jacobi: the longest draft.
        refine_iter: R >= 1 forwards per block in refine mode (1 = draft only).
        max_new_tokens: generated tokens per row, never exceeded.
        max_length: unpadded prompt + generated tokens per row, never exceeded.
        mode: ``"refine"`` (block drafting) or ``"jacobi"`` (lossless).
        temperature: 0 for greedy, else sampling temperature.
        top_k: keep the k most likely tokens when sampling.
        top_p: nucleus threshold when sampling.
        generator: ``torch.Generator`` that gives the call's base seed (one draw);
            ``None`` draws it from torch's global generator.
        sample_keys: one int per row keying its random numbers (e.g. a hash of the
            record id); ``None`` keys each row by its unpadded prompt ids. A row's
            sample depends only on (seed, key, position), never on its batch.
        sample_offsets: per row, the tokens it already generated when this call goes on
            from an earlier one (its prompt then ends with them, and ``sample_keys`` hold
            the earlier call's keys): its draws continue at that generated position, so
            the tokens are those of one uninterrupted call. ``None``: all 0.
        use_cache: reuse the committed prefix's KV cache (same tokens either way).
        adaptive_draft: jacobi: choose each draft length from 0 to N by measured
            acceptance and measured forward cost; ``False`` always drafts N.
        draft_sources: jacobi: where drafts come from besides the model's own guesses
            (``dllm.generation.draft_sources``): ``"all"`` (default), ``"none"``, or a comma list or
            sequence of ``"ngram"`` (continuation of an earlier occurrence of the last
            committed tokens in the prompt and the text so far) and ``"pool"`` (n-grams
            recycled from earlier forwards' predictions and rejected drafts). Per row and
            forward the policy verifies the candidate with the best measured acceptance.
        sync_ranks: under ``torch.distributed``, keep calling forward on a dummy
            row until every rank is done (FSDP / DeepSpeed ZeRO-3, where each
            forward is a collective). No effect without an initialised process group.
        trace: called after every forward with a :class:`TraceStep` for the first
            row (while it is generating).
        return_dict: return a :class:`GenerateOutput` instead of the tensor.
        stop_strings: a string or strings that end a row where HF's
            ``generate(stop_strings=..., tokenizer=...)`` ends it: at the token that
            completes one (the prompt's tail counts, the token may run past the
            string's end). The rest of that step's commit is dropped, so the tokens
            are HF's; ``finish_reason`` is ``"eos"`` (``dllm.generation.stop_strings``).
        tokenizer: the model's tokenizer; required with ``stop_strings``.
        stop_criterion: a callable ``(tokens, start) -> int | None`` given a row's
            generated tokens after each step (``start`` of them came before it):
            how many to keep when one of the new ones ends the row, else ``None``.
            For stop rules other than HF's (lm-eval's ``hf`` model, ``dllm.evaluation``).

    Returns:
        ``sequences`` ``[B, W + T]``, or a :class:`GenerateOutput`.
    """
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    attention_mask = check_inputs(
        input_ids,
        attention_mask,
        eos_ids,
        add_eos_length,
        refine_iter,
        max_new_tokens,
        max_length,
        mode,
        temperature,
        top_k,
        top_p,
        sample_keys,
        sample_offsets,
    )
    sources = parse_sources(draft_sources)
    pad = eos_ids[0] if pad_token_id is None else pad_token_id
    rows, width = input_ids.shape
    prompt_lengths = attention_mask.sum(-1).tolist()
    texts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)] if stop_strings else []
    stops = StopChecks.build(stop_strings, tokenizer, stop_criterion, texts)  # HF's criterion reads the prompts
    budgets = [min(max_new_tokens, max_length - p) for p in prompt_lengths]
    sampler = Sampler(temperature, top_k, top_p, draw_seed(generator) if temperature > 0 else 0)
    keys = [0] * rows
    if temperature > 0:
        keys = list(sample_keys) if sample_keys is not None else prompt_keys(input_ids, attention_mask)
    offsets = list(sample_offsets) if sample_offsets is not None else [0] * rows
    sync = RankSync(input_ids.device) if sync_ranks and distributed() else None
    settings = dict(
        eos_ids=eos_ids,
        sampler=sampler,
        mode=mode,
        n=add_eos_length,
        r=refine_iter,
        adaptive=adaptive_draft,
        sources=sources,
        sync=sync,
        stops=stops,
    )

    layout = attention_layout(model)
    kind = layout[0]
    if kind in ("plain", "window"):
        run = _decode(
            model, input_ids, attention_mask, budgets, keys, offsets, use_cache, layout, trace, range(rows), **settings
        )
        generated, reasons, forwards, num_forwards = run.generated, run.finish_reason, run.forwards, run.num_forwards
    else:  # one row at a time: no padding, no holes, the model's own masks
        if rows > 1:
            warn_one_row(model, kind)
        generated, reasons, forwards, num_forwards = [], [], [], 0
        for row in range(rows):
            ids = input_ids[row : row + 1, width - prompt_lengths[row] :]
            cached = use_cache and kind == "one-row"
            row_trace = trace if row == 0 else None
            run = _decode(
                model, ids, torch.ones_like(ids), budgets[row : row + 1], keys[row : row + 1],
                offsets[row : row + 1], cached, layout, row_trace, [row], **settings,
            )  # fmt: skip
            generated += run.generated
            reasons += run.finish_reason
            forwards += run.forwards
            num_forwards += run.num_forwards
    if sync is not None:
        sync.finish(model, pad, input_ids.device)

    longest = max(len(g) for g in generated)
    out = input_ids.new_full((rows, longest), pad)
    for row, tokens in enumerate(generated):
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, out], dim=1)
    if not return_dict:
        return sequences
    new_tokens = torch.tensor([len(g) for g in generated])
    forwards = torch.tensor(forwards)
    return GenerateOutput(
        sequences=sequences,
        new_tokens=new_tokens,
        finish_reason=reasons,
        num_forwards=num_forwards,
        forwards=forwards,
        tokens_per_forward=new_tokens.sum().item() / max(forwards.sum().item(), 1),
        sync_forwards=sync.dummies if sync is not None else 0,
    )


def _decode(
    model, input_ids, attention_mask, budgets, keys, offsets, use_cache, layout, trace, ids, **settings
) -> _Run:
    """Run one batch in one mode (``ids``: its rows' indices in the call); returns the finished :class:`_Run`."""
    batch = Batch(model, input_ids, attention_mask, use_cache, layout)
    run = _Run(
        batch, settings["eos_ids"], budgets, settings["sampler"], keys, offsets, trace, settings["sync"],
        settings["stops"], ids,
    )  # fmt: skip
    if settings["mode"] == "refine":
        _refine_loop(run, settings["n"], settings["r"])
    else:
        clock = time.process_time if input_ids.device.type == "cpu" else time.perf_counter
        memory = memory_of(model, input_ids.device, model.dtype)
        policy = DraftPolicy(settings["n"], len(budgets), settings["adaptive"], clock, memory)
        texts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        jacobi_loop(run, settings["n"], policy, DraftSources(settings["sources"], texts, settings["n"]))
    run.num_forwards = batch.num_forwards
    return run


class _Run:
    """Per-row bookkeeping shared by both modes: generated tokens, budgets, stops, the trace."""

    def __init__(self, batch: Batch, eos_ids, budgets, sampler: Sampler, keys, offsets, trace, sync, stops, ids):
        self.batch, self.eos_ids, self.budgets = batch, eos_ids, budgets
        self.sampler, self.keys, self.offsets, self.trace, self.sync = sampler, keys, offsets, trace, sync
        self.stops: StopChecks | None = stops  # stop strings / the caller's criterion
        self.ids = list(ids)  # each row's index in the iterative_generate call
        self.placeholder = eos_ids[0]
        rows = len(budgets)
        self.generated: list[list[int]] = [[] for _ in range(rows)]
        self.finish_reason = ["length"] * rows
        self.forwards = [0] * rows
        self.num_forwards = 0
        self._eos = torch.tensor(eos_ids, device=batch.ids.device)

    def remaining(self) -> list[int]:
        """Tokens each active row may still generate."""
        return [self.budgets[r] - len(self.generated[r]) for r in self.batch.rows]

    def tracing(self) -> bool:
        """Whether this forward is traced (a trace hook, and the first row still generating)."""
        return self.trace is not None and self.batch.rows[0] == 0

    def forward_and_pick(self, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call over the draft: the picked tokens ``[b, n + 1]`` and the logits."""
        if self.sync is not None:
            self.sync.before_forward()
        logits = self.batch.forward(draft)
        for r in self.batch.rows:
            self.forwards[r] += 1
        keys = [self.keys[r] for r in self.batch.rows] if not self.sampler.greedy else ()
        starts = [self.offsets[r] + len(self.generated[r]) for r in self.batch.rows] if not self.sampler.greedy else ()
        return self.sampler.pick(logits, keys, starts), logits

    def accept(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Append ``tokens[i, :counts[i]]`` to each active row, cut at the first stop id or stop string.

        Returns a bool ``[b]``: which rows are still going.
        """
        is_stop = torch.isin(tokens, self._eos).tolist()
        values = tokens.tolist()
        going, before = [], []
        for i, row in enumerate(self.batch.rows):
            count = counts[i]
            stop = next((j for j in range(count) if is_stop[i][j]), None)
            if stop is not None:
                count = stop + 1
                self.finish_reason[row] = "eos"
            before.append(len(self.generated[row]))
            self.generated[row].extend(values[i][:count])
            going.append(stop is None and len(self.generated[row]) < self.budgets[row])
        if self.stops is not None:
            rows = self.batch.rows
            ends = self.stops.ends([self.ids[r] for r in rows], [self.generated[r] for r in rows], before)
            for i, (row, end) in enumerate(zip(rows, ends)):
                if end is not None:  # a stop string ends the row: like a stop id, without one
                    del self.generated[row][end:]
                    self.finish_reason[row] = "eos"
                    going[i] = False
        return torch.tensor(going, device=tokens.device)

    def emit(self, logits: torch.Tensor, length: int, **fields) -> None:
        """Call the trace hook for the first row, with its top-3 candidates at ``length`` positions."""
        top_ids, top_probs = top_candidates(logits[0, :length], self.sampler.temperature)
        self.trace(TraceStep(top_ids=top_ids, top_probs=top_probs, **fields))


def _refine_loop(run: _Run, add_eos_length: int, refine_iter: int) -> None:
    """Draft a block under EOS placeholders, refine it, commit it."""
    batch, placeholder = run.batch, run.placeholder
    block_index = 0
    while batch.rows:
        counts = [min(add_eos_length + 1, r) for r in run.remaining()]
        k = max(counts)
        start = batch.width
        # 1. draft: k - 1 placeholders after the committed text
        draft = batch.ids.new_full((len(batch.rows), k - 1), placeholder)
        block, logits = run.forward_and_pick(draft)
        if run.tracing():
            _trace_refine(run, logits, draft, block, None, counts[0], block_index, 0)
        # 2. refine: feed the block back until it stops changing
        for round_index in range(1, refine_iter):
            if torch.equal(block[:, : k - 1], draft):
                break  # the next round would read the same input: fixed point
            batch.rollback(start)
            draft, previous = block[:, : k - 1], block
            block, logits = run.forward_and_pick(draft)
            if run.tracing():
                _trace_refine(run, logits, draft, block, previous, counts[0], block_index, round_index)
        # 3. commit. The cache already holds the block's first k - 1 tokens
        # when the last forward read exactly them; otherwise roll back.
        if not torch.equal(block[:, : k - 1], draft):
            batch.rollback(start)
        going = run.accept(block, counts)
        batch.commit(block)
        batch.keep(going)
        block_index += 1


def _trace_refine(run, logits, draft, block, previous, k, block_index, round_index) -> None:
    tokens = block[0, :k].tolist()
    before = previous[0, :k].tolist() if previous is not None else [None] * k
    run.emit(
        logits, k, mode="refine", block=block_index, round=round_index, draft=draft[0, : k - 1].tolist(),
        tokens=tokens, changed=[t != p for t, p in zip(tokens, before)],
    )  # fmt: skip
