"""Callbacks: in-loop samples, the JSONL prediction writer, HF export, line progress.

``PredictionWriter`` writes each finished batch at once to a per-rank shard
(``<output>.rank<r>``), and at the end merges every shard, plus what an
earlier run had already written, into ``output`` in input order. A rerun on
the same output reuses the records that match it (prompt and rendered prompt,
generation settings, model, tokenizer) and predicts the rest, so a killed run
loses nothing it had finished; records that do not match stop the run unless
``overwrite`` is set, which replaces the output only once the new one is written
(``dllm.data.predictions`` has the rules).

Paths left unset derive from ``trainer.default_root_dir``, so one flag moves a
whole run: predictions in ``<root>/predictions.jsonl``, the HF export in
``<root>/hf``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ProgressBar
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from dllm import interrupts
from dllm.data import predictions
from dllm.data.records import dumps_line
from dllm.data.tokenizer import tokenizer_fingerprint
from dllm.distributed import forwards_are_collective
from dllm.errors import UserError
from dllm.training.lora import merge_lora


class SampleGeneration(L.Callback):
    """Generate for a few fixed validation prompts at the end of each validation; print and log them.

    Args:
        num_samples: how many validation prompts (the first ones) to generate for.
        max_new_tokens: cap on generated tokens per sample.
    """

    def __init__(self, num_samples: int = 3, max_new_tokens: int = 128):
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.datamodule is None:
            return
        # Rank 0 generates and prints. Where every forward is a collective (FSDP, ZeRO-3), all ranks must
        # generate too, on the same prompts, or rank 0 would wait for them forever.
        if not trainer.is_global_zero and not forwards_are_collective(trainer.strategy):
            return
        items = trainer.datamodule.val_set.items[: self.num_samples]
        if not items:
            return
        batch = trainer.datamodule._collate()(items)
        batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        records = pl_module.generate_records(batch, max_new_tokens=self.max_new_tokens)
        if not trainer.is_global_zero:
            return
        lines = [f"step {trainer.global_step} samples:"]
        for rec in records:
            tpf = rec["new_tokens"] / max(rec["forwards"], 1)
            lines.append(f"  prompt: {rec['prompt']!r}\n  response: {rec['response']!r}  ({tpf:.2f} tokens/forward)")
        text = "\n".join(lines)
        rank_zero_info(text)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard
                experiment.add_text("val/samples", f"```\n{text}\n```", trainer.global_step)
            elif hasattr(logger, "log_text"):  # Weights & Biases
                logger.log_text("val/samples", columns=["text"], data=[[text]], step=trainer.global_step)


class PredictionWriter(BasePredictionWriter):
    """Write predictions as JSONL, one record per prompt, in input order, resumable and scored.

    Args:
        output: the JSONL file to write; default ``<trainer.default_root_dir>/predictions.jsonl``.
        echo: also print each response with its tokens per forward as it is written.
        overwrite: predict every prompt again and replace ``output`` with the new records once they
            are all written (the old file stays until then; the shards of a stopped overwrite with these
            settings are reused, other shards removed). Without it, earlier records are reused only when
            their prompt and rendered prompt, generation settings, model and tokenizer match this run
            (their reference and other input fields are then taken from this run's prompts), and any
            other earlier record stops the run before it predicts anything.
        checkpoint: set by the CLI from ``--ckpt_path`` (linked), not by hand: each record
            stores a fingerprint of the weights, so a rerun never reuses another model's records.
    """

    def __init__(
        self, output: str | None = None, echo: bool = False, overwrite: bool = False, checkpoint: str | None = None
    ):
        super().__init__(write_interval="batch")
        self.output = output
        self.echo = echo
        self.overwrite = overwrite
        self.checkpoint = checkpoint
        self.path: Path | None = None
        self._lock: predictions.OutputLock | None = None

    def _shards(self) -> list[Path]:
        return sorted(self.path.parent.glob(self.path.name + ".rank*"))

    def _existing(self, output: bool = True) -> dict[str, dict]:
        """Records already written: the output file (unless ``output=False``), then the shards of a killed run."""
        records = predictions.read_predictions(self.path) if output else {}
        for shard in self._shards():
            records.update(predictions.read_predictions(shard))
        return records

    @property
    def metrics_path(self) -> Path:
        """Where the exact- and contains-match rates go: ``<output stem>.metrics.json`` beside the output."""
        return self.path.with_name(self.path.stem + ".metrics.json")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.path = Path(self.output) if self.output else Path(trainer.default_root_dir) / "predictions.jsonl"
        self._model = predictions.model_fingerprint(self.checkpoint, pl_module.hparams)
        self._tokenizer = tokenizer_fingerprint(pl_module.tokenizer)
        items = trainer.datamodule.predict_set.items
        self._digests = {item["id"]: item["prompt_digest"] for item in items}
        # a reused record is written with today's input fields and reference (``predictions.with_inputs``)
        self._inputs = {item["id"]: (item.get("extra") or {}, item.get("reference")) for item in items}
        # rank 0 decides (lock, what to reuse) and tells the others, so every rank stops on the same error
        outcome = self._prepare(trainer, pl_module) if trainer.is_global_zero else None
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if "error" in outcome:
            raise UserError(outcome["error"])
        if outcome["reuse"]:
            rank_zero_info(f"{self.path}: reusing {len(outcome['reuse'])} predictions of an earlier run")
            trainer.datamodule.exclude_ids(set(outcome["reuse"]))
        self._shard = self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}")
        # nothing left to predict: Lightning skips the loop and its end hook, so merge (a killed run's shards) at
        # teardown, after Lightning's checkpoint messages, so "wrote N predictions" is the last line
        self._merge_at_teardown = not trainer.datamodule.predict_set.items and trainer.is_global_zero

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """On rank 0: take the lock, then find the earlier records this run may reuse."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = predictions.OutputLock(self.path)
        try:
            note = self._lock.acquire()
            if note:
                rank_zero_info(note)
            predictions.remove_torn_merge(self.path)
            prompts = {item["id"]: item["prompt"] for item in trainer.datamodule.predict_set.items}
            settings = pl_module.generation.recorded()

            def why_not(records: dict[str, dict]) -> str | None:
                return predictions.mismatch(records, prompts, settings, self._model, self._tokenizer, self._digests)

            return {"reuse": predictions.reusable(self.path, self._shards(), why_not, self.overwrite)}
        except UserError as e:
            self._lock.release()
            return {"error": str(e)}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        # a stop signal waits until the batch's lines are whole
        with interrupts.deferred(), self._shard.open("a", encoding="utf-8") as f:
            for record in prediction:
                record = {
                    **record,
                    "tokenizer": self._tokenizer,
                    "checkpoint": self._model,
                    "prompt_digest": self._digests[record["id"]],
                }
                f.write(dumps_line(record))
                if self.echo:
                    tpf = record["new_tokens"] / max(record["forwards"], 1)
                    print(f"[{record['id']}] {record['prompt']!r} -> {record['response']!r} ({tpf:.2f} tokens/forward)")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            try:
                self.merge(trainer.datamodule.all_prompt_ids())
            finally:
                self._release()
        trainer.strategy.barrier()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()
        shard = getattr(self, "_shard", None)
        if isinstance(exception, interrupts.Stopped) and shard is not None:
            kept = len(predictions.read_predictions(shard)) if shard.is_file() else 0
            interrupts.state.notes.append(
                f"{kept} finished predictions kept in {shard}; the same command resumes them"
                if kept
                else f"no batch had finished, nothing written to {self.path}"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        try:
            if stage == "predict" and getattr(self, "_merge_at_teardown", False):  # not called after an exception
                self._merge_at_teardown = False
                self.merge(trainer.datamodule.all_prompt_ids())
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def merge(self, order: list[str]) -> None:
        """Write ``output`` with every record in input order, remove the shards, score against references.

        With ``overwrite`` only this run's records (the shards) count: the old output is replaced, never merged.
        """
        records = self._existing(output=not self.overwrite)
        records = {
            i: predictions.with_inputs(r, *self._inputs[i]) if i in self._inputs else r for i, r in records.items()
        }
        missing = [i for i in order if i not in records]
        predictions.write_in_order(self.path, records, order)
        for shard in self._shards():
            shard.unlink()
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} prompts have no prediction (first: {missing[0]!r})")
        rank_zero_info(f"wrote {len(order)} predictions to {self.path}")
        metrics = predictions.score(records[i] for i in order)
        if metrics is None:
            self.metrics_path.unlink(missing_ok=True)  # it scored an earlier output
        else:
            self.metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
            rank_zero_info(
                f"exact match {metrics['exact_match']:.1%}, contains match {metrics['contains_match']:.1%} "
                f"over {metrics['scored']} prompts with a reference; {metrics['tokens_per_forward']:.2f} tokens "
                f"per forward (written to {self.metrics_path})"
            )


def full_state_dict(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The LightningModule's unsharded state dict; every rank must call it (it gathers).

    FSDP gathers a full state dict even when checkpoints are saved sharded
    (``state_dict_type: sharded``); DeepSpeed ZeRO-3 gathers its partitioned
    parameters. Other strategies hold full weights already.
    """
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

        with _get_full_state_dict_context(strategy.model, world_size=strategy.world_size):
            return strategy.model.state_dict()
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        module = trainer.lightning_module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return strategy.lightning_module_state_dict()


class HFExport(L.Callback):
    """Save the model and tokenizer in HF format when fitting ends, if the fit trained at least one step.

    A fit that trained nothing (``trainer.max_steps 0``, a resume past the end) says so and leaves
    the folder as it was, so an earlier export is never replaced by the untrained or same model.
    Under FSDP the full state dict is gathered on every rank (each rank must take part) and rank 0
    writes it.

    Args:
        dirpath: output folder, default ``<trainer.default_root_dir>/hf``;
            ``AutoModelForCausalLM.from_pretrained(dirpath)`` loads it.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self._first_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._first_step = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = trainer.global_step  # after a resume restored it; not called when no step is due

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dirpath = self.dirpath or str(Path(trainer.default_root_dir) / "hf")
        if self._first_step is None or trainer.global_step == self._first_step:  # the same on every rank
            kept = f"{dirpath} is left as it was" if Path(dirpath).exists() else f"nothing written to {dirpath}"
            rank_zero_info(f"no HF export: this fit trained no step (trainer.max_steps={trainer.max_steps}); {kept}")
            return
        state_dict = full_state_dict(trainer)
        if trainer.is_global_zero:
            prefix = "model."
            model_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if getattr(pl_module, "lora", None) is not None:  # an ordinary checkpoint: adapters merged
                model_state = merge_lora(model_state, pl_module.model)
            with _no_transformers_progress():  # a one-shard "Writing model shards" bar is noise
                pl_module.save_hf(dirpath, state_dict=model_state)
            rank_zero_info(f"exported HF model and tokenizer to {dirpath}")
        trainer.strategy.barrier()


class _no_transformers_progress:
    """Silence transformers' tqdm bars inside the block, restoring the previous setting."""

    def __enter__(self):
        from transformers.utils import logging

        self._was_enabled = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        if self._was_enabled:
            logging.enable_progress_bar()


class LineProgress(ProgressBar):
    """Progress as plain lines on stderr, for logs and redirected output.

    A progress bar redraws one line with carriage returns, which shows nothing useful in a
    file; the CLI picks this instead of Lightning's bar when stderr is not a terminal.

    Args:
        every_n_steps: a training line every this many optimizer steps; ``None`` uses the
            trainer's ``log_every_n_steps``. Validation and prediction print about ten lines each.
    """

    def __init__(self, every_n_steps: int | None = None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start = time.monotonic()
        self._last_step = -1
        self._validation_keys: set[str] = set()  # printed by the validation line, not again at every step

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def _line(self, text: str, metrics: dict | None = None) -> None:
        if not self.is_enabled:
            return
        shown = {k: v for k, v in (metrics or {}).items() if k != "v_num"}
        numbers = "".join(f"  {k} {v:.4g}" if isinstance(v, float) else f"  {k} {v}" for k, v in shown.items())
        elapsed = time.monotonic() - self._start
        print(f"{text}{numbers}  [{elapsed:.0f} s]", file=sys.stderr, flush=True)

    @staticmethod
    def _due(done: int, total: float) -> bool:
        """About ten lines per loop: every tenth of the total, and the last one."""
        if total == float("inf") or total <= 0:
            return done % 10 == 0
        return done == total or done % max(1, int(total) // 10) == 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if step != self._last_step and (step % every == 0 or step == trainer.max_steps):
            self._last_step = step
            total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k not in self._validation_keys}
            self._line(f"step {step}{total} (epoch {trainer.current_epoch})", metrics)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            self._validation_keys |= set(metrics)
            self._line(f"validation at step {trainer.global_step}:", metrics)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = trainer.num_predict_batches[dataloader_idx]
        if self._due(batch_idx + 1, total):
            self._line(f"predicted batch {batch_idx + 1}/{total}")
