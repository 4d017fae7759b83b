"""A callback for the multi-process tests (imported by train.py subprocesses via PYTHONPATH)."""

import json
import os

import lightning as L


class RankLossDump(L.Callback):
    """Each rank appends its local loss and the logged (reduced) ``train/loss`` per step to ``<dir>/rank<r>.jsonl``."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        os.makedirs(self.dirpath, exist_ok=True)
        record = {
            "step": trainer.global_step,
            "local": float(outputs["loss"]),
            "logged": float(trainer.callback_metrics["train/loss"]),
            "ids": batch["id"],
        }
        with open(os.path.join(self.dirpath, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
