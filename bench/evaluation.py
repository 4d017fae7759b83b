"""The SFT and refine-recipe models of bench/quality.py scored through lm-evaluation-harness (docs/evaluation.md).

Every run is ``python -m dllm.evaluation`` (its ``main``, in this one process, so the imports are paid once):
lm-eval's ``hf`` model (HF ``generate``, greedy: the reference) and ``--model dllm`` with jacobi N=7 and
N=15 (lossless, adaptive drafts up to N) and refine N=7 with R=2 and R=3, on ``dllm_recurrence`` (the 200
test prompts of bench/quality.py), at batch 1 and at ``--batch-size``. ``dllm`` reads the Lightning
checkpoint (``ckpt_path=``); ``hf`` its HF export. Reported per run, from lm-eval's results file: accuracy
(exact match), tokens per forward, tokens/s, the speed relative to ``hf`` at the same batch size, and the
share of responses identical to ``hf``'s (from ``--log_samples``). Then jacobi N=15 against ``hf`` on every
shipped task (``--check-limit`` prompts each): are the responses and scores identical?

Outputs in ``--out-dir``: ``evaluation.md`` (the tables), ``evaluation.json``, ``evaluation.png`` and each
run's lm-eval output folder. Run it alone (timing)::

    flock /work/bench.lock python bench/evaluation.py --quality-dir /work/cache/quality
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dllm.evaluation.__main__ import main as lm_eval_main  # noqa: E402
from dllm.tasks import TASKS  # noqa: E402

TASK = "dllm_recurrence"
METHODS = {  # label -> (--model, extra --model_args)
    "hf": ("hf", ""),
    "jacobi N=7": ("dllm", "mode=jacobi,add_eos_length=7"),
    "jacobi N=15": ("dllm", "mode=jacobi,add_eos_length=15"),
    "refine N=7 R=2": ("dllm", "mode=refine,add_eos_length=7,refine_iter=2"),
    "refine N=7 R=3": ("dllm", "mode=refine,add_eos_length=7,refine_iter=3"),
}


def hf_export(quality_dir: Path, model: str, out: Path) -> Path:
    """The model's HF folder for ``--model hf``: bench/quality.py's export, or one written from the checkpoint."""
    folder = quality_dir / model / "hf"
    if (folder / "config.json").exists():
        return folder
    folder = out / "hf" / model
    if not (folder / "config.json").exists():
        from dllm.module import DLLMModule

        module = DLLMModule.load_from_checkpoint(quality_dir / model / "model.ckpt", map_location="cpu")
        module.save_hf(str(folder))
    return folder


def run(out: Path, method: str, checkpoint: Path, hf: Path, task: str, batch: int, limit: int | None) -> dict:
    """One lm-eval run; its metrics and its responses by document id."""
    backend, extra = METHODS[method]
    source = f"pretrained={hf},add_bos_token=False" if backend == "hf" else f"ckpt_path={checkpoint}"
    argv = ["--model", backend, "--model_args", ",".join(filter(None, [source, extra])), "--tasks", task,
            "--apply_chat_template", "--device", "cpu", "--batch_size", str(batch), "--output_path", str(out),
            "--log_samples"] + (["--limit", str(limit)] if limit else [])  # fmt: skip
    start = time.perf_counter()
    if lm_eval_main(argv) != 0:
        raise SystemExit(f"lm-eval failed: {' '.join(argv)}")
    seconds = time.perf_counter() - start
    metrics = json.loads(max(out.rglob("results_*.json")).read_text())["results"][task]
    samples = [json.loads(line) for line in max(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
    return {
        "method": method, "batch": batch, "task": task,
        "accuracy": metrics["exact_match,none"], "tpf": metrics["tokens_per_forward,none"],
        "tokens_per_s": metrics["tokens_per_s,none"], "forwards": metrics["forwards,none"],
        "generate_s": metrics["generate_seconds,none"], "run_s": seconds,
        "responses": {s["doc_id"]: s["resps"][0][0] for s in samples},
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| model | batch | method | accuracy | tokens/forward | tokens/s | x hf | same as hf | generate s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['method']} | {r['accuracy']:.1%} | {r['tpf']:.2f} "
            f"| {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['same_as_hf']:.1%} | {r['generate_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.3), squeeze=False)
    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    for ax, batch in zip(axes[0], batches):
        for k, model in enumerate(models):
            for r in (r for r in rows if r["model"] == model and r["batch"] == batch):
                marker = "*" if r["method"] == "hf" else "s" if r["method"].startswith("jacobi") else "o"
                ax.scatter(r["speedup"], r["accuracy"], color=f"C{k}", marker=marker, s=90 if marker == "*" else 45)
                ax.annotate(r["method"], (r["speedup"], r["accuracy"]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points", color=f"C{k}")  # fmt: skip
            ax.scatter([], [], color=f"C{k}", label=model)
        ax.set_xlabel("tokens/s relative to lm-eval's hf (same model, same batch)")
        ax.set_ylabel(f"{TASK} accuracy (exact match)")
        ax.set_title(f"batch size {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("lm-eval: hf vs --model dllm (star: hf, squares: jacobi, circles: refine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quality-dir", type=Path, default=Path("bench/results/quality"),
                   help="bench/quality.py's --out-dir: <model>/model.ckpt")  # fmt: skip
    p.add_argument("--out-dir", type=Path, default=Path("bench/results/evaluation"))
    p.add_argument("--models", nargs="+", default=["sft", "sft-recipe"])
    p.add_argument("--batch-size", type=int, default=50, help="the batched runs' size (the other runs: 1)")
    p.add_argument("--limit", type=int, default=None, help="prompts of dllm_recurrence (default: all 200)")
    p.add_argument("--check-limit", type=int, default=50, help="prompts per task of the jacobi-vs-hf check")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, started = args.out_dir, time.perf_counter()
    rows, checks = [], []
    for model in args.models:
        checkpoint = args.quality_dir / model / "model.ckpt"
        hf = hf_export(args.quality_dir, model, out)
        for batch in (1, args.batch_size):
            reference = None
            for method in METHODS:
                folder = out / "runs" / model / f"batch{batch}" / method.replace(" ", "_").replace("=", "")
                row = run(folder, method, checkpoint, hf, TASK, batch, args.limit)
                reference = reference or row
                row["model"] = model
                row["speedup"] = row["tokens_per_s"] / reference["tokens_per_s"]
                same = [row["responses"][i] == text for i, text in reference["responses"].items()]
                row["same_as_hf"] = sum(same) / len(same)
                rows.append(row)
                print(f"[{model} batch {batch}] {method}: accuracy {row['accuracy']:.1%}, TPF {row['tpf']:.2f}, "
                      f"{row['tokens_per_s']:,.0f} tokens/s ({row['speedup']:.2f}x hf), same as hf "
                      f"{row['same_as_hf']:.1%}, {row['run_s']:.1f} s", flush=True)  # fmt: skip
    table_seconds = time.perf_counter() - started
    model = args.models[-1]
    for task in sorted(TASKS):
        name = "dllm_" + task.replace("-", "_")
        pair = {}
        for method in ("hf", "jacobi N=15"):
            folder = out / "check" / name / method.replace(" ", "_").replace("=", "")
            checkpoint, hf = args.quality_dir / model / "model.ckpt", hf_export(args.quality_dir, model, out)
            pair[method] = run(folder, method, checkpoint, hf, name, args.batch_size, args.check_limit)
        hf, jacobi = pair["hf"], pair["jacobi N=15"]
        same = sum(jacobi["responses"][i] == text for i, text in hf["responses"].items())
        checks.append({"task": name, "prompts": len(hf["responses"]), "same_responses": same,
                       "hf_accuracy": hf["accuracy"], "jacobi_accuracy": jacobi["accuracy"]})  # fmt: skip
        print(f"[check {model}] {name}: {same}/{len(hf['responses'])} responses identical, accuracy hf "
              f"{hf['accuracy']:.1%} jacobi {jacobi['accuracy']:.1%}", flush=True)  # fmt: skip
    total = time.perf_counter() - started

    check_lines = ["| task | prompts | jacobi N=15 responses identical to hf | hf accuracy | jacobi accuracy |",
                   "|---|---:|---:|---:|---:|"]  # fmt: skip
    check_lines += [f"| {c['task']} | {c['prompts']} | {c['same_responses']} | {c['hf_accuracy']:.1%} "
                    f"| {c['jacobi_accuracy']:.1%} |" for c in checks]  # fmt: skip
    report = (
        f"{table(rows)}\nThe table took {table_seconds / 60:.1f} minutes; with the check below, {total / 60:.1f}.\n\n"
        f"Jacobi vs hf on every shipped task ({model}, batch {args.batch_size}):\n\n" + "\n".join(check_lines) + "\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.md").write_text(report)
    for r in rows:
        r.pop("responses")
    (out / "evaluation.json").write_text(json.dumps({"rows": rows, "checks": checks, "table_s": table_seconds,
                                                     "total_s": total}, indent=1))  # fmt: skip
    plot(rows, out / "evaluation.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
