"""Join two running :class:`~dllm.generation.batch.Batch` es into one, and drop the columns no row needs any more.

Continuous batching (``dllm.generation.stepper``) prefills newly admitted rows in a batch
of their own, then joins them to the running batch so that the next forward
serves everyone. Rows live right-aligned on one column axis (``dllm.generation.batch``):
the shorter batch gets masked columns on its left, in its ids, mask, positions
and KV cache. A row's positions and the tokens it attends to do not change, so
its logits are what they were (the masked columns weigh exactly zero), and so
are its tokens: greedy and keyed sampling are functions of the row's own text.

When long rows leave, the others keep left columns that are padding for every
row; :func:`trim` cuts them so a forward stops paying for them.

Jacobi leaves holes too: each forward appends as many columns as the row that
confirmed the most, so a row that confirmed fewer gets masked columns; in a
batch that never ends (continuous batching) a row's columns grow with the best
row's pace, not its own, and every forward attends over all of them (on the
trained tiny model of ``bench/quality.py``, 16 rows back to back, the batch
was ~200 columns wide for rows of ~100 real tokens). :func:`compact` moves each
row's real committed columns to the right, in order, ids, mask, positions and
KV cache alike: a pure move, so positions, the tokens a row attends to and its
logits stay what they were, and the batch becomes as wide as its longest row.
"""

from __future__ import annotations

import torch

from dllm.generation.batch import Batch


def _uncached(batch: Batch) -> int:
    return batch.width - batch.cached if batch.cache is not None else batch.width


def _left_pad(x: torch.Tensor, columns: int, dim: int = 1) -> torch.Tensor:
    if columns == 0:
        return x
    shape = list(x.shape)
    shape[dim] = columns
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def merge(into: Batch, new: Batch) -> None:
    """Append ``new``'s rows to ``into`` (in place), aligned on the right.

    Both batches must come from the same model with the same cache setting and
    layout; ``new.rows`` must already hold the caller's row indices. The batch
    with more uncached columns sets how many the joined one has (the other
    rolls its cache back to match: those columns are re-read next forward).
    """
    if into.cache is not None:
        u = max(_uncached(into), _uncached(new))
        for batch in (into, new):
            batch.rollback(batch.width - u)
    width = max(into.width, new.width)
    pads = [width - into.width, width - new.width]
    parts = {}
    for name in ("_ids", "_mask", "_pos"):
        a, b = (_left_pad(getattr(x, name)[:, : x.width], p) for x, p in zip((into, new), pads))
        parts[name] = torch.cat([a, b])
    rows, capacity = parts["_ids"].size(0), width + 64
    for name, value in parts.items():
        buffer = value.new_zeros(rows, capacity)
        buffer[:, :width] = value
        setattr(into, name, buffer)
    into._arange = torch.arange(capacity, device=into._ids.device)
    if into.cache is not None:  # both ran a forward (the caller merges after a step), so both caches hold layers
        for mine, theirs in zip(into.cache.layers, new.cache.layers):
            for attr in ("keys", "values"):
                a = _left_pad(getattr(mine, attr), pads[0], dim=2)
                b = _left_pad(getattr(theirs, attr), pads[1], dim=2)
                setattr(mine, attr, torch.cat([a, b]))
        into.cached = width - u
    into.next_pos = torch.cat([into.next_pos, new.next_pos])
    into.rows = into.rows + new.rows
    into.width = width
    into.num_forwards += new.num_forwards
    into.holey = bool((into._mask[:, :width] == 0).any())


def trim(batch: Batch) -> None:
    """Drop the leading columns that are padding for every active row (and cached, or not yet cached)."""
    if not batch.rows:
        return
    real = batch._mask[:, : batch.width].bool().any(0)
    lead = int(real.long().argmax())
    if batch.cache is not None and batch.cached:
        lead = min(lead, batch.cached)
        if lead:
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            batch.cached -= lead
    if lead == 0:
        return
    for name in ("_ids", "_mask", "_pos"):
        value = getattr(batch, name)
        buffer = value.new_zeros(value.size(0), value.size(1))
        buffer[:, : batch.width - lead] = value[:, lead : batch.width]
        setattr(batch, name, buffer)
    batch.width -= lead
    batch.holey = bool((batch._mask[:, : batch.width] == 0).any())


def holes(batch: Batch) -> int:
    """Cached columns that :func:`compact` would drop: the width minus the longest row's real cached columns."""
    if batch.cache is None or not batch.rows or batch.cached == 0:
        return 0
    return batch.cached - int(batch._mask[:, : batch.cached].sum(1).max())


def compact(batch: Batch) -> None:
    """Right-align each row's real cached columns (padding and holes dropped); the uncached tail stays as is.

    Only the cached columns move (the cache is what the next forwards re-read);
    a row's real columns keep their order, so causality in columns is kept.
    """
    drop = holes(batch)
    if drop == 0:
        return
    cached, width = batch.cached, batch.width
    if any(layer.keys.size(2) != cached for layer in batch.cache.layers):
        return  # a cache layer that does not hold every cached column (a rolling window): leave it be
    keep = cached - drop
    real = batch._mask[:, :cached].bool()
    columns = torch.arange(cached, device=real.device)
    # per row, its padding columns first, then its real ones in order: the last `keep` are the new cached columns
    order = torch.where(real, columns, -1).sort(dim=1, stable=True).indices[:, cached - keep :]
    index = torch.cat([order, torch.arange(cached, width, device=real.device).expand(order.size(0), -1)], dim=1)
    for name in ("_ids", "_mask", "_pos"):
        value = getattr(batch, name)
        buffer = value.new_zeros(value.size(0), value.size(1))
        buffer[:, : width - drop] = value.gather(1, index)
        setattr(batch, name, buffer)
    for layer in batch.cache.layers:
        b, heads, _, dim = layer.keys.shape
        gather = order[:, None, :, None].expand(b, heads, keep, dim)
        layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
    batch.cached, batch.width = keep, width - drop
    batch.holey = bool((batch._mask[:, : batch.width] == 0).any())
