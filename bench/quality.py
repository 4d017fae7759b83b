"""Does the iterative-refine objective buy parallel decoding? Accuracy against tokens per forward.

Trains (or reuses) tiny models of the same size, on the same data and for the same steps, that
differ only in the objective:

- ``sft``: plain next-token fine-tuning (noise 0, one round);
- ``refine``: the seed's objective (i.i.d. EOS noise with t ~ U[0.1, 0.9], two rounds);
- ``refine+ar``: the seed's objective plus a clean-input next-token term (``ar_loss_weight=1``),
  as CLLM and Jacobi Forcing add against collapse;
- ``refine+block``: the seed's rounds with block-structured noise (a clean prefix up to a random
  cut, then a block-length run of EOS), which matches what inference feeds the model.

Then evaluates every model on the task's test split, in one run, with

- AR: Hugging Face ``generate`` (greedy), the reference;
- refine with N in {3, 7, 15} and R in {1, 2, 3};
- jacobi with N in {3, 7, 15} (lossless: should match AR token for token);

and reports final-answer accuracy, tokens per forward (TPF: generated tokens over model forwards),
tokens/s and the speed relative to HF ``generate`` on the same checkpoint, plus, for each method,
the share of outputs identical to AR. Metrics are accumulated with torchmetrics.

Outputs in ``--out-dir`` (default ``bench/results/quality``): ``quality.md`` (the table),
``quality.json``, ``accuracy_vs_tpf.png`` (one curve per model and mode) and ``learning_curve.png``
(validation AR accuracy against training steps, from the CSV logs). Checkpoints are kept in
``<out-dir>/<model>/model.ckpt`` and reused when their training settings match.

Full run (about 40 minutes on 2 CPU cores, most of it training)::

    python bench/quality.py --threads 2

Smoke run (seconds; tiny model, a few steps)::

    python bench/quality.py --quick --out-dir /tmp/quality
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric, SumMetric
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dllm.data import DLLMDataModule  # noqa: E402
from dllm.module import DLLMModule, GenerationSettings  # noqa: E402
from dllm.tasks import check_answer, generate_examples  # noqa: E402

# The objectives compared; every other setting is shared.
OBJECTIVES: dict[str, dict] = {
    "sft": {"noise_min": 0.0, "noise_max": 0.0, "num_rounds": 1},
    "refine": {},
    "refine+ar": {"ar_loss_weight": 1.0},
    "refine+block": {"noise_schedule": "block"},
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
    num_test: int = 200
    eval_batch: int = 50
    max_new_tokens: int = 160
    refine_n: list[int] = field(default_factory=lambda: [3, 7, 15])
    refine_r: list[int] = field(default_factory=lambda: [1, 2, 3])
    jacobi_n: list[int] = field(default_factory=lambda: [3, 7, 15])
    model: dict = field(default_factory=lambda: dict(MODEL))
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVES))

    def training(self, name: str) -> dict:
        """The settings a checkpoint depends on (reuse only when they match)."""
        return {
            "objective": name, "overrides": OBJECTIVES[name], "task": self.task, "steps": self.steps,
            "batch_size": self.batch_size, "lr": self.lr, "num_train": self.num_train, "model": self.model,
        }  # fmt: skip


QUICK = Setup(
    steps=6, num_train=64, num_val=8, val_every=3, num_test=8, eval_batch=8, max_new_tokens=24,
    refine_n=[3], refine_r=[1, 2], jacobi_n=[3], objectives=["sft", "refine"],
    model={**MODEL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
)  # fmt: skip


# --- training -------------------------------------------------------------------------------------


def train(setup: Setup, name: str, out: Path) -> DLLMModule:
    """Train one objective, or load its checkpoint when the training settings match."""
    folder = out / name
    ckpt, meta = folder / "model.ckpt", folder / "training.json"
    wanted = setup.training(name)
    if ckpt.exists() and meta.exists() and json.loads(meta.read_text()) == wanted:
        print(f"[{name}] reusing {ckpt}")
        return DLLMModule.load_from_checkpoint(ckpt, map_location="cpu")
    print(f"[{name}] training {setup.steps} steps on {setup.task}")
    L.seed_everything(0)
    # Validation generates with jacobi: its accuracy is greedy AR accuracy (lossless), in fewer forwards.
    validation = GenerationSettings(mode="jacobi", add_eos_length=3, max_new_tokens=setup.max_new_tokens)
    module = DLLMModule(
        model_config=dict(setup.model), tokenizer="byte", lr=setup.lr, warmup_steps=50, min_lr_ratio=0.1,
        val_generate_batches=-1, val_max_new_tokens=setup.max_new_tokens, generation=validation,
        **OBJECTIVES[name],
    )  # fmt: skip
    data = DLLMDataModule(
        task=setup.task, num_train=setup.num_train, num_val=setup.num_val, batch_size=setup.batch_size,
        val_batch_size=setup.eval_batch, max_length=256, tokenizer=module.tokenizer,
    )  # fmt: skip
    start = time.perf_counter()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=setup.steps, val_check_interval=setup.val_every,
        check_val_every_n_epoch=None, gradient_clip_val=1.0, logger=L.pytorch.loggers.CSVLogger(folder, name="logs"),
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=25,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    trainer.save_checkpoint(ckpt)
    meta.write_text(json.dumps(wanted, indent=1))
    (folder / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
    return module.eval()


def learning_curve(out: Path, name: str) -> list[tuple[int, float]]:
    """(step, validation exact match) pairs from the newest CSV log of one objective."""
    logs = sorted((out / name / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not logs:
        return []
    rows = csv.DictReader(logs[-1].open())
    return [(int(r["step"]) + 1, float(r["val/exact_match"])) for r in rows if r.get("val/exact_match")]


# --- evaluation ---------------------------------------------------------------------------------


@dataclass
class Method:
    """One decoding setting: ``hf`` (HF generate), ``refine`` or ``jacobi``."""

    mode: str
    n: int | None = None
    r: int | None = None

    @property
    def label(self) -> str:
        if self.mode == "hf":
            return "AR (HF generate)"
        return f"refine N={self.n} R={self.r}" if self.mode == "refine" else f"jacobi N={self.n}"


def methods(setup: Setup) -> list[Method]:
    grid = [Method("hf")]
    grid += [Method("refine", n, r) for n in setup.refine_n for r in setup.refine_r]
    grid += [Method("jacobi", n) for n in setup.jacobi_n]
    return grid


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


def evaluate(module: DLLMModule, method: Method, batches: list[dict], setup: Setup, reference: dict | None) -> dict:
    """Accuracy, TPF, tokens/s and agreement with AR over the test batches."""
    accuracy, same_as_ar = MeanMetric(), MeanMetric()
    tokens, forwards = SumMetric(), SumMetric()
    responses, seconds = {}, 0.0
    for batch in batches:
        start = time.perf_counter()
        with torch.no_grad():
            if method.mode == "hf":
                records = hf_generate(module, batch, setup.max_new_tokens)
            else:
                records = module.generate_records(
                    batch, mode=method.mode, add_eos_length=method.n, refine_iter=method.r or 1,
                    max_new_tokens=setup.max_new_tokens, max_length=4096, temperature=0.0,
                )  # fmt: skip
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
        "method": method.label, "mode": method.mode, "N": method.n, "R": method.r,
        "accuracy": float(accuracy.compute()), "tpf": total / float(forwards.compute()),
        "tokens_per_s": total / seconds, "seconds": seconds,
        "same_as_ar": float(same_as_ar.compute()) if reference is not None else 1.0, "responses": responses,
    }  # fmt: skip


def test_batches(setup: Setup, module: DLLMModule, out: Path) -> list[dict]:
    """The test split as left-padded prompt batches, with each prompt's task and answer."""
    records = generate_examples(setup.task, "test", setup.num_test, seed=0)
    path = out / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = DLLMDataModule(prompts_file=str(path), val_batch_size=setup.eval_batch, tokenizer=module.tokenizer)
    data.setup("predict")
    by_id = {r["id"]: r for r in records}
    batches = []
    for batch in data.predict_dataloader():
        batch["task"] = [by_id[i]["task"] for i in batch["id"]]
        batch["answer"] = [by_id[i]["answer"] for i in batch["id"]]
        batches.append(batch)
    return batches


# --- report -------------------------------------------------------------------------------------


def table(results: dict[str, list[dict]], train_seconds: dict[str, float]) -> str:
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
    trained = ", ".join(f"{k} {v:.0f} s" for k, v in train_seconds.items())
    return "\n".join(lines) + (f"\n\nTraining wall time: {trained}.\n" if trained else "\n")


def plots(results: dict[str, list[dict]], curves: dict[str, list], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (name, rows) in enumerate(results.items()):
        color = f"C{k}"
        ax.scatter([1.0], [rows[0]["accuracy"]], color=color, marker="*", s=120)
        for mode, style in (("refine", "-o"), ("jacobi", "--s")):
            points = sorted((r["tpf"], r["accuracy"]) for r in rows if r["mode"] == mode)
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{name} {mode}", alpha=0.85)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs tokens per forward (star: AR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tpf.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (name, points) in enumerate(curves.items()):
        if points:
            ax.plot(*zip(*points), "-o", color=f"C{k}", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (greedy AR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 6 steps, 8 test prompts")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results/quality"), help="outputs and checkpoints")
    p.add_argument("--task", default=None, help="embedded task (default: recurrence, the long-dependency task)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: 1000)")
    p.add_argument("--num-test", type=int, default=None, help="test prompts (default: 200)")
    p.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=None, help="models to compare")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    setup = QUICK if args.quick else Setup()
    for key, value in (("task", args.task), ("steps", args.steps), ("num_test", args.num_test),
                       ("objectives", args.objectives)):  # fmt: skip
        if value is not None:
            setattr(setup, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    results, curves, train_seconds, batches = {}, {}, {}, None
    for name in setup.objectives:
        module = train(setup, name, out).eval()
        seconds_file = out / name / "train_seconds.txt"
        if seconds_file.exists():
            train_seconds[name] = float(seconds_file.read_text())
        curves[name] = learning_curve(out, name)
        batches = batches or test_batches(setup, module, out)
        rows, reference = [], None
        for method in tqdm(methods(setup), desc=f"evaluating {name}"):
            row = evaluate(module, method, batches, setup, reference)
            reference = reference or row["responses"]
            rows.append(row)
        results[name] = rows

    report = table(results, train_seconds)
    header = (
        f"Task `{setup.task}`, {setup.num_test} test prompts, {setup.steps} training steps per model "
        f"(batch {setup.batch_size}, lr {setup.lr}), model {setup.model['hidden_size']}-wide x "
        f"{setup.model['num_hidden_layers']} layers, CPU threads {torch.get_num_threads()}.\n\n"
    )
    (out / "quality.md").write_text(header + report)
    summary = {name: [{k: v for k, v in row.items() if k != "responses"} for row in rows]
               for name, rows in results.items()}  # fmt: skip
    (out / "quality.json").write_text(json.dumps({"setup": setup.__dict__, "results": summary, "curves": curves},
                                                 indent=1))  # fmt: skip
    plots(results, curves, out)
    print(header + report)
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}, {out / 'accuracy_vs_tpf.png'}, "
          f"{out / 'learning_curve.png'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
