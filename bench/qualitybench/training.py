"""Training of ``bench/quality.py``: train each model or reuse its checkpoint, ``--jobs`` at a time.

:func:`train` (one model: from scratch, or stage 2 from the SFT model's HF export; writes ``model.ckpt``,
``training.json``, ``timing.json`` and the CSV log), :func:`train_all` (worker processes, stage 2 once SFT
is done), :func:`reusable` and :func:`learning_curve` (the validation points of a model's log).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import lightning as L
import torch

from dllm.data import DLLMDataModule
from dllm.generation import GenerationSettings
from dllm.module import DLLMModule
from qualitybench.settings import FINETUNES, OBJECTIVES, Setup


class ValidationTimer(L.Callback):
    """Seconds spent in validation, to report training time without it."""

    def __init__(self):
        self.seconds, self.cpu_seconds, self._start, self._cpu_start = 0.0, 0.0, 0.0, 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seconds += time.perf_counter() - self._start
        self.cpu_seconds += time.process_time() - self._cpu_start


def module_settings(setup: Setup, name: str, out: Path) -> dict:
    """``DLLMModule`` arguments of one model: from scratch, or from the SFT export (stage 2)."""
    if name in FINETUNES:
        hf = out / "sft" / "hf"
        if not (hf / "config.json").exists():  # stage 2 starts from the SFT model's HF export
            DLLMModule.load_from_checkpoint(out / "sft" / "model.ckpt", map_location="cpu").save_hf(str(hf))
        return {"pretrained": str(hf), "tokenizer": "byte", "min_lr_ratio": 0.1, **FINETUNES[name]}
    return {"model_config": dict(setup.model), "tokenizer": "byte", "lr": setup.lr, "warmup_steps": 50,
            "min_lr_ratio": 0.1, **OBJECTIVES[name]}  # fmt: skip


def train(setup: Setup, name: str, out: Path) -> DLLMModule:
    """Train one model, or load its checkpoint when the training settings match."""
    folder = out / name
    ckpt, meta = folder / "model.ckpt", folder / "training.json"
    wanted = setup.training(name)
    if reusable(setup, name, out):
        print(f"[{name}] reusing {ckpt}")
        return DLLMModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()
    stage2 = name in FINETUNES
    steps, every = (setup.stage2_steps, setup.stage2_val_every) if stage2 else (setup.steps, setup.val_every)
    steps = setup.stage2_steps_of(name) if stage2 else steps
    print(f"[{name}] training {steps} steps on {setup.task}" + (" from the SFT model" if stage2 else ""))
    L.seed_everything(0)
    # Validation generates with jacobi: its accuracy is greedy AR accuracy (lossless), in fewer forwards; along
    # stage 2 at the N the report quotes, so the curve shows the TPF bought.
    n = setup.stage2_n if stage2 else 3
    validation = GenerationSettings(
        mode="jacobi", add_eos_length=n, max_new_tokens=setup.max_new_tokens, adaptive_draft=False
    )
    settings = module_settings(setup, name, out)
    batch_size = settings.pop("batch_size", setup.batch_size)
    settings.pop("step_share", None)  # the trainer's, not the module's
    module = DLLMModule(
        **settings, val_generate_batches=-1, val_max_new_tokens=setup.max_new_tokens, generation=validation,
    )  # fmt: skip
    data = DLLMDataModule(
        task=setup.task, num_train=setup.num_train, num_val=setup.num_val, batch_size=batch_size,
        val_batch_size=setup.eval_batch, max_length=256, tokenizer=module.tokenizer,
    )  # fmt: skip
    start_point = None
    if stage2:  # the curve's step 0: the SFT model
        quiet = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, inference_mode=False)
        start_point = quiet.validate(module, datamodule=data, verbose=False)[0]
    timer = ValidationTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, val_check_interval=every, check_val_every_n_epoch=None,
        gradient_clip_val=1.0, logger=L.pytorch.loggers.CSVLogger(folder, name="logs"), callbacks=[timer],
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=25,
        enable_progress_bar=sys.stderr.isatty(),
    )  # fmt: skip
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    trainer.save_checkpoint(ckpt)
    if name == "sft":
        module.save_hf(str(folder / "hf"))
    meta.write_text(json.dumps(wanted, indent=1))
    # CPU seconds too: on a shared machine they say what a step costs whatever else runs (one thread per job)
    timing = {"train_s": round(seconds - timer.seconds, 1), "validation_s": round(timer.seconds, 1),
              "train_cpu_s": round(cpu_seconds - timer.cpu_seconds, 1), "threads": torch.get_num_threads(),
              "load_at_end": os.getloadavg()[0]}  # fmt: skip
    (folder / "timing.json").write_text(json.dumps(timing))
    if start_point is not None:
        (folder / "step0.json").write_text(json.dumps(start_point))
    return module.eval()


def _train_job(setup: Setup, name: str, out: Path, finetune: dict | None) -> str:
    """One training in a worker process (one CPU thread: tiny models scale poorly across threads)."""
    torch.set_num_threads(1)
    if finetune is not None:
        FINETUNES[name] = finetune
    train(setup, name, out)
    return name


def train_all(setup: Setup, out: Path, jobs: int) -> None:
    """Train every model, ``jobs`` at a time in worker processes; stage-2 models start once SFT is done."""
    todo = [name for name in setup.objectives if not reusable(setup, name, out)]
    for name in setup.objectives:
        if name not in todo:
            print(f"[{name}] reusing {out / name / 'model.ckpt'}")
    if jobs <= 1 or len(todo) <= 1:
        for name in todo:
            train(setup, name, out)
        return
    # SFT first (stage 2 waits for it) beside the longest from-scratch run, then stage 2, then the rest
    order = ["sft", "refine+ar", *FINETUNES]
    todo.sort(key=lambda name: order.index(name) if name in order else len(order))
    running: dict = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        while todo or running:
            sft_done = "sft" not in todo and "sft" not in running.values()
            for name in [n for n in todo if n not in FINETUNES or sft_done][: jobs - len(running)]:
                todo.remove(name)
                running[pool.submit(_train_job, setup, name, out, FINETUNES.get(name))] = name
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()  # re-raise a worker's error here
                del running[future]


def reusable(setup: Setup, name: str, out: Path) -> bool:
    """Whether ``name``'s checkpoint exists and was trained with the current settings."""
    ckpt, meta = out / name / "model.ckpt", out / name / "training.json"
    return ckpt.exists() and meta.exists() and json.loads(meta.read_text()) == setup.training(name)


def learning_curve(out: Path, name: str) -> list[tuple[int, float, float]]:
    """(step, validation exact match, validation jacobi TPF) from the newest CSV log of one model."""
    logs = sorted((out / name / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not logs:
        return []
    points = []
    if (out / name / "step0.json").exists():
        start = json.loads((out / name / "step0.json").read_text())
        points.append((0, start["val/exact_match"], start["val/tokens_per_forward"]))
    for r in csv.DictReader(logs[-1].open()):
        if r.get("val/exact_match"):
            points.append((int(r["step"]) + 1, float(r["val/exact_match"]), float(r["val/tokens_per_forward"])))
    return points
