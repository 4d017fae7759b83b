"""Data: read prompt/response files or embedded tasks, tokenize, batch (SPEC section 7).

``DLLMDataModule`` serves three things:

- train/val batches for the objective: ``input_ids``, ``attention_mask``,
  ``response_mask`` (response tokens and the closing EOS), right-padded;
- validation prompts for in-loop generation: left-padded ``prompt_ids`` with
  the reference response (and, for embedded tasks, the answer to check);
- prediction prompts from ``prompts_file``, left-padded, with their ``id``.

Truncation policy: an example whose prompt + response (+ EOS) is longer than
``max_length`` is never cut (a cut response would lose its EOS and teach the
model never to stop). ``too_long="drop"`` skips it and warns with the count and
the first offending record; ``too_long="error"`` raises naming it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dllm import tasks as task_registry

Record = dict[str, Any]


# ----------------------------------------------------------------------------
# Reading files


def read_records(path: str | Path) -> list[Record]:
    """Records from ``.jsonl``, ``.json`` (a list of objects) or ``.parquet``, each with its source line/index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                records.append({**record, "_where": f"{path}:{line_no}"})
        return records
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: record {i}: expected a JSON object, got {type(record).__name__}")
        return [{**record, "_where": f"{path}: record {i}"} for i, record in enumerate(data)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading .parquet needs pyarrow (pip install 'dllm[parquet]')") from None
        rows = pq.read_table(path).to_pylist()
        return [{**record, "_where": f"{path}: row {i}"} for i, record in enumerate(rows)]
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [{"prompt": line, "_where": f"{path}:{i}"} for i, line in enumerate(lines, 1) if line.strip()]
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, or .txt for prompts)")


def _field(record: Record, key: str) -> Any:
    if key not in record or record[key] is None:
        raise ValueError(f"{record['_where']}: missing key {key!r} (has {sorted(k for k in record if k != '_where')})")
    value = record[key]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    raise ValueError(f"{record['_where']}: {key!r} must be a string or a list of {{'role', 'content'}} messages")


# ----------------------------------------------------------------------------
# Rendering and tokenizing


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt text the model sees: the chat template with a generation prompt, when there is one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, list):
        return "\n".join(m["content"] for m in prompt)
    return prompt


def response_text(prompt_text: str, response: str | list[dict]) -> str:
    """The response as written after the prompt.

    Message lists are joined by content. Where the rendered prompt already ends
    with the response's opening tag (R1-style templates end with ``<think>\\n``),
    that overlap is not written twice.
    """
    if isinstance(response, list):
        response = "\n".join(m["content"] for m in response if m.get("role", "assistant") == "assistant")
    for k in range(min(len(prompt_text), len(response)), 0, -1):
        opening = response[:k]
        if opening.lstrip().startswith("<") and prompt_text.endswith(opening):
            return response[k:]
    return response


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_example(tokenizer, prompt: str | list[dict], response: str | list[dict]) -> tuple[list[int], list[int], str]:
    """Token ids of prompt and response (ending with exactly one EOS), and the response text."""
    prompt_text = render_prompt(tokenizer, prompt)
    prompt_ids = encode(tokenizer, prompt_text)
    text = response_text(prompt_text, response)
    response_ids = encode(tokenizer, text)
    if not response_ids or response_ids[-1] != tokenizer.eos_token_id:
        response_ids.append(tokenizer.eos_token_id)
    return prompt_ids, response_ids, text


# ----------------------------------------------------------------------------
# Datasets and batching


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
    """Dynamic padding: the objective's tensors (right-padded) and prompts for generation (left-padded)."""

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
            batch["reference"] = [it["reference"] for it in items]
            batch["answer"] = [it.get("answer") for it in items]
            batch["task"] = [it.get("task") for it in items]
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


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch.

    Lightning saves ``state_dict()`` in checkpoints and calls
    ``load_state_dict()`` on resume; iterating the same epoch again then skips
    the batches already trained on (the order is the same: ``EpochSampler``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seen, self._resume = 0, None

    def _epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def __iter__(self):
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


# ----------------------------------------------------------------------------
# The DataModule


class DLLMDataModule(L.LightningDataModule):
    """Train/val data from files or embedded tasks, and prompts for prediction.

    Args:
        train_file: ``.jsonl``/``.json``/``.parquet`` with prompt and response per record.
        val_file: same format; without it, ``val_fraction`` of train is split off (seeded).
        prompts_file: prompts to predict (``.txt`` one per line, or records with ``prompt`` and optional ``id``).
        task: embedded synthetic task(s) instead of files: a name, a list (uniform mix) or
            ``{name: weight}``; see ``python -m dllm.tasks --help``.
        num_train: examples to generate per epoch for ``task``.
        num_val: validation examples to generate for ``task`` (and the val split size).
        prompt_key: record key of the prompt (a string or chat messages).
        response_key: record key of the response (a string or chat messages).
        max_length: longest prompt + response (+ EOS) in tokens; see ``too_long``.
        too_long: ``"drop"`` (skip and warn with the count) or ``"error"`` for longer examples.
        val_fraction: share of train used for validation when there is no val file.
        batch_size: train batch size per device.
        val_batch_size: validation and prediction batch size per device (default: ``batch_size``).
        num_workers: DataLoader workers.
        seed: seed for the shuffle, the val split and task generation.
        tokenizer: set by the CLI from the model (linked), not by hand.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        prompts_file: str | None = None,
        task: str | list[str] | dict[str, float] | None = None,
        num_train: int = 20_000,
        num_val: int = 200,
        prompt_key: str = "prompt",
        response_key: str = "response",
        max_length: int = 2048,
        too_long: Literal["drop", "error"] = "drop",
        val_fraction: float = 0.02,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: Any = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.train_set: ListDataset | None = None
        self.val_set: ListDataset | None = None
        self.predict_set: ListDataset | None = None

    # --- building examples ----------------------------------------------------

    def _examples(self, records: list[Record], what: str) -> list[dict]:
        hp, tok = self.hparams, self.tokenizer
        examples, dropped = [], []
        for i, record in enumerate(records):
            prompt, response = _field(record, hp.prompt_key), _field(record, hp.response_key)
            prompt_ids, response_ids, reference = encode_example(tok, prompt, response)
            if len(prompt_ids) + len(response_ids) > hp.max_length:
                where = record.get("_where", f"{what} record {i}")
                if hp.too_long == "error":
                    raise ValueError(
                        f"{where}: prompt + response is {len(prompt_ids) + len(response_ids)} tokens, "
                        f"over max_length={hp.max_length}"
                    )
                dropped.append(where)
                continue
            examples.append(
                {
                    "id": str(record.get("id", i)),
                    "prompt": prompt,
                    "prompt_ids": prompt_ids,
                    "response_ids": response_ids,
                    "reference": reference,
                    "answer": record.get("answer"),
                    "task": record.get("task"),
                }
            )
        if dropped:
            warnings.warn(
                f"{what}: dropped {len(dropped)} of {len(records)} examples longer than max_length="
                f"{hp.max_length} (first: {dropped[0]}); set too_long='error' to stop instead",
                stacklevel=2,
            )
        if not examples:
            raise ValueError(f"{what}: no usable examples")
        return examples

    def _task_records(self, split: str, num: int) -> list[Record]:
        hp = self.hparams
        records = task_registry.generate_examples(hp.task, split, num, seed=hp.seed)
        return [{**r, "_where": f"task {hp.task} {split} {r['id']}"} for r in records]

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            raise ValueError("DLLMDataModule needs a tokenizer (the CLI links it from the model)")
        hp = self.hparams
        if stage in ("fit", "validate") and self.train_set is None:
            if hp.task is not None:
                train = self._examples(self._task_records("train", hp.num_train), "task train")
                val = self._examples(self._task_records("val", hp.num_val), "task val")
            elif hp.train_file is not None:
                train = self._examples(read_records(hp.train_file), str(hp.train_file))
                if hp.val_file is not None:
                    val = self._examples(read_records(hp.val_file), str(hp.val_file))
                else:
                    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed)).tolist()
                    n_val = max(1, round(hp.val_fraction * len(train)))
                    if n_val >= len(train):
                        raise ValueError(f"{hp.train_file}: too few examples ({len(train)}) to split off validation")
                    val = [train[i] for i in order[:n_val]]
                    train = [train[i] for i in order[n_val:]]
            else:
                raise ValueError("set data.train_file or data.task for training")
            self.train_set, self.val_set = ListDataset(train), ListDataset(val)
        if stage == "predict":
            if hp.prompts_file is None:
                raise ValueError("set data.prompts_file for prediction")
            self.predict_set = ListDataset(self._prompts(read_records(hp.prompts_file), str(hp.prompts_file)))
            self._all_ids = [it["id"] for it in self.predict_set.items]

    def _prompts(self, records: list[Record], what: str) -> list[dict]:
        items, seen = [], set()
        for i, record in enumerate(records):
            prompt = _field(record, "prompt")
            prompt_ids = encode(self.tokenizer, render_prompt(self.tokenizer, prompt))
            if len(prompt_ids) >= self.hparams.max_length:
                raise ValueError(
                    f"{record['_where']}: prompt is {len(prompt_ids)} tokens, not below max_length="
                    f"{self.hparams.max_length}"
                )
            if not prompt_ids:
                raise ValueError(f"{record['_where']}: empty prompt")
            record_id = str(record.get("id", i))
            if record_id in seen:
                raise ValueError(f"{record['_where']}: duplicate id {record_id!r}")
            seen.add(record_id)
            items.append({"id": record_id, "index": i, "prompt": prompt, "prompt_ids": prompt_ids})
        if not items:
            raise ValueError(f"{what}: no prompts")
        return items

    def all_prompt_ids(self) -> list[str]:
        """Every prompt id of ``prompts_file`` in input order (done or not)."""
        return list(self._all_ids)

    def exclude_ids(self, done: set[str]) -> None:
        """Drop prompts whose ids are already predicted (a resumed prediction run)."""
        self.predict_set.items = [it for it in self.predict_set.items if it["id"] not in done]

    # --- loaders --------------------------------------------------------------

    def _collate(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return ResumableDataLoader(
            self.train_set,
            batch_size=hp.batch_size,
            sampler=EpochSampler(len(self.train_set), hp.seed),
            collate_fn=self._collate(),
            num_workers=hp.num_workers,
            drop_last=len(self.train_set) >= hp.batch_size,
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.val_batch_size or hp.batch_size,
            shuffle=False,
            collate_fn=self._collate(),
            num_workers=hp.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set)
