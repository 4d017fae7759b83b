"""Batches: right-padded training batches, left-padded prompt batches, and a train loader that resumes mid-epoch.

No tokenizer and no Lightning here: the items are dicts already tokenized (``dllm.data.examples``). A batch
(``Collator``) carries, per row:

- for the objective: ``input_ids``, ``attention_mask``, ``response_mask`` (response tokens and the closing
  EOS), right-padded;
- for generation: ``prompt_ids`` and ``prompt_mask``, left-padded;
- ``id``, ``prompt``, the ``reference`` text, the task ``answer`` and ``task`` name (``None`` where a record
  has none), and for prediction the record's ``extra`` fields.

The train loader (``ResumableDataLoader`` over an ``EpochSampler``) shuffles by seed and epoch only, so a
resumed run sees the same order and skips the batches it already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ListDataset(Dataset):
    """A list of examples (dicts)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def pad(seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
    """Pad lists of ids to one width, on the left or on the right."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Collator:
    """Dynamic padding: the objective's tensors (right-padded) and prompts for generation (left-padded).

    Every batch also carries, per row, the ``reference`` text, the task ``answer`` and ``task``
    name (``None`` where a record has none), and for prediction the record's ``extra`` fields.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        batch: dict[str, Any] = {"id": [it["id"] for it in items], "prompt": [it["prompt"] for it in items]}
        prompts = [it["prompt_ids"] for it in items]
        batch["prompt_ids"] = pad(prompts, self.pad_token_id, left=True)
        batch["prompt_mask"] = pad([[1] * len(p) for p in prompts], 0, left=True)
        if "response_ids" in items[0]:
            full = [it["prompt_ids"] + it["response_ids"] for it in items]
            batch["input_ids"] = pad(full, self.pad_token_id, left=False)
            batch["attention_mask"] = pad([[1] * len(f) for f in full], 0, left=False)
            batch["response_mask"] = pad(
                [[0] * len(it["prompt_ids"]) + [1] * len(it["response_ids"]) for it in items], 0, left=False
            )
        for key in ("reference", "answer", "task"):
            batch[key] = [it.get(key) for it in items]
        if "extra" in items[0]:
            batch["extra"] = [it["extra"] for it in items]
        return batch


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on ``seed`` and the epoch, so a resumed run sees the same order."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.size, generator=gen).tolist()


def _wrapped_epoch_sampler(sampler: Any) -> EpochSampler | None:
    """Our ``EpochSampler`` inside Lightning's ``DistributedSamplerWrapper`` (under DDP), if any."""
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return inner if isinstance(inner, EpochSampler) else None


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch, and whose order changes every epoch under DDP.

    Lightning saves ``state_dict()`` in checkpoints and calls
    ``load_state_dict()`` on resume; iterating the same epoch again then skips
    the batches already trained on (the order is the same: ``EpochSampler``).

    Under DDP Lightning wraps the sampler in its ``DistributedSamplerWrapper`` and
    calls ``set_epoch`` on the wrapper only; before Lightning 2.6 the wrapper did not
    pass it on, so every epoch repeated the first one's order. The loader passes the
    wrapper's epoch down itself before each epoch, whatever the Lightning version.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seen, self._resume = 0, None

    def _epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def __iter__(self):
        inner = _wrapped_epoch_sampler(self.sampler)
        if inner is not None:
            inner.set_epoch(self._epoch())
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self._epoch():
            skip = self._resume["batches_seen"]
        self._resume, self._seen = None, 0
        for index, batch in enumerate(super().__iter__()):
            self._seen = index + 1
            if index >= skip:
                yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch(), "batches_seen": self._seen}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state
