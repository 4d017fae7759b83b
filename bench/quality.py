"""Does refine fine-tuning buy parallel decoding, and what does it cost in accuracy?

Users start from a model that already solves their task and fine-tune it to decode in blocks. This
bench measures that case on a task the SFT model solves (``recurrence``: every term depends on the
two before it), with tiny Llama-shaped models on CPU:

1. **Stage 1**: ``sft``, plain next-token fine-tuning (noise 0, one round) to convergence.
2. **Stage 2**: from the SFT model's HF export, a fixed number of steps of the refine objective:
   ``sft-refine`` (the original method's objective), ``sft-refine+ar`` (plus the clean next-token term,
   ``ar_loss_weight=1``), ``sft-refine+block`` (block noise) and ``sft-recipe`` (the documented
   recipe, see ``FINETUNES``). Validation along stage 2 generates with lossless jacobi at N=15, which
   gives both the model's greedy AR accuracy and its jacobi tokens per forward: the learning curve.
3. **From scratch** (the second table): ``refine``, ``refine+ar`` and ``refine+block`` trained for
   as many steps as SFT, from a random init.

Every model is evaluated on the same test prompts with AR (HF ``generate``, greedy: the reference),
refine with N in {3, 7, 15} x R in {1, 2, 3}, and jacobi with a fixed N in {3, 7, 15} (lossless: the
same text as AR), plus the engine's adaptive jacobi when it has one. Reported: final-answer
accuracy, tokens per forward (TPF: generated tokens over model forwards), tokens/s, the speed
relative to HF ``generate`` on the same checkpoint and the share of outputs identical to AR.

Training runs ``--jobs`` models at a time (default 2), one CPU thread each: a model this small
gains little from a second thread, and the stage-2 models start as soon as SFT is done. Evaluation
runs afterwards, alone, with ``--threads``.

Outputs in ``--out-dir`` (default ``bench/results/quality``): ``quality.md`` (the tables),
``quality.json``, ``accuracy_vs_tpf.png``, ``finetune_curve.png`` (stage 2: AR accuracy and jacobi
TPF against steps) and ``learning_curve.png`` (from scratch: validation accuracy against steps).
Checkpoints are kept in ``<out-dir>/<model>/model.ckpt`` and reused when their settings match.

Full run (about 30 minutes on 2 CPU cores, most of it training)::

    python bench/quality.py --threads 2

Smoke run (seconds; tiny model, a few steps)::

    python bench/quality.py --quick --out-dir /tmp/quality
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric, SumMetric
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dllm.data import DLLMDataModule  # noqa: E402
from dllm.generation import GenerationSettings  # noqa: E402
from dllm.module import DLLMModule  # noqa: E402
from dllm.tasks import check_answer, generate_examples  # noqa: E402

# From-scratch objectives; every other setting is shared.
OBJECTIVES: dict[str, dict] = {
    "sft": {"noise_min": 0.0, "noise_max": 0.0, "num_rounds": 1},
    "refine": {},
    "refine+ar": {"ar_loss_weight": 1.0},
    "refine+block": {"noise_schedule": "block"},
}

# Stage 2: from the SFT model's HF export, every model gets the same optimiser, batch and steps
# (``Setup.stage2_steps``); only the objective differs. ``sft-recipe`` is the documented recipe: a clean
# prefix up to a random cut, then EOS noise at t ~ U[0.5, 1] (``noise_schedule="prefix"``), scored on
# the clean prefix and the 16 targets from the cut on (``loss_window``: the N + 1 = 16 tokens a block
# drafts at N = 15), two rounds weighted 2:1, no extra AR forward. Small batches buy more updates for
# the same compute. The measurements behind each choice are in docs/quality.md.
STAGE2 = {"batch_size": 8, "lr": 1e-3, "warmup_steps": 20}
RECIPE = {"noise_schedule": "prefix", "noise_min": 0.5, "noise_max": 1.0, "loss_window": 16, "loss_weights": [2.0, 1.0]}
# ``sft-packed``: a noisy copy of every 15-token block (N = 15, the N the curve decodes with) beside the clean
# answer, each block EOS with probability t ~ U[0.5, 1]; one round; the clean stream's next-token term from the
# same forward (weight 1). A step is one forward of a row about twice as long as the recipe's two.
PACKED = {"noise_schedule": "packed", "noise_block_size": 15, "noise_min": 0.5, "noise_max": 1.0, "num_rounds": 1,
          "ar_loss_weight": 1.0}  # fmt: skip
FINETUNES: dict[str, dict] = {
    "sft-refine": {**STAGE2},
    "sft-refine+ar": {**STAGE2, "ar_loss_weight": 1.0},
    "sft-refine+block": {**STAGE2, "noise_schedule": "block"},
    "sft-recipe": {**STAGE2, **RECIPE},
    "sft-packed": {**STAGE2, **PACKED},
    # the same for half the steps (its own cosine schedule): the packed objective at half the recipe's time
    "sft-packed-half": {**STAGE2, **PACKED, "step_share": 0.5},
    # tuning after the first run (docs/quality.md): the AR term weighted up, against the accuracy dip
    "sft-packed-half-ar2": {**STAGE2, **PACKED, "ar_loss_weight": 2.0, "step_share": 0.5},
    "sft-packed-half-ar3": {**STAGE2, **PACKED, "ar_loss_weight": 3.0, "step_share": 0.5},
}

MODEL = {  # ~0.18M parameters, Llama-shaped, byte vocabulary
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True,
}  # fmt: skip


@dataclass
class Setup:
    """Everything that defines a trained model and the evaluation grid."""

    task: str = "recurrence"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-3
    num_train: int = 5000
    num_val: int = 100
    val_every: int = 250
    stage2_steps: int = 1200
    stage2_val_every: int = 200
    stage2_n: int = 15
    num_test: int = 200
    batch1_prompts: int = 40
    eval_batch: int = 50
    max_new_tokens: int = 160
    refine_n: list[int] = field(default_factory=lambda: [3, 7, 15])
    refine_r: list[int] = field(default_factory=lambda: [1, 2, 3])
    jacobi_n: list[int] = field(default_factory=lambda: [3, 7, 15])
    model: dict = field(default_factory=lambda: dict(MODEL))
    objectives: list[str] = field(default_factory=lambda: ["sft", *FINETUNES, "refine", "refine+ar", "refine+block"])

    def stage2_steps_of(self, name: str) -> int:
        """A stage-2 model's steps: ``stage2_steps``, times its ``step_share`` if it has one."""
        return max(1, round(self.stage2_steps * FINETUNES[name].get("step_share", 1.0)))

    def training(self, name: str) -> dict:
        """The settings a checkpoint depends on (reuse only when they match)."""
        shared = {"task": self.task, "batch_size": self.batch_size, "num_train": self.num_train, "model": self.model}
        if name in FINETUNES:
            return {"objective": name, "overrides": FINETUNES[name], "steps": self.stage2_steps_of(name),
                    "stage1": self.training("sft"), **shared}  # fmt: skip
        return {"objective": name, "overrides": OBJECTIVES[name], "steps": self.steps, "lr": self.lr, **shared}


QUICK = Setup(
    steps=6, num_train=64, num_val=8, val_every=3, stage2_steps=4, stage2_val_every=2, stage2_n=3, num_test=8,
    eval_batch=8, max_new_tokens=24, refine_n=[3], refine_r=[1, 2], jacobi_n=[3],
    objectives=["sft", "sft-recipe", "refine"],
    model={**MODEL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
)  # fmt: skip


# --- training -------------------------------------------------------------------------------------


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


# --- evaluation ---------------------------------------------------------------------------------


@dataclass
class Method:
    """One decoding setting: ``hf`` (HF generate), ``refine``, ``jacobi`` (fixed N) or ``adaptive`` jacobi."""

    mode: str
    n: int | None = None
    r: int | None = None
    sources: str | None = None  # jacobi's draft_sources; None: the library default

    @property
    def label(self) -> str:
        tail = f" sources={self.sources}" if self.sources else ""
        if self.mode == "hf":
            return "AR (HF generate)"
        if self.mode == "adaptive":
            return f"jacobi adaptive N<={self.n}{tail}"
        return f"refine N={self.n} R={self.r}" if self.mode == "refine" else f"jacobi N={self.n}{tail}"


def methods(setup: Setup) -> list[Method]:
    grid = [Method("hf")]
    grid += [Method("refine", n, r) for n in setup.refine_n for r in setup.refine_r]
    grid += [Method("jacobi", n) for n in setup.jacobi_n]
    # the model's own drafts alone beside the default sources: a source that costs forwards shows up
    n = max(setup.jacobi_n)
    return grid + [Method("jacobi", n, sources="none"), Method("adaptive", n), Method("adaptive", n, sources="none")]


def hf_generate(module: DLLMModule, batch: dict, max_new_tokens: int) -> list[dict]:
    """Greedy ``model.generate``: responses cut at the first stop id, one forward per token."""
    out = module.model.generate(
        input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=module.stop_ids, pad_token_id=module.tokenizer.pad_token_id,
    )  # fmt: skip
    records = []
    for row in out[:, batch["prompt_ids"].size(1) :].tolist():
        stop = next((j for j, t in enumerate(row) if t in module.stop_ids), None)
        tokens = row if stop is None else row[:stop]
        n = len(row) if stop is None else stop + 1
        records.append({"response": module.tokenizer.decode(tokens), "new_tokens": n, "forwards": n})
    return records


def generate(module: DLLMModule, method: Method, batch: dict, setup: Setup) -> list[dict]:
    if method.mode == "hf":
        return hf_generate(module, batch, setup.max_new_tokens)
    mode = "jacobi" if method.mode == "adaptive" else method.mode
    extra = {"adaptive_draft": method.mode == "adaptive"} if mode == "jacobi" else {}
    if method.sources:
        extra["draft_sources"] = method.sources
    return module.generate_records(
        batch, mode=mode, add_eos_length=method.n, refine_iter=method.r or 1, max_new_tokens=setup.max_new_tokens,
        max_length=4096, temperature=0.0, **extra,
    )  # fmt: skip


def evaluate(module: DLLMModule, method: Method, batches: list[dict], setup: Setup, reference: dict | None) -> dict:
    """Accuracy, TPF, tokens/s and agreement with AR over the test batches."""
    accuracy, same_as_ar = MeanMetric(), MeanMetric()
    tokens, forwards = SumMetric(), SumMetric()
    responses, seconds = {}, 0.0
    for batch in batches:
        start = time.perf_counter()
        with torch.no_grad():
            records = generate(module, method, batch, setup)
        seconds += time.perf_counter() - start
        for i, record in enumerate(records):
            accuracy.update(float(check_answer(batch["task"][i], record["response"], batch["answer"][i])))
            tokens.update(record["new_tokens"])
            forwards.update(record["forwards"])
            responses[batch["id"][i]] = record["response"]
            if reference is not None:
                same_as_ar.update(float(record["response"] == reference[batch["id"][i]]))
    total = float(tokens.compute())
    return {
        "method": method.label, "mode": method.mode, "N": method.n, "R": method.r, "sources": method.sources,
        "accuracy": float(accuracy.compute()), "tpf": total / float(forwards.compute()),
        "tokens_per_s": total / seconds, "seconds": seconds,
        "same_as_ar": float(same_as_ar.compute()) if reference is not None else 1.0, "responses": responses,
    }  # fmt: skip


def test_batches(setup: Setup, module: DLLMModule, out: Path, batch_size: int | None = None) -> list[dict]:
    """The test split as left-padded prompt batches, with each prompt's task and answer."""
    records = generate_examples(setup.task, "test", setup.num_test, seed=0)
    path = out / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    size = batch_size or setup.eval_batch
    data = DLLMDataModule(prompts_file=str(path), val_batch_size=size, tokenizer=module.tokenizer)
    data.setup("predict")
    by_id = {r["id"]: r for r in records}
    batches = []
    for batch in data.predict_dataloader():
        batch["task"] = [by_id[i]["task"] for i in batch["id"]]
        batch["answer"] = [by_id[i]["answer"] for i in batch["id"]]
        batches.append(batch)
    return batches


# --- report -------------------------------------------------------------------------------------


Rows = dict[str, list[dict]]  # model name -> one row per method


def pick(rows: list[dict], label: str) -> dict | None:
    return next((r for r in rows if r["method"] == label), None)


def summary(results: Rows, timing: dict[str, dict], batch1: Rows, setup: Setup) -> str:
    """One line per model: the two questions (how much faster, at what accuracy) and the training cost."""
    middle = sorted(setup.refine_n)[len(setup.refine_n) // 2]  # N=7 in the full grid
    n, refine = max(setup.jacobi_n), f"refine N={middle} R={max(setup.refine_r)}"
    sft = results["sft"][0]["accuracy"] if "sft" in results else None
    stage1 = timing.get("sft", {}).get("train_s")
    lines = [
        f"| model | AR accuracy | of SFT's | jacobi N={n}: TPF | ... sources=none | x HF generate (batch "
        f"{setup.eval_batch}) | x HF generate (batch 1) | adaptive jacobi: TPF, x HF (batch 1) | ... sources=none "
        f"| {refine}: accuracy | of own AR | training s (of SFT's) | training CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def share(a: float, b: float | None) -> str:
        return f"{a / b:.1%}" if b else "-"

    for name, rows in results.items():
        hf, jac, ref = rows[0], pick(rows, f"jacobi N={n}"), pick(rows, refine)
        none = pick(rows, f"jacobi N={n} sources=none")
        single = {r["mode"] + (" none" if r.get("sources") else ""): r for r in batch1.get(name, [])}
        seconds = timing.get(name, {}).get("train_s")
        cost = f"{seconds:.0f}" + (f" ({seconds / stage1:.0%})" if stage1 and name != "sft" else "") if seconds else "-"
        one = f"{single['jacobi']['tokens_per_s'] / single['hf']['tokens_per_s']:.2f}x" if single else "-"
        ada = single.get("adaptive")
        ada = f"{ada['tpf']:.2f}, {ada['tokens_per_s'] / single['hf']['tokens_per_s']:.2f}x" if ada else "-"
        own = single.get("adaptive none")
        own = f"{own['tpf']:.2f}, {own['tokens_per_s'] / single['hf']['tokens_per_s']:.2f}x" if own else "-"
        none_tpf = f"{none['tpf']:.2f}" if none else "-"
        jac_tpf = f"{jac['tpf']:.2f}" if jac else "-"
        jac_x = f"{jac['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if jac else "-"
        ref_acc = f"{ref['accuracy']:.1%}" if ref else "-"
        ref_share = share(ref["accuracy"], hf["accuracy"]) if ref else "-"
        lines.append(
            f"| {name} | {hf['accuracy']:.1%} | {share(hf['accuracy'], sft)} | {jac_tpf} | {none_tpf} | {jac_x} "
            f"| {one} | {ada} | {own} "
            f"| {ref_acc} | {ref_share} | {cost} | {timing.get(name, {}).get('train_cpu_s', '-')} |"
        )
    return "\n".join(lines) + "\n"


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| model | method | accuracy | TPF | tokens/s | x HF generate | same as AR |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        hf = rows[0]["tokens_per_s"]
        for row in rows:
            lines.append(
                f"| {name} | {row['method']} | {row['accuracy']:.1%} | {row['tpf']:.2f} | {row['tokens_per_s']:,.0f} "
                f"| {row['tokens_per_s'] / hf:.2f}x | {row['same_as_ar']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def stage2_seconds(timing: dict[str, dict], name: str, step: int, setup: Setup) -> float | None:
    """Training CPU seconds (one thread, validation excluded) after ``step`` stage-2 steps.

    CPU seconds, not wall clock: on a shared machine they compare objectives whatever else ran beside each.
    Steps cost the same throughout, so the time of step ``k`` is ``k / steps`` of the whole.
    """
    seconds = timing.get(name, {}).get("train_cpu_s", timing.get(name, {}).get("train_s"))
    return None if seconds is None else seconds * step / setup.stage2_steps_of(name)


def curve_table(curves: dict[str, list], timing: dict[str, dict], setup: Setup) -> str:
    """Stage 2's validation points against steps and training seconds: compare objectives at equal wall clock."""
    lines = [
        f"| model | step | training CPU s | validation accuracy (AR) | validation jacobi TPF (N={setup.stage2_n}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, points in curves.items():
        if name not in FINETUNES:
            continue
        for step, accuracy, tpf in points:
            seconds = stage2_seconds(timing, name, step, setup)
            shown = "-" if seconds is None else f"{seconds:.0f}"
            lines.append(f"| {name} | {step} | {shown} | {accuracy:.1%} | {tpf:.2f} |")
    return "\n".join(lines) + "\n"


def plots(
    results: dict[str, list[dict]], curves: dict[str, list], timing: dict[str, dict], out: Path, setup: Setup
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k, (name, rows) in enumerate(results.items()):
        color = f"C{k}"
        ax.scatter([1.0], [rows[0]["accuracy"]], color=color, marker="*", s=120)
        for mode, style in (("refine", "-o"), ("jacobi", "--s")):
            points = sorted((r["tpf"], r["accuracy"]) for r in rows if r["mode"] == mode and not r.get("sources"))
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{name} {mode}", alpha=0.85)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs tokens per forward (star: AR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tpf.png", dpi=120)
    plt.close(fig)

    fig, (acc, tpf) = plt.subplots(1, 2, figsize=(10, 4))
    for k, name in enumerate(results):
        points = curves.get(name) or []
        if name in FINETUNES and points and stage2_seconds(timing, name, 0, setup) is not None:
            steps, em, speed = zip(*points)
            seconds = [stage2_seconds(timing, name, step, setup) for step in steps]
            acc.plot(seconds, em, "-o", color=f"C{k}", label=name)
            tpf.plot(seconds, speed, "-o", color=f"C{k}", label=name)
    acc.set_ylabel("validation accuracy (greedy AR)")
    tpf.set_ylabel(f"validation jacobi tokens per forward (N={setup.stage2_n})")
    for ax in (acc, tpf):
        ax.set_xlabel("stage-2 training CPU seconds, one thread (0: the SFT model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("refine fine-tuning of the SFT model")
    fig.tight_layout()
    fig.savefig(out / "finetune_curve.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, name in enumerate(results):
        points = curves.get(name) or []
        if name not in FINETUNES and points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color=f"C{k}", label=name)
    ax.set_xlabel("training step (from scratch)")
    ax.set_ylabel("validation accuracy (greedy AR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, a few steps, 8 test prompts")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results/quality"), help="outputs and checkpoints")
    p.add_argument("--task", default=None, help="embedded task (default: recurrence, the long-dependency task)")
    p.add_argument("--steps", type=int, default=None, help="training steps of SFT and the from-scratch models (1000)")
    p.add_argument("--stage2-steps", type=int, default=None, help="refine fine-tuning steps from the SFT model (1200)")
    p.add_argument("--num-test", type=int, default=None, help="test prompts (default: 200)")
    p.add_argument("--objectives", nargs="+", choices=[*OBJECTIVES, *FINETUNES], default=None,
                   help="models to compare (stage-2 models train sft first)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for evaluation (default: torch's)")
    p.add_argument("--jobs", type=int, default=2, help="models trained at once, one CPU thread each (default: 2)")
    args = p.parse_args(argv)
    setup = QUICK if args.quick else Setup()
    for key, value in (("task", args.task), ("steps", args.steps), ("stage2_steps", args.stage2_steps),
                       ("num_test", args.num_test), ("objectives", args.objectives)):  # fmt: skip
        if value is not None:
            setattr(setup, key, value)
    if any(name in FINETUNES for name in setup.objectives) and "sft" not in setup.objectives:
        setup.objectives = ["sft", *setup.objectives]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()

    train_all(setup, out, args.jobs)
    results, curves, timing, batches, batch1, singles = {}, {}, {}, None, {}, None
    for name in setup.objectives:
        module = DLLMModule.load_from_checkpoint(out / name / "model.ckpt", map_location="cpu", weights_only=False)
        module.eval()
        if (out / name / "timing.json").exists():
            timing[name] = json.loads((out / name / "timing.json").read_text())
        curves[name] = learning_curve(out, name)
        batches = batches or test_batches(setup, module, out)
        rows, reference = [], None
        for method in tqdm(methods(setup), desc=f"evaluating {name}", disable=not sys.stderr.isatty()):
            row = evaluate(module, method, batches, setup, reference)
            reference = reference or row["responses"]
            rows.append(row)
        results[name] = rows
        if name == "sft" or name in FINETUNES:  # wall clock at batch 1, one prompt at a time
            singles = singles or test_batches(setup, module, out, batch_size=1)[: setup.batch1_prompts]
            n = max(setup.jacobi_n)
            grid = [Method("hf"), Method("jacobi", n), Method("adaptive", n), Method("adaptive", n, sources="none")]
            batch1[name] = [evaluate(module, method, singles, setup, None) for method in grid]

    wall = time.perf_counter() - started
    header = (
        f"Task `{setup.task}`, {setup.num_test} test prompts; SFT and from-scratch models {setup.steps} steps "
        f"(batch {setup.batch_size}, lr {setup.lr}), stage 2 {setup.stage2_steps} steps (batch "
        f"{STAGE2['batch_size']}, lr {STAGE2['lr']}) from the SFT model; model {setup.model['hidden_size']}-wide x "
        f"{setup.model['num_hidden_layers']} layers; training {args.jobs} model(s) at a time on one CPU thread "
        f"each, evaluation on {torch.get_num_threads()}; wall time {wall / 60:.1f} min; load average at start "
        f"{load[0]:.2f}, at end {os.getloadavg()[0]:.2f}.\n\n"
    )
    stage2 = {k: v for k, v in results.items() if k == "sft" or k in FINETUNES}
    scratch = {k: v for k, v in results.items() if k not in FINETUNES}
    times = ", ".join(f"{k} {v['train_s']:.0f} s (+{v['validation_s']:.0f} s validation)" for k, v in timing.items())
    report = (
        header + "## Refine fine-tuning of the SFT model\n\n" + summary(stage2, timing, batch1, setup)
        + "\n## From scratch\n\n" + summary(scratch, timing, batch1, setup)
        + "\n## Stage-2 learning curves\n\n" + curve_table(curves, timing, setup)
        + "\n## Every model and method\n\n" + table(results) + f"\nTraining wall time: {times}.\n"
    )  # fmt: skip
    (out / "quality.md").write_text(report)
    rows = {name: [{k: v for k, v in row.items() if k != "responses"} for row in rows]
            for name, rows in results.items()}  # fmt: skip
    setup_json = {**setup.__dict__, "finetunes": {k: FINETUNES[k] for k in setup.objectives if k in FINETUNES}}
    batch1 = {name: [{k: v for k, v in row.items() if k != "responses"} for row in rows]
              for name, rows in batch1.items()}  # fmt: skip
    everything = {"setup": setup_json, "results": rows, "batch1": batch1, "curves": curves, "timing": timing,
                  "wall_s": wall}  # fmt: skip
    (out / "quality.json").write_text(json.dumps(everything, indent=1))
    plots(results, curves, timing, out, setup)
    print(report)
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'} and the plots in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
