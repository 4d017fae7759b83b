"""Data: read prompt/response files or embedded tasks, tokenize, batch (file formats: docs/method.md).

``DLLMDataModule`` serves three things:

- train/val batches for the objective: ``input_ids``, ``attention_mask``,
  ``response_mask`` (response tokens and the closing EOS), right-padded;
- validation prompts for in-loop generation: left-padded ``prompt_ids`` with
  the reference response (and, for embedded tasks, the answer to check);
- prediction prompts from ``prompts_file`` or ``prompt``, left-padded, with
  their ``id``, their ``reference`` when the record has one, and the record's
  other fields, which each prediction record carries through.

It decides which records (files or tasks) serve which stage, and checks the arguments. Records become
examples and prompt items in ``dllm.data.examples`` (records are never dropped silently; a predictions file
trains as is), and batches in ``dllm.data.batching``. User mistakes raise ``UserError`` naming the argument,
or the file and line.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dllm import tasks as task_registry
from dllm.checks import check_batches
from dllm.data.batching import Collator, EpochSampler, ListDataset, ResumableDataLoader
from dllm.data.examples import ExampleBuilder
from dllm.data.records import Record, check_arguments, read_records
from dllm.distributed import forwards_are_collective
from dllm.errors import UserError

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

    def _generation_max_length(self) -> int | None:
        """The attached module's generation budget (prompt + generated tokens), when there is one."""
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        return getattr(getattr(module, "generation", None), "max_length", None)

    def _builder(self) -> ExampleBuilder:
        """Examples and prompt items for this tokenizer and these settings (the trainer is attached by now)."""
        return ExampleBuilder(self.tokenizer, self.hparams, self._generation_max_length())

    # --- which records, which stage ---------------------------------------------------

    def _task_records(self, split: str, num: int) -> list[Record]:
        hp = self.hparams
        records = task_registry.generate_examples(hp.task, split, num, seed=hp.seed)
        return [{**r, "_where": f"task {hp.task} {split} {r['id']}"} for r in records]

    def _file_examples(self, builder: ExampleBuilder) -> tuple[list[dict], list[dict]]:
        """Train and val examples from ``train_file`` (and ``val_file``, or a seeded split)."""
        hp = self.hparams
        train = builder.examples(read_records(hp.train_file), str(hp.train_file))
        if hp.val_file is not None:
            return train, builder.examples(read_records(hp.val_file), str(hp.val_file))
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
        hp, builder = self.hparams, self._builder()
        if stage in ("fit", "validate") and self.train_set is None:
            check_arguments(hp, stage)
            if hp.task is not None:
                train = builder.examples(self._task_records("train", hp.num_train), "task train")
                val = builder.examples(self._task_records("val", hp.num_val), "task val")
            else:
                train, val = self._file_examples(builder)
            self._check_val_prompts_fit(val)
            self.train_set, self.val_set = ListDataset(train), ListDataset(val)
        if stage == "predict":
            check_arguments(hp, stage)
            if hp.prompts_file is not None:
                records, what = read_records(hp.prompts_file, text_key=hp.prompt_key), str(hp.prompts_file)
            else:
                records, what = self._command_line_records(), "data.prompt"
            self.predict_set = ListDataset(builder.prompts(records, what))
            self._all_ids = [it["id"] for it in self.predict_set.items]

    # --- prediction prompts ------------------------------------------------------------

    def _command_line_records(self) -> list[Record]:
        prompts = self.hparams.prompt
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [
            {self.hparams.prompt_key: p, "id": f"prompt-{i}", "_where": f"data.prompt[{i}]"}
            for i, p in enumerate(prompts)
        ]

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
