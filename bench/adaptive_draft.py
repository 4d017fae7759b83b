"""Adaptive jacobi against every fixed draft length, in one process, on CPU time: is the policy's choice right?

Issue 22's target: adaptive jacobi within 97% of the best fixed N's tokens/s, at batch 1 and batch 50, on the
recipe model of ``bench/quality.py``; and its defaults (the longest draft, the hold after "no draft") decided
by measurement. Two sections:

- ``recipe``: the trained tiny model (``--checkpoint``) on the 200 test prompts of ``bench/quality.py``, batch 1
  (the first ``--batch1`` prompts, one at a time) and batch 50 (all of them); fixed N in ``--fixed`` with the model's
  own drafts (``none``) and the default sources, and adaptive (``--adaptive``: longest drafts) with both. Every
  method decodes each batch in turn, in a new random order per batch, for ``--rounds`` rounds (the first a
  warm-up), so load drift hits all alike (``--holds``: each adaptive method with each ``HOLD``); each
  adaptive method keeps its own ``DraftMemory`` across its calls, as in a process that serves only it.
- ``grounded``: SmolLM2 (``--real-model``) on the input-grounded prompts of ``bench/generation.py`` at
  batch 1, adaptive with the default sources, for each longest draft in ``--adaptive`` and each hold in
  ``--holds``, each configuration starting from a fresh ``DraftMemory`` (as a fresh process would).

Tokens/s by process CPU time (``time.process_time``, one torch thread: much steadier than wall time on a shared
machine, though contention still moves it by 10-20% under a load of 4-6 on 2 cores, hence the interleaving),
wall time beside it, and tokens per forward (TPF). ``--log-k`` prints, per adaptive
method, how often each draft length was chosen.

    PYTHONPATH=$PWD python bench/adaptive_draft.py recipe --rounds 3
    PYTHONPATH=$PWD python bench/adaptive_draft.py grounded --real-model models/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dllm.generation import draft_memory, drafting  # noqa: E402

CHOSEN: dict[str, Counter] = defaultdict(Counter)  # method -> (rows, k) -> forwards
_current = [""]


def _log_choices() -> None:
    """Count each forward's draft length per method (a wrapper around ``DraftPolicy.choose``)."""
    choose = drafting.DraftPolicy.choose

    def logged(self, rows, remaining, picks=None, lengths=None):
        k = choose(self, rows, remaining, picks, lengths)
        CHOSEN[_current[0]][k] += 1
        return k

    drafting.DraftPolicy.choose = logged


class _Memories:
    """One ``DraftMemory`` per method: each method runs as if in a process of its own."""

    def __init__(self, model):
        self.model, self.held = model, {}

    def use(self, label: str, fresh: bool = False) -> None:
        draft_memory._MEMORIES.clear()
        if label in self.held and not fresh:
            draft_memory._MEMORIES[self.model] = self.held[label]
        else:
            draft_memory.memory_of(self.model, torch.device("cpu"), self.model.dtype)
            self.held[label] = draft_memory._MEMORIES[self.model]


def _decode(module, batch: dict, mode: str, n: int, sources: str, setup) -> list[dict]:
    """One test batch through ``generate_records`` (fixed or adaptive jacobi, greedy)."""
    with torch.no_grad():
        return module.generate_records(
            batch, mode="jacobi", add_eos_length=n, adaptive_draft=mode == "adaptive", draft_sources=sources,
            max_new_tokens=setup.max_new_tokens, max_length=4096, temperature=0.0,
        )  # fmt: skip


def _decode_grounded(model, prompts: list, stop: int, n: int, new_tokens: int) -> tuple[int, int]:
    """Every grounded prompt at batch 1, adaptive jacobi with the default sources: (tokens, forwards)."""
    from dllm.generation.engine import iterative_generate

    tokens = forwards = 0
    for ids in prompts:
        with torch.inference_mode():
            out = iterative_generate(
                model, ids, torch.ones_like(ids), eos_token_id=stop, pad_token_id=stop, mode="jacobi",
                add_eos_length=n, max_new_tokens=new_tokens, return_dict=True,
            )  # fmt: skip
        tokens += int(out.new_tokens.sum())
        forwards += out.num_forwards
    return tokens, forwards


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def recipe(args) -> dict:
    from qualitybench.evaluation import test_batches
    from qualitybench.settings import Setup

    from dllm.module import DLLMModule

    module = DLLMModule.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=False).eval()
    setup = Setup(num_test=200)
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    batches = {50: test_batches(setup, module, out, 50), 1: test_batches(setup, module, out, 1)[: args.batch1]}
    methods = [("jacobi", n, s, drafting.HOLD) for n in args.fixed for s in args.sources]
    methods += [("adaptive", n, s, h) for n in args.adaptive for s in args.sources for h in args.holds]
    memories = _Memories(module.model)
    totals = defaultdict(lambda: defaultdict(float))
    rng = random.Random(0)
    for round_ in range(args.rounds):
        for batch_size in args.batch_sizes:
            for batch in batches[batch_size]:  # every method on each batch in turn: drift hits all alike
                order = methods[:]
                rng.shuffle(order)
                for mode, n, sources, hold in order:
                    label = f"b{batch_size} {mode} N={n} {sources}" + (f" hold={hold}" if len(args.holds) > 1 else "")
                    memories.use(label)
                    drafting.HOLD = hold
                    _current[0] = label

                    records, cpu, wall = _timed(partial(_decode, module, batch, mode, n, sources, setup))
                    if round_ == 0 and args.rounds > 1:  # warm-up round: not counted
                        continue
                    t = totals[label]
                    t["tokens"] += sum(r["new_tokens"] for r in records)
                    t["forwards"] += sum(r["forwards"] for r in records)
                    t["cpu"] += cpu
                    t["wall"] += wall
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    if args.log_k:  # what each adaptive method's memory prices a forward of its batch at each draft length
        from dllm.generation.draft_costs import StepCosts

        for label, memory in sorted(memories.held.items()):
            if "adaptive" in label:
                rows = int(label.split()[0][1:])
                costs = StepCosts(memory[1].times)  # (where, DraftMemory)
                ks = [0, 3, 7, 11, 15, 23, 31]
                base = float(costs.cost(rows))
                print(
                    f"{label}: cost(k) / cost(0): "
                    + " ".join(f"{k}:{float(costs.cost(rows * (k + 1))) / base:.2f}" for k in ks)
                )
                print("  size: (samples, low ms, median ms) " + " ".join(
                    f"{size}:({len(t)},{1e3 * sorted(t)[len(t) // 4]:.2f},{1e3 * sorted(t)[len(t) // 2]:.2f})"
                    for size, t in sorted(memory[1].times.items()) if size >= rows))  # fmt: skip
    return _report(totals)


def _report(totals) -> dict:
    rows = {}
    for label, t in totals.items():
        rows[label] = {
            "tpf": t["tokens"] / t["forwards"], "tokens_per_cpu_s": t["tokens"] / t["cpu"],
            "tokens_per_wall_s": t["tokens"] / t["wall"], "forwards": t["forwards"], "cpu": t["cpu"],
        }  # fmt: skip
    for prefix in sorted({label.split()[0] for label in rows}):
        mine = {k: v for k, v in rows.items() if k.split()[0] == prefix}
        fixed = [v["tokens_per_cpu_s"] for k, v in mine.items() if " jacobi " in k]
        best = max(fixed) if fixed else float("nan")
        print(f"\n{prefix}: best fixed {best:.0f} tokens/cpu-s")
        for label, v in sorted(mine.items()):
            share = v["tokens_per_cpu_s"] / best
            print(
                f"  {label:32s} TPF {v['tpf']:5.2f}  {v['tokens_per_cpu_s']:7.0f} tok/cpu-s ({share:6.1%})"
                f"  {v['tokens_per_wall_s']:7.0f} tok/wall-s  forwards {v['forwards']:.0f}"
            )
            v["share_of_best_fixed"] = share
    return rows


def grounded(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from genbench.grounded import GROUNDED_PROMPTS

    tokenizer = AutoTokenizer.from_pretrained(args.real_model)
    model = AutoModelForCausalLM.from_pretrained(args.real_model, dtype=torch.float32).eval()
    prompts = []
    for q in GROUNDED_PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids)
    stop = tokenizer.eos_token_id
    configs = [(n, hold) for n in args.adaptive for hold in args.holds]
    memories = _Memories(model)
    totals = defaultdict(lambda: defaultdict(float))
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = configs[:]
        rng.shuffle(order)
        for n, hold in order:
            label = f"b1 adaptive N={n} hold={hold}"
            memories.use(label, fresh=True)
            drafting.HOLD = hold
            _current[0] = label

            (tokens, forwards), cpu, wall = _timed(partial(_decode_grounded, model, prompts, stop, n, args.new_tokens))
            t = totals[label]
            t["tokens"] += tokens
            t["forwards"] += forwards
            t["cpu"] += cpu
            t["wall"] += wall
            print(f"  {label}: forwards {forwards}, cpu {cpu:.1f} s", file=sys.stderr, flush=True)
    rows = {}
    for label, t in sorted(totals.items()):
        rows[label] = {
            "tpf": t["tokens"] / t["forwards"], "tokens_per_cpu_s": t["tokens"] / t["cpu"],
            "forwards": t["forwards"] / args.rounds, "tokens_per_wall_s": t["tokens"] / t["wall"],
        }  # fmt: skip
        v = rows[label]
        print(f"  {label:28s} TPF {v['tpf']:5.2f}  {v['tokens_per_cpu_s']:6.1f} tok/cpu-s  "
              f"{v['tokens_per_wall_s']:6.1f} tok/wall-s  forwards/round {v['forwards']:.0f}")  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("section", choices=["recipe", "grounded"])
    p.add_argument(
        "--checkpoint",
        default="bench/results/quality/sft-recipe/model.ckpt",
        help="recipe: the trained model (default: bench/quality.py's sft-recipe)",
    )
    p.add_argument("--real-model", default="models/smollm2-135m", help="grounded: an HF folder or .gguf file")
    p.add_argument(
        "--work",
        default="bench/results/adaptive-draft",
        help="where the test prompts are written (default: %(default)s)",
    )
    p.add_argument("--batch1", type=int, default=20, help="prompts at batch 1 (default: 20)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 50], help="recipe (default: 1 50)")
    p.add_argument("--fixed", type=int, nargs="+", default=[3, 7, 11, 15, 23, 31], help="recipe: fixed draft lengths")
    p.add_argument("--adaptive", type=int, nargs="+", default=[15, 31], help="longest drafts of the adaptive runs")
    p.add_argument("--sources", nargs="+", default=["none", "all"], help="recipe: draft_sources (default: none all)")
    p.add_argument("--holds", type=int, nargs="+", default=[drafting.HOLD], help="HOLD values of the adaptive runs")
    p.add_argument("--new-tokens", type=int, default=64, help="grounded: new tokens per prompt (default: 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the first is a warm-up when > 1 (default: 3)")
    p.add_argument("--log-k", action="store_true", help="print how often each draft length was chosen")
    p.add_argument("--out", type=Path, default=None, help="write the numbers here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.log_k:
        _log_choices()
    rows = recipe(args) if args.section == "recipe" else grounded(args)
    if args.log_k:
        for label, counts in sorted(CHOSEN.items()):
            if "adaptive" in label:
                print(f"{label}: " + " ".join(f"k={k}:{c}" for k, c in sorted(counts.items())))
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
