"""Callbacks: in-loop samples, the JSONL prediction writer, HF export.

``PredictionWriter`` writes each finished batch at once to a per-rank shard
(``<output>.rank<r>``), and at the end merges every shard, plus what an
earlier run had already written, into ``output`` in input order. A rerun on
the same output skips the ids already there, so a killed run loses nothing it
had finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info


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
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.datamodule is None:
            return
        items = trainer.datamodule.val_set.items[: self.num_samples]
        if not items:
            return
        batch = trainer.datamodule._collate()(items)
        batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        records = pl_module.generate_records(batch, max_new_tokens=self.max_new_tokens)
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


def read_jsonl_ids(path: Path) -> dict[str, dict]:
    """Records of a JSONL predictions file by id; a torn last line (killed run) is ignored."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    lines = path.read_text(encoding="utf-8").splitlines()
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line_no == len(lines):
                continue  # the write was cut off by a kill: that prompt is predicted again
            raise ValueError(f"{path}:{line_no}: malformed JSON in an existing predictions file") from None
        records[str(record["id"])] = record
    return records


class PredictionWriter(BasePredictionWriter):
    """Write predictions as JSONL, one record per prompt, in input order, resumable.

    Args:
        output: the JSONL file to write.
        echo: also print each response with its tokens per forward as it is written.
    """

    def __init__(self, output: str = "predictions.jsonl", echo: bool = False):
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.echo = echo

    def _shards(self) -> list[Path]:
        return sorted(self.output.parent.glob(self.output.name + ".rank*"))

    def _done(self) -> dict[str, dict]:
        done = read_jsonl_ids(self.output)
        for shard in self._shards():
            done.update(read_jsonl_ids(shard))
        return done

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        done = self._done()
        if done:
            rank_zero_info(f"{self.output}: {len(done)} prompts already predicted, skipping them")
            trainer.datamodule.exclude_ids(set(done))
        self._shard = self.output.with_name(f"{self.output.name}.rank{trainer.global_rank}")
        if self._shard.is_file():  # drop a line torn by a kill before appending to it
            text = self._shard.read_text(encoding="utf-8")
            self._shard.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with self._shard.open("a", encoding="utf-8") as f:
            for record in prediction:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                if self.echo:
                    tpf = record["new_tokens"] / max(record["forwards"], 1)
                    print(f"[{record['id']}] {record['prompt']!r} -> {record['response']!r} ({tpf:.2f} tokens/forward)")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.merge(trainer.datamodule.all_prompt_ids())
        trainer.strategy.barrier()

    def merge(self, order: list[str]) -> None:
        """Write ``output`` with every record in input order, then remove the shards."""
        done = self._done()
        missing = [i for i in order if i not in done]
        tmp = self.output.with_name(self.output.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record_id in order:
                if record_id in done:
                    f.write(json.dumps(done[record_id], ensure_ascii=False) + "\n")
        tmp.replace(self.output)
        for shard in self._shards():
            shard.unlink()
        if missing:
            raise RuntimeError(f"{self.output}: {len(missing)} prompts have no prediction (first: {missing[0]!r})")
        rank_zero_info(f"wrote {len(order)} predictions to {self.output}")


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
    """Save the model and tokenizer in HF format when fitting ends.

    Under FSDP the full state dict is gathered on every rank (each rank must
    take part) and rank 0 writes it.

    Args:
        dirpath: output folder; ``AutoModelForCausalLM.from_pretrained(dirpath)`` loads it.
    """

    def __init__(self, dirpath: str = "hf_export"):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state_dict = full_state_dict(trainer)
        if trainer.is_global_zero:
            prefix = "model."
            model_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            pl_module.save_hf(self.dirpath, state_dict=model_state)
            rank_zero_info(f"exported HF model and tokenizer to {self.dirpath}")
        trainer.strategy.barrier()
