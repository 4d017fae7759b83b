"""Speed of block generation against Hugging Face ``generate``, greedy and sampled, tiny and real models.

Six sections, each timed in the same process (the ratios compare runs of one
process on one machine):

1. ``methods``: a tiny randomly initialised ``Qwen2ForCausalLM`` (seeded; hidden
   ``--hidden-size``, ``--layers``, vocabulary ``--vocab-size``), batch 1 and 8,
   ``--new-tokens`` per row after a random ``--prompt-length``-token prompt:
   ``hf`` (``model.generate``, greedy), ``refine`` for N in {3, 7, 15} and R in
   {1, 2, 3}, ``jacobi`` with a fixed draft of N in {3, 7, 15}, and ``jacobi``
   with the adaptive draft (the default, up to N = 7 and 15).
2. ``cache_scaling``: refine N=7 R=2 at batch 1, cached vs uncached, at
   ``--cache-lengths`` new tokens.
3. ``sampling``: the same tiny model with a 152,064-token vocabulary
   (``--sampling-vocab``), greedy vs sampling at temperature 0.7, top-p 0.9:
   one-token decoding (jacobi N=0), adaptive jacobi N=7, refine N=7 R=2 and HF,
   batch 1 and 8; the ratio is sampled time / greedy time of the same method.
4. ``real``: a real model (``--real-model``: an HF folder or a ``.gguf`` file,
   e.g. SmolLM2-135M-Instruct from ``python -m dllm.models smollm2 --out
   models/smollm2-135m``) on eight chat prompts with its own stop token, batch
   1 and 8: HF, adaptive jacobi, fixed jacobi N=3 and 7, refine N=7 R=2.
   Jacobi must reproduce HF's greedy text exactly (``matches_hf``). Skipped
   with a message when no real model is given or found.
5. ``grounded``: the same real model on fourteen input-grounded prompts
   (:data:`GROUNDED_PROMPTS`: rewrite, edit code, fix text, reformat data,
   answer from a passage; answers copy much of the prompt), all of them at
   each batch size in consecutive batches: HF ``generate``, HF prompt lookup
   (``prompt_lookup_num_tokens=10``, batch 1 only: HF refuses larger batches;
   HF's assisted decoding with a draft model does not apply: no assistant
   model exists offline), adaptive jacobi N=15 with the default draft sources
   and with each source alone (``none`` = the model's own guesses). Every
   output must equal HF greedy's. ``--plot`` draws its ratios.
6. ``chat``: the same real model on all eight chat prompts of ``real`` at
   each batch size (``real`` runs only the first ``b`` at batch ``b``), in
   consecutive batches: HF, and adaptive jacobi N=15 with the default draft
   sources and with ``none``: what a user who changes nothing gets on text
   that copies little from its prompt (the default must not fall below HF).

On the tiny models the stop id is the last vocabulary id and its ``lm_head``
row is the mean of the others: its logit is never the largest, so greedy
decoding never emits it and every method generates the full budget (checked:
``full_budget``). Tokens/s counts the generated tokens of all rows. Each
configuration runs once untimed, then ``--repeats`` times; the best counts.
Times come from ``time.perf_counter`` (after ``torch.cuda.synchronize`` on cuda).

Run it on CPU (from the repository root; the timed runs of docs/generation.md
took the shared lock)::

    python bench/generation.py --threads 1 --repeats 3 --real-model models/smollm2-135m

A smoke run of a few seconds::

    python bench/generation.py --quick --out /tmp/generation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from genbench.grounded import GROUNDED_PROMPTS, GROUNDED_SOURCES, grounded_configs, plot_grounded
from genbench.harness import DTYPES, environment, method_table, rows_of, run_section
from genbench.real import DEFAULT_REAL, REAL_PROMPTS, chat_configs, find_real_model, real_configs, real_workload
from genbench.spread import spread
from genbench.tiny import (
    cache_configs,
    cache_rows,
    cache_table,
    method_configs,
    sampling_configs,
    sampling_table,
    tiny_workload,
)

__all__ = ["GROUNDED_PROMPTS", "GROUNDED_SOURCES", "grounded_configs", "plot_grounded", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run the model (default: cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default: float32)")
    p.add_argument("--hidden-size", type=int, default=128, help="tiny model hidden size (default: 128)")
    p.add_argument("--layers", type=int, default=4, help="tiny model layers (default: 4)")
    p.add_argument("--vocab-size", type=int, default=384, help="tiny model vocabulary (default: 384)")
    p.add_argument("--sampling-vocab", type=int, default=152064, help="vocabulary of the sampling model (152064)")
    p.add_argument("--new-tokens", type=int, default=256, help="generated tokens per row (default: 256)")
    p.add_argument("--sampling-new-tokens", type=int, default=128, help="... in the sampling section (default: 128)")
    p.add_argument("--real-new-tokens", type=int, default=128, help="most tokens per row, real model (default: 128)")
    p.add_argument("--prompt-length", type=int, default=32, help="random prompt length (default: 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument(
        "--cache-lengths",
        type=int,
        nargs="+",
        default=[128, 512, 1024],
        help="new-token budgets of the cached vs uncached comparison (default: 128 512 1024)",
    )
    p.add_argument(
        "--real-model",
        type=Path,
        default=None,
        help=f"HF folder or .gguf file of a real model (default: {DEFAULT_REAL} when it exists)",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=["methods", "cache", "sampling", "real", "grounded", "chat"],
        help="what to run (default: all six)",
    )
    p.add_argument(
        "--grounded-sources",
        nargs="+",
        default=GROUNDED_SOURCES,
        help=f"draft_sources of the grounded section's jacobi runs (default: {' '.join(GROUNDED_SOURCES)})",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration; the best counts (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and prompts (default: 0)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 32 new tokens (16 sampled), prompt 16, N=3 only, cache lengths 32 64, no real model",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of the input-grounded section's speed ratios (with --replot: from that JSON, nothing run)",
    )
    p.add_argument("--replot", type=Path, default=None, help="a JSON written by --out to plot instead of running")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the sections in K fresh processes, one after another, and report the spread (min / median /\n"
        "max) of each configuration's forwards and speed ratio to HF (default: 1, this process)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/generation.json"),
        help="JSON file for all measurements (default: bench/results/generation.json)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but CUDA is not available")
    return args


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink the run to the smoke configuration when ``--quick`` is given.

    Args:
        args: the parsed options, changed in place.
    """
    if args.quick:
        args.new_tokens, args.sampling_new_tokens, args.prompt_length = 32, 16, 16
        args.cache_lengths, args.repeats = [32, 64], 1
        args.threads = args.threads or 1  # a tiny model gains nothing from threads on a shared CPU
        if args.real_model is None:
            args.sections = [s for s in args.sections if s not in ("real", "chat", "grounded")]


def main(argv: list[str] | None = None) -> dict:
    """Run the sections, print the tables and write the JSON.

    Args:
        argv: command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        Everything written to ``--out``.
    """
    args = parse_args(argv)
    if args.processes > 1:
        return spread(argv if argv is not None else sys.argv[1:], args, Path(__file__))
    if args.replot is not None:
        report = json.loads(args.replot.read_text())
        plot_grounded(report["grounded"], args.plot or Path("docs/generation_grounded.png"))
        return report
    apply_quick(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"environment": environment(args)}
    if "methods" in args.sections or "cache" in args.sections:
        tiny = tiny_workload(args, args.vocab_size, sorted({*args.batch_sizes, 1}))
        report["environment"]["tiny_model"] = tiny.name
        if "methods" in args.sections:
            results = run_section(tiny, method_configs(args.batch_sizes, args.new_tokens, args.quick), args, "methods")
            report["methods"] = rows_of(results)
            print(f"\n## Methods: {tiny.name}, prompt {args.prompt_length}, {args.new_tokens} new tokens per row\n")
            print(method_table(report["methods"]))
        if "cache" in args.sections:
            report["cache_scaling"] = cache_rows(run_section(tiny, cache_configs(args.cache_lengths), args, "cache"))
            print("\n## Cache scaling (refine N=7 R=2, batch 1)\n")
            print(cache_table(report["cache_scaling"]))
        del tiny
    if "sampling" in args.sections:
        big = tiny_workload(args, args.sampling_vocab, args.batch_sizes)
        report["environment"]["sampling_model"] = big.name
        configs = sampling_configs(args.batch_sizes, args.sampling_new_tokens)
        report["sampling"] = rows_of(run_section(big, configs, args, "sampling"))
        print(f"\n## Sampling (temperature 0.7, top-p 0.9) vs greedy: {big.name}, {args.sampling_new_tokens} tokens\n")
        print(sampling_table(report["sampling"]))
        del big
    real_sections = {  # section -> (its prompts: None = the first b chat prompts, its configs, its heading)
        "real": (None, real_configs(args.batch_sizes, args.real_new_tokens), "Real model", "its own stop token"),
        "chat": (
            REAL_PROMPTS,
            chat_configs(args.batch_sizes, args.real_new_tokens),
            "Chat",
            f"{len(REAL_PROMPTS)} prompts",
        ),
        "grounded": (
            GROUNDED_PROMPTS,
            grounded_configs(args.batch_sizes, args.real_new_tokens, args.grounded_sources),
            "Input-grounded",
            f"{len(GROUNDED_PROMPTS)} prompts, its own stop token (HF prompt lookup: batch 1 only; no assistant "
            "model offline)",
        ),
    }
    for section, (prompts, configs, heading, what) in real_sections.items():
        if section not in args.sections:
            continue
        path = find_real_model(args.real_model)
        if path is None or not path.exists():
            print(
                f"\n## {heading}: skipped: no model at {path or DEFAULT_REAL} "
                "(python -m dllm.models smollm2 --out models/smollm2-135m, or --real-model PATH)"
            )
            continue
        real = real_workload(path, args, args.batch_sizes, every=prompts)
        report["environment"]["real_model"] = real.name
        report[section] = rows_of(run_section(real, configs, args, section))
        print(f"\n## {heading}: {real.name}, up to {args.real_new_tokens} new tokens, {what}\n")
        print(method_table(report[section], real=True))
        if section == "grounded" and args.plot is not None:
            plot_grounded(report["grounded"], args.plot)
    env = report["environment"]
    print(f"\n{env['device']} {env['device_name']}, {env['dtype']}, threads={env['threads']}, best of {args.repeats}")
    if not all(r["full_budget"] for r in report.get("methods", [])):
        print("\nwarning: some runs stopped before the budget; their tokens/s are not comparable", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
