"""Drift along a LoRA self-distillation run: KL to the base, argmax agreement, checkable accuracy, jacobi TPF.

``bench/real.py`` compares finished models; this follows one run. During the fit, ``AdapterSnapshots``
(a callback) saves the LoRA adapters (a few MB) after each validation and at the end; afterwards ``eval``
measures each snapshot as ``bench/real.py`` does, merged into the base weights: KL(base || model) and argmax
agreement teacher-forced on the base model's greedy answers to held-out prompts, accuracy on held-out
checkable questions, jacobi N=7 tokens per forward (lossless: its output is the model's greedy output, so the
first 32 tokens also give agreement with the base model's greedy answers); ``plot`` draws runs side by side
with the validation drift meter (``val/kl_to_base``) from their CSV logs::

    # add to the config's trainer.callbacks: {class_path: bench.drift.AdapterSnapshots, init_args: {out: snaps/on}}
    OMP_NUM_THREADS=1 python bench/drift.py eval --base models/smollm2-135m --out drift.jsonl base snaps/on/*.pt
    python bench/drift.py plot --out docs/drift.png --evals drift.jsonl --run on=runs/on:snaps/on
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real import encode, generate, teacher_forced  # noqa: E402

from dllm.data.prompts import checkable_prompts, is_answer, make_prompts  # noqa: E402
from dllm.data.tokenizer import load_tokenizer  # noqa: E402
from dllm.training.lora import LoraSettings, add_lora, merge_lora  # noqa: E402


class AdapterSnapshots(L.Callback):
    """Save the LoRA adapters as ``<out>/step<N>.pt`` after each validation and at the end of fit."""

    def __init__(self, out: str):
        self.out = Path(out)

    def _save(self, trainer, module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items() if ".lora_" in k}
        torch.save(state, self.out / f"step{trainer.global_step:04d}.pt")

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self._save(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._save(trainer, module)


def evaluate(args) -> None:
    """One JSON line per snapshot (``base`` = the base model itself) appended to ``--out``."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    load = lambda: AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()  # noqa: E731
    tok, base = load_tokenizer(args.base), load()
    held = encode(tok, [r["prompt"] for r in make_prompts("test", args.num, seed=0)])
    checks = checkable_prompts("test", args.check_num, seed=0)
    check_ids = encode(tok, [c["prompt"] for c in checks])
    answers = generate(base, tok, held, "hf", 0, 0, 16, args.max_new_tokens)["outputs"]  # the base's greedy answers
    for snap in args.snapshots:
        start, model = time.time(), load()
        if snap != "base":
            settings = LoraSettings(r=args.lora_r, alpha=args.lora_alpha)
            lora = add_lora(load(), settings)
            assert not lora.load_state_dict(torch.load(snap), strict=False).unexpected_keys
            model.load_state_dict(merge_lora(lora.state_dict(), settings))
        with torch.no_grad():
            row = {"snap": snap, **teacher_forced(base, model, held, answers)}
            out = generate(model, tok, check_ids, "hf", 0, 0, 30, 64)
            texts = [tok.decode(o, skip_special_tokens=True) for o in out["outputs"]]
            row["checkable"] = sum(is_answer(a, c["answers"]) for a, c in zip(texts, checks)) / len(checks)
            jacobi = generate(model, tok, held, "jacobi", 7, 1, 16, args.max_new_tokens)
        row["tpf_jacobi7"] = jacobi["tpf"]
        row["greedy_first32_eq_base"] = sum(a[:32] == b[:32] for a, b in zip(jacobi["outputs"], answers)) / len(held)
        row["seconds"] = time.time() - start
        with open(args.out, "a") as f:
            print(json.dumps(row), file=f)
        print(row, flush=True)


def plot(args) -> None:
    """KL, argmax agreement, checkable accuracy and TPF against the optimizer step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [json.loads(line) for line in open(args.evals)]
    base = next(e for e in evals if e["snap"] == "base")
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for color, spec in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], args.run):
        label, _, paths = spec.partition("=")
        root, _, snaps = paths.partition(":")
        points = [(0, base)] + sorted(
            (int(m.group(1)), e) for e in evals if (m := re.search(rf"{re.escape(snaps)}/step(\d+)\.pt$", e["snap"]))
        )
        steps = [s for s, _ in points]
        for ax, key in zip(axes, ("kl_nats_per_token", "argmax_agreement", "checkable", "tpf_jacobi7")):
            ax.plot(steps, [e[key] for _, e in points], marker="o", color=color, label=f"{label}, test")
        logs = sorted(Path(root).glob("lightning_logs/version_*/metrics.csv"))
        rows = [r for r in csv.DictReader(open(logs[-1])) if r.get("val/kl_to_base")] if logs else []
        # a snapshot follows each validation: the i-th validation is at the i-th snapshot's optimizer step (the
        # CSV's step column reads one less for validations inside an epoch)
        val_steps = steps[1 : len(rows) + 1]
        kl, agree = [float(r["val/kl_to_base"]) for r in rows], [float(r["val/argmax_agreement"]) for r in rows]
        axes[0].plot(val_steps, kl, "x--", color=color, label=f"{label}, val meter")
        axes[1].plot(val_steps, agree, "x--", color=color, label=f"{label}, val meter")
    axes[0].axhline(0.05, color="gray", ls=":", label="target 0.05")
    axes[2].axhline(base["checkable"], color="gray", ls=":", label="base")
    axes[3].axhline(base["tpf_jacobi7"], color="gray", ls=":", label="base")
    titles = ["KL(base || tuned), nats/token", "teacher-forced argmax = base", "checkable accuracy",
              "jacobi N=7 tokens per forward"]  # fmt: skip
    for ax, title in zip(axes, titles):
        ax.set(xlabel="optimizer step", title=title)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="measure snapshots (and 'base')")
    ev.add_argument("snapshots", nargs="+", help="'base' or <snapshot>.pt files")
    ev.add_argument("--base", default="models/smollm2-135m")
    ev.add_argument("--out", default="bench/results/drift.jsonl")
    ev.add_argument("--num", type=int, default=16, help="held-out prompts (test split)")
    ev.add_argument("--check-num", type=int, default=60, help="held-out checkable questions")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--lora-r", type=int, default=8)
    ev.add_argument("--lora-alpha", type=float, default=16.0)
    ev.add_argument("--threads", type=int, default=1)
    pl = sub.add_parser("plot", help="runs side by side")
    pl.add_argument("--evals", required=True)
    pl.add_argument("--run", nargs="+", required=True, help="label=<run folder>:<snapshot folder>")
    pl.add_argument("--out", default="docs/drift.png")
    args = parser.parse_args(argv)
    (evaluate if args.command == "eval" else plot)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
