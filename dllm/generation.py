"""Block-EOS iterative generation for any Hugging Face causal LM.

Two modes share one engine (see SPEC sections 2-4):

- ``mode="refine"`` (the seed's method): append N EOS placeholders to the text
  so far, read N+1 tokens off one forward, re-run the forward on the drafted
  block up to ``refine_iter - 1`` times, commit the block, stop at EOS.
- ``mode="jacobi"``: lossless. Keep a draft of N tokens after the committed
  text; each forward verifies the draft and commits the longest confirmed
  prefix plus one exact token, so the output is exactly greedy (or sampled)
  next-token decoding, with fewer forwards when the drafts are good.

How the batch is laid out: every row lives on one shared column axis
``[left padding | prompt | generated ...]`` with an attention mask, and
``position_ids`` are ``cumsum(mask) - 1``. When rows commit different numbers
of tokens in one forward (jacobi), the shorter rows get masked *holes*, so a
row's tokens and positions are exactly what they would be if it ran alone.
Finished rows leave the batch (their cache rows are dropped).

The KV cache holds the committed columns. A forward reads the committed
columns not yet cached plus the draft, projects only the last ``n + 1``
positions (``logits_to_keep``), and tentative draft columns are rolled back
with ``cache.crop(-n)``.

Sampling draws Gumbel noise per (row, absolute position) from per-row seeds,
so decoding is a deterministic function of the prefix: refine rounds converge
the same way as under greedy, and jacobi accepts exactly what plain sampling
would have produced.

Run a quick check on CPU::

    python -c "import dllm; help(dllm.iterative_generate)"
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache

Mode = Literal["refine", "jacobi"]


@dataclass
class GenerateOutput:
    """What ``iterative_generate(..., return_dict=True)`` returns.

    Attributes:
        sequences: ``[B, W + T]``: the prompt as given, then the generated
            tokens, right-padded with ``pad_token_id``.
        new_tokens: ``[B]`` number of generated tokens per row (stop token
            included).
        finish_reason: per row, ``"eos"`` (a stop id was generated) or
            ``"length"`` (``max_new_tokens`` or ``max_length`` reached).
        num_forwards: model calls made for the whole batch.
        forwards: ``[B]`` model calls each row took part in.
        tokens_per_forward: generated tokens per forward, per sequence:
            ``new_tokens.sum() / forwards.sum()``. For a single row this is
            total generated tokens / model calls.
    """

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    finish_reason: list[str]
    num_forwards: int
    forwards: torch.Tensor
    tokens_per_forward: float


# ----------------------------------------------------------------------------
# Sampling: pure functions over logits


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask logits outside the top-k, then outside the nucleus top-p, with ``-inf``.

    The nucleus keeps the smallest set of tokens whose probability reaches
    ``top_p``, and always at least the most likely token.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class PositionNoise:
    """Gumbel noise fixed per (row, generated position).

    Each row gets a seed drawn from ``generator``; the noise for generated
    position ``t`` of that row comes from a fresh generator seeded with
    ``seed + t``. Decoding ``argmax(logits / T + noise)`` then samples exactly
    from ``softmax(logits / T)`` and is a deterministic function of the
    prefix, whatever the block size or batch.
    """

    def __init__(self, rows: int, generator: torch.Generator | None, device: torch.device):
        gen_device = generator.device if generator is not None else torch.device("cpu")
        self.seeds = torch.randint(0, 2**62, (rows,), generator=generator, device=gen_device).tolist()
        self.device = device
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, rows: list[int], start: list[int], length: int, vocab: int) -> torch.Tensor:
        """Noise ``[len(rows), length, V]`` for positions ``start[i] ... start[i] + length - 1``."""
        out = []
        for row, first in zip(rows, start):
            for key in [k for k in self._cache if k[0] == row and k[1] < first]:
                del self._cache[key]  # committed positions are never needed again
            row_noise = []
            for pos in range(first, first + length):
                if (row, pos) not in self._cache:
                    gen = torch.Generator(device=self.device).manual_seed(self.seeds[row] + pos)
                    u = torch.rand(vocab, generator=gen, device=self.device, dtype=torch.float64)
                    self._cache[(row, pos)] = -torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))
                row_noise.append(self._cache[(row, pos)])
            out.append(torch.stack(row_noise))
        return torch.stack(out)


def pick_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Greedy (``temperature == 0``) or Gumbel-max sampling of ``[b, n, V]`` logits."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = filter_logits(logits.double() / temperature, top_k, top_p)
    return (scores + noise).argmax(-1)


# ----------------------------------------------------------------------------
# The batch on a shared column axis, with its KV cache


class _Batch:
    """Active rows, their committed columns, mask and KV cache.

    ``ids``/``mask`` hold every committed column (prompt, generated tokens and
    masked holes). The cache holds the first ``cached`` columns; the rest are
    fed on the next forward together with the draft.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool):
        self.model = model
        self.ids = input_ids
        self.mask = attention_mask
        self.rows = list(range(input_ids.size(0)))  # original row index of each active row
        self.cache = DynamicCache(config=model.config) if use_cache else None
        self.cached = 0
        self.num_forwards = 0
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params

    def forward(self, draft: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, n + 1, V]`` at the last committed column and each draft column."""
        n = draft.size(1)
        new_ids = torch.cat([self.ids[:, self.cached :], draft], dim=1)
        mask = torch.cat([self.mask, self.mask.new_ones(draft.shape)], dim=1)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, self.cached :]
        kwargs = {"input_ids": new_ids, "attention_mask": mask, "position_ids": position_ids}
        if self.cache is not None:
            kwargs[self._cache_kwarg] = self.cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = n + 1
        logits = self.model(**kwargs).logits[:, -(n + 1) :]
        self.num_forwards += 1
        if self.cache is not None:
            self.cached = mask.size(1)
        return logits

    def rollback(self, columns: int) -> None:
        """Keep the cache for the first ``columns`` columns only (drop tentative ones).

        The last committed column always stays out of the cache: the next
        forward must read it to predict the token after it.
        """
        columns = min(columns, self.ids.size(1) - 1)
        if self.cache is not None and columns < self.cached:
            self.cache.crop(columns - self.cached)
            self.cached = columns

    def commit(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Append committed columns (``mask`` 0 marks a hole)."""
        self.ids = torch.cat([self.ids, tokens], dim=1)
        self.mask = torch.cat([self.mask, mask.to(self.mask.dtype)], dim=1)

    def keep(self, keep: torch.Tensor) -> None:
        """Keep only the active rows where ``keep`` is True."""
        if bool(keep.all()):
            return
        index = keep.nonzero().squeeze(1)
        self.ids, self.mask = self.ids[index], self.mask[index]
        self.rows = [self.rows[i] for i in index.tolist()]
        if self.cache is not None and self.cached > 0:
            self.cache.batch_select_indices(index)


# ----------------------------------------------------------------------------
# Input checks


def _check_inputs(
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
) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D integer tensor [batch, length], got {shape}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match "
            f"input_ids shape {tuple(input_ids.shape)}"
        )
    if not eos_ids:
        raise ValueError(f"eos_token_id is required (an int or a non-empty list of ints), got {eos_ids!r}")
    if add_eos_length < 0:
        raise ValueError(f"add_eos_length must be >= 0, got {add_eos_length}")
    if refine_iter < 1:
        raise ValueError(f"refine_iter must be >= 1, got {refine_iter}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if mode not in ("refine", "jacobi"):
        raise ValueError(f"mode must be 'refine' or 'jacobi', got {mode!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
    lengths = attention_mask.sum(-1)
    for row, length in enumerate(lengths.tolist()):
        if length == 0:
            raise ValueError(f"input_ids row {row} is empty (attention_mask is all padding)")
        if length >= max_length:
            raise ValueError(f"input_ids row {row} has {length} prompt tokens, not below max_length={max_length}")
    if input_ids.size(1) and bool((attention_mask[:, -1] == 0).any()):
        row = int((attention_mask[:, -1] == 0).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} is right-padded; iterative_generate needs left padding "
            "(tokenizer.padding_side = 'left')"
        )
    return attention_mask


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
    add_eos_length: int = 127,
    refine_iter: int = 2,
    max_new_tokens: int = 1024,
    max_length: int = 8192,
    mode: Mode = "refine",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_dict: bool = False,
) -> torch.Tensor | GenerateOutput:
    """Generate a block of tokens per forward pass (SPEC sections 2-4).

    Args:
        model: any Hugging Face causal LM (``AutoModelForCausalLM``).
        input_ids: ``[B, W]`` prompts, left-padded.
        attention_mask: ``[B, W]``, 0 on padding. ``None`` means no padding.
        eos_token_id: stop id or list of stop ids; the first is the placeholder.
        pad_token_id: fills the output after a row stops; defaults to the first eos id.
        add_eos_length: N, placeholders per block; a block yields N + 1 tokens
            (jacobi: draft length N).
        refine_iter: R >= 1 forwards per block in refine mode (1 = draft only).
        max_new_tokens: generated tokens per row, never exceeded.
        max_length: unpadded prompt + generated tokens per row, never exceeded.
        mode: ``"refine"`` (block drafting) or ``"jacobi"`` (lossless).
        temperature: 0 for greedy, else sampling temperature.
        top_k: keep the k most likely tokens when sampling.
        top_p: nucleus threshold when sampling.
        generator: ``torch.Generator`` for reproducible sampling.
        use_cache: reuse the committed prefix's KV cache (same tokens either way).
        return_dict: return a :class:`GenerateOutput` instead of the tensor.

    Returns:
        ``sequences`` ``[B, W + T]``, or a :class:`GenerateOutput`.
    """
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    attention_mask = _check_inputs(
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
    )
    pad = eos_ids[0] if pad_token_id is None else pad_token_id
    rows = input_ids.size(0)
    prompt_lengths = attention_mask.sum(-1).tolist()
    budgets = [min(max_new_tokens, max_length - p) for p in prompt_lengths]

    batch = _Batch(model, input_ids, attention_mask, use_cache)
    noise = PositionNoise(rows, generator, input_ids.device) if temperature > 0 else None
    run = _Run(batch, eos_ids, budgets, temperature, top_k, top_p, noise)
    if mode == "refine":
        _refine_loop(run, add_eos_length, refine_iter)
    else:
        _jacobi_loop(run, add_eos_length)

    width = max(len(g) for g in run.generated)
    generated = input_ids.new_full((rows, width), pad)
    for row, tokens in enumerate(run.generated):
        generated[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, generated], dim=1)
    if not return_dict:
        return sequences
    new_tokens = torch.tensor([len(g) for g in run.generated])
    forwards = torch.tensor(run.forwards)
    return GenerateOutput(
        sequences=sequences,
        new_tokens=new_tokens,
        finish_reason=run.finish_reason,
        num_forwards=batch.num_forwards,
        forwards=forwards,
        tokens_per_forward=new_tokens.sum().item() / max(forwards.sum().item(), 1),
    )


class _Run:
    """Per-row bookkeeping shared by both modes: generated tokens, budgets, stops."""

    def __init__(self, batch: _Batch, eos_ids, budgets, temperature, top_k, top_p, noise):
        self.batch = batch
        self.eos_ids = eos_ids
        self.budgets = budgets
        self.temperature, self.top_k, self.top_p, self.noise = temperature, top_k, top_p, noise
        rows = len(budgets)
        self.generated: list[list[int]] = [[] for _ in range(rows)]
        self.finish_reason = ["length"] * rows
        self.forwards = [0] * rows
        self._eos = torch.tensor(eos_ids, device=batch.ids.device)

    def remaining(self) -> list[int]:
        """Tokens each active row may still generate."""
        return [self.budgets[r] - len(self.generated[r]) for r in self.batch.rows]

    def forward_and_pick(self, draft: torch.Tensor) -> torch.Tensor:
        """One model call over the draft; the picked tokens ``[b, n + 1]``."""
        logits = self.batch.forward(draft)
        for r in self.batch.rows:
            self.forwards[r] += 1
        noise = None
        if self.noise is not None:
            start = [len(self.generated[r]) for r in self.batch.rows]
            noise = self.noise.get(self.batch.rows, start, logits.size(1), logits.size(-1))
        return pick_tokens(logits, self.temperature, self.top_k, self.top_p, noise)

    def accept(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Append ``tokens[i, :counts[i]]`` to each active row, cut at the first stop id.

        Returns a bool ``[b]``: which rows are still going.
        """
        is_stop = torch.isin(tokens, self._eos).tolist()
        going = []
        for i, row in enumerate(self.batch.rows):
            count = counts[i]
            stop = next((j for j in range(count) if is_stop[i][j]), None)
            if stop is not None:
                count = stop + 1
                self.finish_reason[row] = "eos"
            self.generated[row].extend(tokens[i, :count].tolist())
            going.append(stop is None and len(self.generated[row]) < self.budgets[row])
        return torch.tensor(going, device=tokens.device)


def _refine_loop(run: _Run, add_eos_length: int, refine_iter: int) -> None:
    """SPEC section 2: draft a block under EOS placeholders, refine it, commit it."""
    batch, placeholder = run.batch, run.eos_ids[0]
    while batch.rows:
        counts = [min(add_eos_length + 1, r) for r in run.remaining()]
        k = max(counts)
        start = batch.ids.size(1)
        # 1. draft: k - 1 placeholders after the committed text
        draft = batch.ids.new_full((len(batch.rows), k - 1), placeholder)
        block = run.forward_and_pick(draft)
        # 2. refine: feed the block back until it stops changing
        for _ in range(refine_iter - 1):
            if torch.equal(block[:, : k - 1], draft):
                break  # the next round would read the same input: fixed point
            batch.rollback(start)
            draft = block[:, : k - 1]
            block = run.forward_and_pick(draft)
        # 3. commit. The cache already holds the block's first k - 1 tokens
        # when the last forward read exactly them; otherwise roll back.
        if not torch.equal(block[:, : k - 1], draft):
            batch.rollback(start)
        going = run.accept(block, counts)
        batch.commit(block, torch.ones_like(block))
        batch.keep(going)


def _jacobi_loop(run: _Run, add_eos_length: int) -> None:
    """SPEC section 3: verify a draft each forward; commit the confirmed prefix + 1."""
    batch, placeholder = run.batch, run.eos_ids[0]
    draft = batch.ids.new_full((len(batch.rows), add_eos_length), placeholder)
    while batch.rows:
        remaining = run.remaining()
        n = min(add_eos_length, max(remaining) - 1)  # never draft past every budget
        start = batch.ids.size(1)
        draft = draft[:, :n]
        predicted = run.forward_and_pick(draft)  # [b, n + 1]
        # accepted[i]: draft tokens confirmed by the forward (longest matching prefix)
        accepted = (draft == predicted[:, :n]).long().cumprod(-1).sum(-1)
        counts = [min(a + 1, r) for a, r in zip(accepted.tolist(), remaining)]
        going = run.accept(predicted, counts)
        # Columns: the confirmed draft tokens (already cached), holes for rows that
        # confirmed fewer, then each row's new exact token, fed on the next forward.
        most = int(accepted.max())
        cols = torch.arange(most, device=draft.device)
        batch.commit(draft[:, :most], cols[None, :] < accepted[:, None])
        last = predicted.gather(1, accepted[:, None])
        batch.commit(last, torch.ones_like(last))
        batch.rollback(start + most)  # the rejected draft columns
        # next draft: the unconfirmed predictions, shifted, padded with placeholders
        shifted = torch.full_like(predicted, placeholder)
        index = accepted[:, None] + 1 + torch.arange(n + 1, device=draft.device)[None, :]
        valid = index <= n
        shifted[valid] = predicted.gather(1, index.clamp(max=n))[valid]
        draft = torch.cat([shifted, shifted.new_full((shifted.size(0), add_eos_length), placeholder)], dim=1)
        draft = draft[:, :add_eos_length]
        batch.keep(going)
        draft = draft[going] if not bool(going.all()) else draft
