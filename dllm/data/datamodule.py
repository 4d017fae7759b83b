"""Data: read prompt/response files or embedded tasks, tokenize, batch (file formats: docs/method.md).

``DLLMDataModule`` serves three things:

- train/val batches for the objective: ``input_ids``, ``attention_mask``,
  ``response_mask`` (response tokens and the closing EOS), right-padded;
- validation prompts for in-loop generation: left-padded ``prompt_ids`` with
  the reference response (and, for embedded tasks, the answer to check);
- prediction prompts from ``prompts_file`` or ``prompt``, left-padded, with
  their ``id``, their ``reference`` when the record has one, and the record's
  other fields, which each prediction record carries through.

Records are never dropped silently. An example whose prompt + response (+ EOS)
is longer than ``max_length`` is never cut (a cut response would lose its EOS
and teach the model never to stop): ``too_long="drop"`` skips it,
``too_long="error"`` raises naming it. Records with an empty response are
skipped; every skip is counted in one warning per file that names the first
record of each kind. An empty prompt is an error. User mistakes raise
``UserError`` naming the argument, or the file and line.

A predictions file trains as is (self-distillation). Its records carry the token
ids the model wrote (``response_ids``) and the fingerprint of the tokenizer that
wrote them: with the same tokenizer those ids are the training targets (no
re-tokenizing of the decoded text, which can split the same text differently).
A record cut by the generation budget (``finish_reason: "length"``) trains
without a closing EOS: the model learns its tokens, never to stop there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import torch
from jinja2 import TemplateError
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dllm import tasks as task_registry
from dllm.checks import check_batches
from dllm.data.predictions import prompt_digest
from dllm.data.records import INTERNAL_KEYS, Record, check_arguments, field, is_messages, prompt_of, read_records
from dllm.data.tokenizer import render_chat, response_text, same_tokenizer, tokenizer_fingerprint
from dllm.distributed import forwards_are_collective
from dllm.errors import UserError

# Keys a prediction record sets itself; an input field of the same name is replaced (the input's
# ``response`` lives on as ``reference``).
OUTPUT_KEYS = (
    "id", "prompt", "response", "reference", "new_tokens", "finish_reason", "forwards", "settings", "response_ids",
    "tokenizer", "checkpoint", "prompt_digest",
)  # fmt: skip


# ----------------------------------------------------------------------------
# Tokenizing


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (the chat template writes its own)."""
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_example(
    tokenizer,
    prompt: str | list[dict],
    response: str | list[dict],
    chat_template: bool | str = True,
    eos: bool = True,
) -> tuple[list[int], list[int], str]:
    """Token ids of prompt and response (ending with exactly one EOS unless ``eos=False``), and the response text."""
    prompt_text, opening = render_chat(tokenizer, prompt, chat_template)
    prompt_ids = encode(tokenizer, prompt_text)
    text = response_text(response, opening)
    return prompt_ids, closed(tokenizer, encode(tokenizer, text), eos), text


def closed(tokenizer, response_ids: list[int], eos: bool = True) -> list[int]:
    """``response_ids`` ending with exactly one EOS (``eos=True``) or as they are (an answer cut by the budget)."""
    if eos and (not response_ids or response_ids[-1] != tokenizer.eos_token_id):
        return [*response_ids, tokenizer.eos_token_id]
    return list(response_ids)


def record_id(record: Record, index: int) -> str:
    """The record's ``id`` as text; a missing or ``null`` id is its index in the file."""
    value = record.get("id")
    return str(index if value is None else value)


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


# ----------------------------------------------------------------------------
# The DataModule


class DLLMDataModule(L.LightningDataModule):
    """Train/val data from files or embedded tasks, and prompts for prediction.

    Args:
        train_file: ``.jsonl``/``.json``/``.parquet`` with a prompt and a response per record. A
            predictions JSONL written by ``predict.py`` works as is (self-distillation); its records
            cut by the generation budget (``finish_reason: "length"``) are skipped with a count.
            Not together with ``task``: under a config that sets ``task``, add ``--data.task null``.
        val_file: same format; without it, ``val_fraction`` of train is split off (seeded).
        prompts_file: prompts to predict: ``.txt`` (one per line) or ``.jsonl``/``.json``/``.parquet``
            records with ``prompt_key`` and an optional ``id``. A record's other fields are written
            into its prediction; its reference (see ``reference_key``) as ``reference``.
        prompt: prompts to predict given on the command line instead of ``prompts_file`` (not
            both), with ids ``prompt-0``, ``prompt-1``, ...: one, ``--data.prompt "12+34="``, or
            several, ``--data.prompt+ "12+34=" --data.prompt+ "5+6="`` or
            ``--data.prompt '["12+34=", "5+6="]'`` (a repeated plain ``--data.prompt`` keeps only the last).
        task: embedded synthetic task(s) instead of files: a name, a list (uniform mix) or
            ``{name: weight}``; see ``python -m dllm.tasks --help``.
        num_train: examples to generate per epoch for ``task``.
        num_val: validation examples to generate for ``task`` (and the val split size).
        prompt_key: record key of the prompt (a string or chat messages).
        response_key: record key of the response (a string or chat messages).
        reference_key: record key of the reference answer in ``prompts_file``, carried into each
            prediction as ``reference`` (for exact- and contains-match rates); every record must have
            it. ``null``: ``response_key`` where the record has it, else ``answer``, else none.
        chat_template: how prompts are rendered: ``true`` the tokenizer's chat template (raw text
            when it has none), ``false`` none (raw prompts, for base models), or a Jinja template
            string. Give prediction the same value as training.
        max_length: longest prompt + response (+ EOS) in tokens (see ``too_long``); prompts to
            predict must be shorter, and shorter than ``model.generation.max_length``.
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
        prompt: str | list[str] | None = None,
        task: str | list[str] | dict[str, float] | None = None,
        num_train: int = 20_000,
        num_val: int = 200,
        prompt_key: str = "prompt",
        response_key: str = "response",
        reference_key: str | None = None,
        chat_template: bool | str = True,
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
        check_arguments(self.hparams)
        self.tokenizer = tokenizer
        self.train_set: ListDataset | None = None
        self.val_set: ListDataset | None = None
        self.predict_set: ListDataset | None = None

    # --- rendering --------------------------------------------------------------

    def _render(self, prompt: str | list[dict], where: str) -> tuple[str, str]:
        """The rendered prompt and its generation prompt; a failing template names the record."""
        try:
            return render_chat(self.tokenizer, prompt, self.hparams.chat_template)
        except TemplateError as e:
            raise UserError(f"{where}: the chat template (data.chat_template) failed: {e}") from None

    def _generation_max_length(self) -> int | None:
        """The attached module's generation budget (prompt + generated tokens), when there is one."""
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        return getattr(getattr(module, "generation", None), "max_length", None)

    # --- training examples ---------------------------------------------------------

    def _example(self, record: Record, index: int, counts: dict[str, list[str]]) -> dict | str:
        """One tokenized training example, or the reason it is skipped; ``counts`` collects how ids were chosen."""
        hp, where = self.hparams, record["_where"]
        prompt = prompt_of(record, hp.prompt_key)
        response = field(record, hp.response_key, "data.response_key")
        cut = record.get("finish_reason") == "length"  # cut by the generation budget: no closing EOS
        prompt_text, opening = self._render(prompt, where)
        prompt_ids = encode(self.tokenizer, prompt_text)
        text = response_text(response, opening)
        recorded = self._recorded_ids(record, counts)
        response_ids = closed(self.tokenizer, encode(self.tokenizer, text) if recorded is None else recorded, not cut)
        if not text.strip():
            return "with an empty response"
        length = len(prompt_ids) + len(response_ids)
        if length > hp.max_length:
            if hp.too_long == "error":
                raise UserError(f"{where}: prompt + response is {length} tokens, over data.max_length={hp.max_length}")
            return f"longer than data.max_length={hp.max_length}"
        return {
            "id": record_id(record, index),
            "where": where,
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "response_ids": response_ids,
            "reference": text,
            "answer": record.get("answer"),
            "task": record.get("task"),
        }

    def _recorded_ids(self, record: Record, counts: dict[str, list[str]]) -> list[int] | None:
        """The token ids predict recorded for the response, when this tokenizer wrote them and they still spell it."""
        ids = record.get("response_ids")
        if ids is None or self.hparams.response_key != "response":
            return None
        where, vocab = record["_where"], len(self.tokenizer)
        if not (isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < vocab for i in ids)):
            raise UserError(f"{where}: response_ids must be a list of token ids in [0, {vocab})")
        if not same_tokenizer(record.get("tokenizer"), tokenizer_fingerprint(self.tokenizer)):
            counts.setdefault("other tokenizer", []).append(where)
            return None
        if self.tokenizer.decode(ids, skip_special_tokens=False) != record.get("response"):
            counts.setdefault("edited", []).append(where)
            return None
        counts.setdefault("exact", []).append(where)
        return ids

    def _examples(self, records: list[Record], what: str) -> list[dict]:
        """Tokenized training examples; skipped records are counted in one warning per file."""
        examples, skipped, counts = [], {}, {}
        for index, record in enumerate(records):
            example = self._example(record, index, counts)
            if isinstance(example, str):
                skipped.setdefault(example, []).append(record["_where"])
            else:
                examples.append(example)
        summary = "; ".join(f"{len(where)} {reason} (first: {where[0]})" for reason, where in skipped.items())
        if not examples:
            raise UserError(f"{what}: no usable examples" + (f" (skipped {summary})" if summary else ""))
        if skipped:
            long = any(reason.startswith("longer") for reason in skipped)
            hint = "; data.too_long='error' stops at a long one instead" if long else ""
            count = sum(map(len, skipped.values()))
            rank_zero_warn(f"{what}: skipped {count} of {len(records)} records: {summary}{hint}")
        self._report_ids(counts, len(records), what)
        return examples

    def _report_ids(self, counts: dict[str, list[str]], total: int, what: str) -> None:
        """One line on which records train on their recorded token ids, and one warning per reason others do not."""
        fingerprint = tokenizer_fingerprint(self.tokenizer)
        if "exact" in counts:
            rank_zero_info(
                f"{what}: training on the recorded token ids (response_ids) of {len(counts['exact'])} of {total} "
                f"records (tokenizer {fingerprint})"
            )
        if "other tokenizer" in counts:
            where = counts["other tokenizer"]
            rank_zero_warn(
                f"{what}: {len(where)} records carry response_ids of another tokenizer (first: {where[0]}; this "
                f"model's is {fingerprint}): they train on their response text, tokenized again"
            )
        if "edited" in counts:
            where = counts["edited"]
            rank_zero_warn(
                f"{what}: {len(where)} records have a response that is not the text of their response_ids (edited? "
                f"first: {where[0]}): they train on the response text"
            )

    def _task_records(self, split: str, num: int) -> list[Record]:
        hp = self.hparams
        records = task_registry.generate_examples(hp.task, split, num, seed=hp.seed)
        return [{**r, "_where": f"task {hp.task} {split} {r['id']}"} for r in records]

    def _file_examples(self) -> tuple[list[dict], list[dict]]:
        """Train and val examples from ``train_file`` (and ``val_file``, or a seeded split)."""
        hp = self.hparams
        train = self._examples(read_records(hp.train_file), str(hp.train_file))
        if hp.val_file is not None:
            return train, self._examples(read_records(hp.val_file), str(hp.val_file))
        n_val = max(1, round(hp.val_fraction * len(train)))
        if n_val >= len(train):
            raise UserError(
                f"data.train_file={hp.train_file}: too few examples ({len(train)}) to split off "
                f"data.val_fraction={hp.val_fraction} for validation (or give data.val_file)"
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        return [train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]]

    def _check_val_prompts_fit(self, val: list[dict]) -> None:
        """Validation generates from its prompts, so each must be shorter than the generation budget."""
        budget = self._generation_max_length()
        if budget is None or self.hparams.max_length <= budget:
            return  # prompt + response fit max_length already
        for item in val:
            if len(item["prompt_ids"]) >= budget:
                raise UserError(
                    f"{item['where']}: the validation prompt is {len(item['prompt_ids'])} tokens after the chat "
                    f"template, not below model.generation.max_length={budget}; raise it or lower data.max_length"
                )

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            raise ValueError("DLLMDataModule needs a tokenizer (the CLI links it from the model)")
        hp = self.hparams
        if stage in ("fit", "validate") and self.train_set is None:
            check_arguments(hp, stage)
            if hp.task is not None:
                train = self._examples(self._task_records("train", hp.num_train), "task train")
                val = self._examples(self._task_records("val", hp.num_val), "task val")
            else:
                train, val = self._file_examples()
            self._check_val_prompts_fit(val)
            self.train_set, self.val_set = ListDataset(train), ListDataset(val)
        if stage == "predict":
            check_arguments(hp, stage)
            if hp.prompts_file is not None:
                records, what = read_records(hp.prompts_file, text_key=hp.prompt_key), str(hp.prompts_file)
            else:
                records, what = self._command_line_records(), "data.prompt"
            self.predict_set = ListDataset(self._prompts(records, what))
            self._all_ids = [it["id"] for it in self.predict_set.items]

    # --- prediction prompts ------------------------------------------------------------

    def _command_line_records(self) -> list[Record]:
        prompts = self.hparams.prompt
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [
            {self.hparams.prompt_key: p, "id": f"prompt-{i}", "_where": f"data.prompt[{i}]"}
            for i, p in enumerate(prompts)
        ]

    def _reference(self, record: Record, opening: str) -> str | None:
        """The record's reference text (``reference_key``), as the response would be written; ``None`` without one."""
        hp = self.hparams
        key = hp.reference_key
        if key is None:
            key = next((k for k in (hp.response_key, "answer") if record.get(k) is not None), None)
            if key is None:
                return None
        elif record.get(key) is None:
            keys = sorted(k for k in record if k not in INTERNAL_KEYS)
            raise UserError(f"{record['_where']}: missing key {key!r} (data.reference_key; the record has {keys})")
        value = record[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not (isinstance(value, str) or is_messages(value)):
            raise UserError(f"{record['_where']}: reference {key!r} must be a string, a number or chat messages")
        return response_text(value, opening)

    def _check_prompt_fits(self, length: int, where: str) -> None:
        """A prompt must leave room to generate: shorter than ``data.max_length`` and the generation budget."""
        limits = {
            "data.max_length": self.hparams.max_length,
            "model.generation.max_length": self._generation_max_length(),
        }
        limits = {name: value for name, value in limits.items() if value is not None}
        if any(length >= value for value in limits.values()):
            named = " and ".join(f"{name}={value}" for name, value in limits.items())
            raise UserError(
                f"{where}: the prompt is {length} tokens after the chat template; prompts must be shorter than {named}"
            )

    def _prompt_item(self, record: Record, index: int) -> dict:
        """One prompt to predict: its ids, its reference, and the record's other fields to write back."""
        hp, where = self.hparams, record["_where"]
        prompt = prompt_of(record, hp.prompt_key)
        text, opening = self._render(prompt, where)
        prompt_ids = encode(self.tokenizer, text)
        if not prompt_ids or not text.strip():
            raise UserError(f"{where}: empty prompt after the chat template (data.chat_template)")
        self._check_prompt_fits(len(prompt_ids), where)
        extra = {k: v for k, v in record.items() if k not in (*INTERNAL_KEYS, *OUTPUT_KEYS, hp.prompt_key)}
        return {
            "id": record_id(record, index),
            "index": index,
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "prompt_digest": prompt_digest(text, prompt_ids),
            "reference": self._reference(record, opening),
            "answer": record.get("answer"),
            "task": record.get("task"),
            "extra": extra,
        }

    def _prompts(self, records: list[Record], what: str) -> list[dict]:
        items, seen = [], set()
        for index, record in enumerate(records):
            item = self._prompt_item(record, index)
            if item["id"] in seen:
                raise UserError(f"{record['_where']}: duplicate id {item['id']!r}")
            seen.add(item["id"])
            items.append(item)
        if not items:
            raise UserError(f"{what}: no prompts")
        return items

    def all_prompt_ids(self) -> list[str]:
        """Every prompt id to predict, in input order (done or not)."""
        return list(self._all_ids)

    def exclude_ids(self, done: set[str]) -> None:
        """Drop prompts whose ids are already predicted (a resumed prediction run)."""
        self.predict_set.items = [it for it in self.predict_set.items if it["id"] not in done]

    # --- loaders --------------------------------------------------------------

    def _collate(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        world = self.trainer.world_size if self.trainer is not None else 1
        check_batches(len(self.train_set), hp.batch_size, world, "in the training data")  # else no step trains
        return ResumableDataLoader(
            self.train_set,
            batch_size=hp.batch_size,
            sampler=EpochSampler(len(self.train_set), hp.seed),
            collate_fn=self._collate(),
            num_workers=hp.num_workers,
            drop_last=len(self.train_set) >= hp.batch_size,
        )

    def _eval_loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.val_batch_size or hp.batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=self._collate(),
            num_workers=hp.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        strategy = self.trainer.strategy if self.trainer is not None else None
        if not forwards_are_collective(strategy):
            return self._eval_loader(self.predict_set)  # Lightning shards it without repeating a prompt
        # Under FSDP / ZeRO-3 every rank must run as many batches as the others, so the last prompts are repeated
        # to even out the ranks; the prediction writer keeps one record per id.
        sampler = DistributedSampler(
            self.predict_set, num_replicas=strategy.world_size, rank=strategy.global_rank, shuffle=False
        )
        return self._eval_loader(self.predict_set, sampler)
