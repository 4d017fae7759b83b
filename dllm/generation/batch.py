"""The active rows of a generation on one shared column axis, with their KV cache and attention masks.

Every row lives on ``[left padding | prompt | generated ...]`` columns with an
attention mask and ``position_ids`` (the count of real tokens before a column).
When rows commit different numbers of tokens in one forward (jacobi), the
shorter rows get masked *holes*, so a row's tokens and positions are exactly
what they would be if it ran alone. Finished rows leave the batch.

Causality in columns is causality in positions, so a plain causal model could
build its mask from the 2-D one. A sliding window, though, is a distance in
positions, and a hole inside it would eat a real token's place; so for models
with sliding-window layers (Mistral, Qwen2 with ``use_sliding_window``,
Gemma2/3 hybrids) the batch passes explicit 4-D masks whose window is measured
in ``position_ids``, one per layer kind. Plain models get the 2-D mask while
the batch has no padding and no hole (the model then builds no mask at all);
otherwise, with sdpa or eager attention, the batch builds the 4-D mask itself,
which costs less than the model's own.

The KV cache holds the committed columns; a forward reads the uncached
committed columns plus a tentative draft, and the draft is rolled back by
cropping. Every cache layer here supports crop: sliding layers keep the whole
history too (the mask, not the cache, applies the window).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from transformers import DynamicCache


def warn_one_row(model, kind: str) -> None:
    """One line saying why a batch runs one row at a time."""
    config = model.config.get_text_config(decoder=True)
    why = (
        f"attn_implementation={config._attn_implementation!r} takes no 4-D mask"
        if kind == "one-row"
        else "its attention layers are not all full or sliding-window"
    )
    warnings.warn(f"iterative_generate: {type(model).__name__}: {why}; generating one row at a time", stacklevel=3)


class Batch:
    """Active rows, their committed columns, mask, positions and KV cache.

    Columns ``[0, width)`` are committed (prompt, generated tokens and masked
    holes); the cache holds the first ``cached`` of them. Buffers grow by
    doubling; columns past ``width`` are scratch for the draft.

    Args:
        model: the causal LM.
        input_ids: ``[B, W]`` left-padded prompts.
        attention_mask: ``[B, W]``, 0 on padding.
        use_cache: keep a KV cache of the committed columns.
        layout: ``(kind, window, hybrid)`` from :func:`attention_layout`; a one-row
            kind means the model's own masks only.
    """

    def __init__(self, model, input_ids, attention_mask, use_cache: bool, layout=("plain", None, False)):
        self.model = model
        rows, width = input_ids.shape
        capacity = width + 64
        self._ids = input_ids.new_zeros(rows, capacity)
        self._mask = input_ids.new_zeros(rows, capacity)
        self._pos = input_ids.new_zeros(rows, capacity)
        self._ids[:, :width] = input_ids
        self._mask[:, :width] = attention_mask
        self._pos[:, :width] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.next_pos = attention_mask.long().sum(-1)  # position of each row's next token
        self.width = width
        self.rows = list(range(rows))  # original row index of each active row
        self.cache = DynamicCache() if use_cache else None
        self.cached = 0
        self.num_forwards = 0
        kind, window, self.hybrid = layout
        self.window = window if kind == "window" else None  # one row alone: the model's own window is right
        # sdpa and eager take explicit 4-D masks; ours are cheaper than the model's
        # whenever it would build one anyway (padding, holes, or a draft after the cache)
        implementation = getattr(model.config, "_attn_implementation", None)
        self._own_masks = kind in ("plain", "window") and implementation in ("sdpa", "eager")
        self._eager = implementation == "eager"
        self.holey = bool((attention_mask == 0).any())  # any padding or hole column
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._arange = torch.arange(capacity, device=input_ids.device)

    # --- buffers --------------------------------------------------------------

    def _reserve(self, end: int) -> None:
        capacity = self._ids.size(1)
        if end <= capacity:
            return
        capacity = max(end, 2 * capacity)
        for name in ("_ids", "_mask", "_pos"):
            old = getattr(self, name)
            new = old.new_zeros(old.size(0), capacity)
            new[:, : self.width] = old[:, : self.width]
            setattr(self, name, new)
        self._arange = torch.arange(capacity, device=self._ids.device)

    @property
    def ids(self) -> torch.Tensor:
        """Committed columns ``[b, width]`` (a view)."""
        return self._ids[:, : self.width]

    # --- the model call -------------------------------------------------------

    def forward(self, draft: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, n + 1, V]`` at the last committed column and each of the ``n`` draft columns."""
        n = draft.size(1)
        start, end = self.cached, self.width + n
        self._reserve(end)
        if n:
            self._ids[:, self.width : end] = draft
            self._mask[:, self.width : end] = 1
            self._pos[:, self.width : end] = self.next_pos[:, None] + self._arange[:n]
        kwargs = {"input_ids": self._ids[:, start:end], "position_ids": self._pos[:, start:end]}
        if self.window is not None or (self._own_masks and (self.holey or (start > 0 and n > 0))):
            kwargs["attention_mask"] = self._masks(start, end)
        else:  # no padding, no holes, or an attention that takes no 4-D mask: the model's own mask
            kwargs["attention_mask"] = self._mask[:, :end]
        if self.cache is not None:
            kwargs[self._cache_kwarg] = self.cache
        kwargs["use_cache"] = self.cache is not None
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = n + 1
        logits = self.model(**kwargs).logits[:, -(n + 1) :]
        self.num_forwards += 1
        if self.cache is not None:
            self.cached = end
        return logits

    def _masks(self, start: int, end: int):
        """4-D masks for query columns ``[start, end)``: causal in columns, the window in positions."""
        valid = self._mask[:, :end].bool()
        if end - start == 1 and self.window is None:  # one query, the last committed token: it sees every real column
            return self._format({"full": valid[:, None, :]})
        kv, q = self._arange[:end][None, :], self._arange[start:end][:, None]
        full = (kv <= q)[None] & valid[:, None, :]  # [b, q, kv]
        # A padding query sees nothing; let it see itself, so no softmax row is all
        # masked (NaN in eager attention computed in a narrower dtype). No real
        # token ever attends to a padding column, so this changes no output.
        full = full | ((kv == q)[None] & ~valid[:, start:end, None])
        if self.window is None:
            masks = {"full": full}
        else:
            distance = self._pos[:, start:end, None] - self._pos[:, None, :end]
            sliding = full & (distance < self.window)
            masks = {"full_attention": full, "sliding_attention": sliding} if self.hybrid else {"sliding": sliding}
        return self._format(masks)

    def _format(self, masks: dict):
        """``[b, q, kv]`` bool masks as the attention wants them: ``[b, 1, q, kv]``, additive for eager."""
        if self._eager:
            dtype = self.model.dtype
            zero = torch.zeros((), dtype=dtype, device=self._ids.device)
            masks = {k: torch.where(m, zero, torch.finfo(dtype).min) for k, m in masks.items()}
        masks = {k: m[:, None] for k, m in masks.items()}
        return masks if self.hybrid else next(iter(masks.values()))

    # --- committing and rolling back ------------------------------------------

    def rollback(self, columns: int) -> None:
        """Keep the cache for the first ``columns`` columns only (drop tentative ones).

        The last committed column always stays out of the cache: the next
        forward must read it to predict the token after it.
        """
        columns = min(columns, self.width - 1)
        if self.cache is not None and columns < self.cached:
            if columns == 0:  # one-token prompts: start afresh; a layer with no column ignores batch_select_indices
                self.cache = DynamicCache()
            else:
                self.cache.crop(columns - self.cached)
            self.cached = columns

    def commit_draft(self, count: int, accepted: torch.Tensor | None = None) -> None:
        """Commit the first ``count`` draft columns of the last forward; ``accepted[i]``
        of them are real for row ``i``, the rest become holes (``None``: all real)."""
        if count == 0:
            return
        end = self.width + count
        if accepted is not None:
            self._mask[:, self.width : end] = (self._arange[:count][None, :] < accepted[:, None]).to(self._mask.dtype)
            self.next_pos += accepted
            self.holey = True
        else:
            self.next_pos += count
        self.width = end

    def commit(self, tokens: torch.Tensor) -> None:
        """Append real tokens ``[b, k]`` after the committed columns."""
        k = tokens.size(1)
        end = self.width + k
        self._reserve(end)
        self._ids[:, self.width : end] = tokens
        self._mask[:, self.width : end] = 1
        self._pos[:, self.width : end] = self.next_pos[:, None] + self._arange[:k]
        self.next_pos += k
        self.width = end

    def keep(self, keep: torch.Tensor) -> None:
        """Keep only the active rows where ``keep`` is True."""
        if bool(keep.all()):
            return
        index = keep.nonzero().squeeze(1)
        self._ids, self._mask, self._pos = self._ids[index], self._mask[index], self._pos[index]
        self.next_pos = self.next_pos[index]
        self.rows = [self.rows[i] for i in index.tolist()]
        if self.cache is not None and self.cached > 0:
            self.cache.batch_select_indices(index)
        self.holey = bool((self._mask[:, : self.width] == 0).any())
