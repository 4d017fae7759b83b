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
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from qualitybench.evaluation import Method, evaluate, methods, test_batches  # noqa: E402
from qualitybench.report import curve_table, plots, summary, table  # noqa: E402
from qualitybench.settings import FINETUNES, OBJECTIVES, QUICK, STAGE2, Setup  # noqa: E402
from qualitybench.training import learning_curve, train_all  # noqa: E402

from dllm.module import DLLMModule  # noqa: E402


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
