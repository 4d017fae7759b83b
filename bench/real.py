"""A real model before and after self-distillation: SmolLM2-135M-Instruct on held-out chat prompts.

Compares the base model with the self-distilled one (fine-tuned with the objective on its own greedy
answers, docs/real.md) in one run, on held-out prompts of ``dllm.prompts`` (split ``test``: never
trained on) and a few hand-written general chat prompts:

- jacobi tokens per forward (TPF) at N = 3/7/15 with a fixed draft, and with the adaptive
  draft (at most N=15); and whether jacobi's output is the same model's greedy output;
- refine N/R: TPF and agreement with the same model's greedy output (exact, and first 32 tokens);
- the distilled model's greedy answers against the base model's (exact, and first 32 tokens);
- tokens/s at batch 1 of HF ``generate``, jacobi and refine (same thread count);
- training seconds per optimizer step and peak memory (a few steps of ``configs/smollm2-135m.yaml``
  in a child process).

Greedy references come from HF ``generate`` in float32; quality runs are batched (left-padded),
speed runs are batch 1. Outputs in ``--out-dir`` (default ``bench/results/real``): ``real.md``,
``real.json`` and ``real.png``. Run it under the shared lock so timings do not overlap::

    flock /tmp/dllm-heavy.lock python bench/real.py --threads 1 \\
        --base models/smollm2-135m --distilled runs/smollm2-135m/hf --train-file data/distill-answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dllm import iterative_generate  # noqa: E402
from dllm.module import stop_token_ids  # noqa: E402
from dllm.prompts import make_prompts  # noqa: E402
from dllm.tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Not from the prompt generator's templates: do the answers stay general-purpose English?
GENERAL_PROMPTS = [
    "What is the capital of France?",
    "Can you recommend a good book for a long flight?",
    "How do I boil an egg?",
    "Tell me a fun fact about octopuses.",
    "Why do leaves change colour in autumn?",
    "Write a polite message declining an invitation to a party.",
]
PREFIX = 32  # "first tokens agree" compares this many tokens


def encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]  # fmt: skip
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def batches(prompt_ids: list[list[int]], size: int, pad: int):
    """Left-padded ``(input_ids, attention_mask)`` batches in input order."""
    for start in range(0, len(prompt_ids), size):
        rows = prompt_ids[start : start + size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
        yield ids, mask


def cut(tokens: list[int], stops: list[int]) -> list[int]:
    """Generated tokens up to and including the first stop id."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


def generate(model, tokenizer, prompt_ids, method: str, n: int, r: int, args, batch: int) -> dict:
    """Run one method over all prompts; tokens per prompt, forwards, seconds."""
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    outputs, forwards, seconds = [], 0, 0.0
    for ids, mask in batches(prompt_ids, batch, pad):
        start = time.perf_counter()
        if method == "hf":
            seq = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens,
                eos_token_id=stops, pad_token_id=pad,
            )  # fmt: skip
            rows = [cut(s[ids.size(1) :].tolist(), stops) for s in seq]
            forwards += sum(len(x) for x in rows)
        else:
            extra = {"adaptive_draft": method == "jacobi-adaptive"}
            out = iterative_generate(
                model, ids, mask, eos_token_id=stops, pad_token_id=pad, add_eos_length=n, refine_iter=r,
                max_new_tokens=args.max_new_tokens, mode="refine" if method == "refine" else "jacobi",
                return_dict=True, **extra,
            )  # fmt: skip
            rows = [out.sequences[i, ids.size(1) : ids.size(1) + k].tolist() for i, k in enumerate(out.new_tokens)]
            forwards += int(out.forwards.sum())
        seconds += time.perf_counter() - start
        outputs += rows
    tokens = sum(len(x) for x in outputs)
    return {"outputs": outputs, "tokens": tokens, "forwards": forwards, "seconds": seconds,
            "tpf": tokens / max(forwards, 1), "tokens_per_s": tokens / max(seconds, 1e-9)}  # fmt: skip


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> dict:
    """Share of prompts whose output equals the reference, and whose first ``PREFIX`` tokens do."""
    exact = sum(a == b for a, b in zip(outputs, reference)) / len(reference)
    prefix = sum(a[:PREFIX] == b[:PREFIX] for a, b in zip(outputs, reference)) / len(reference)
    return {"exact": exact, "prefix": prefix}


def evaluate(name: str, path: str, args, prompts: list[str]) -> dict:
    """Every quality and speed measurement of one model."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt_ids = encode(tokenizer, prompts)
    held = prompt_ids[: args.num]
    res: dict = {"name": name, "path": path}
    runs = [("hf", 0, 0)] + [("jacobi", n, 1) for n in args.jacobi_n]
    runs += [("jacobi-adaptive", max(args.jacobi_n), 1)]
    runs += [("refine", n, r) for n, r in args.refine]
    for method, n, r in tqdm(runs, desc=f"{name}: quality"):
        out = generate(model, tokenizer, held, method, n, r, args, args.batch)
        key = method if method == "hf" else f"{method} N={n}" + (f" R={r}" if method == "refine" else "")
        res[key] = {k: v for k, v in out.items() if k != "outputs"}
        res[key]["outputs"] = out["outputs"]
        if method != "hf":
            res[key]["vs_greedy"] = agreement(out["outputs"], res["hf"]["outputs"])
    speed = prompt_ids[: args.speed_prompts]
    for method, n, r in tqdm([("hf", 0, 0), ("jacobi-adaptive", 7, 1), ("jacobi", 7, 1), ("refine", 7, 2)],
                             desc=f"{name}: batch-1 speed"):  # fmt: skip
        out = generate(model, tokenizer, speed, method, n, r, args, 1)
        key = "hf" if method == "hf" else f"{method} N={n}" + (f" R={r}" if method == "refine" else "")
        res.setdefault("speed", {})[key] = out["tokens_per_s"]
    general = generate(model, tokenizer, prompt_ids[args.num :], "hf", 0, 0, args, args.batch)
    res["general"] = [tokenizer.decode(o, skip_special_tokens=True) for o in general["outputs"]]
    return res


class StepTimer:
    """Lightning callback (child process): wall time of each optimizer step."""

    def __init__(self, out: str):
        import lightning as L

        class _Timer(L.Callback):
            def on_train_batch_end(cb, trainer, *a):
                self.times.append((trainer.global_step, time.perf_counter()))

        self.out, self.times, self.callback = out, [], _Timer()

    def save(self) -> None:
        Path(self.out).write_text(json.dumps(self.times))


def train_probe(args) -> None:
    """Child process: a few optimizer steps of the shipped config, timed."""
    from dllm.cli import DLLMCLI

    torch.set_num_threads(args.threads)
    timer = StepTimer(args.probe_out)
    DLLMCLI(
        args=["fit", "--config", str(ROOT / "configs/smollm2-135m.yaml"), "--model.pretrained", args.base,
              "--data.train_file", args.train_file, "--trainer.max_steps", str(args.train_steps),
              "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_checkpointing",
              "false", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(Path(args.probe_out).parent)],
        trainer_defaults={"callbacks": [timer.callback]},
        save_config_callback=None,
        run=True,
    )  # fmt: skip
    timer.save()


def measure_training(args, out_dir: Path) -> dict:
    """Seconds per optimizer step (after the first) and peak RSS of a short training run."""
    probe = out_dir / "train_probe.json"
    cmd = [
        sys.executable, __file__, "--_train-probe", "--probe-out", str(probe), "--base", args.base,
        "--train-file", args.train_file, "--train-steps", str(args.train_steps), "--threads", str(args.threads),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    marks = {step: t for step, t in json.loads(probe.read_text())}  # last batch of each optimizer step
    steps = sorted(marks)
    per_step = (marks[steps[-1]] - marks[steps[0]]) / max(len(steps) - 1, 1)
    return {"seconds_per_step": per_step, "peak_rss_gib": peak, "steps": len(steps)}


def report(results: dict, args, out_dir: Path) -> str:
    base, dist = results["base"], results["distilled"]
    keys = [k for k in base if k.startswith(("jacobi", "refine"))]
    lines = [
        f"# SmolLM2-135M-Instruct: base vs self-distilled ({args.num} held-out prompts, "
        f"{args.max_new_tokens} new tokens max, {args.threads} thread(s))",
        "",
        "| method | base TPF | distilled TPF | base = its greedy (exact / first 32) "
        "| distilled = its greedy (exact / first 32) |",
        "|---|---:|---:|---|---|",
    ]
    for k in keys:
        b, d = base[k]["vs_greedy"], dist[k]["vs_greedy"]
        lines.append(
            f"| {k} | {base[k]['tpf']:.2f} | {dist[k]['tpf']:.2f} | {b['exact']:.0%} / {b['prefix']:.0%} "
            f"| {d['exact']:.0%} / {d['prefix']:.0%} |"
        )
    agree = agreement(dist["hf"]["outputs"], base["hf"]["outputs"])
    lines += ["", f"Distilled greedy vs base greedy: {agree['exact']:.0%} identical answers, "
              f"{agree['prefix']:.0%} agree on their first {PREFIX} tokens.", "",
              "| batch 1, tokens/s | base | distilled | distilled x HF |", "|---|---:|---:|---:|"]  # fmt: skip
    for k in dist["speed"]:
        ratio = dist["speed"][k] / dist["speed"]["hf"]
        lines.append(f"| {k} | {base['speed'][k]:.1f} | {dist['speed'][k]:.1f} | {ratio:.2f}x |")
    if "training" in results:
        t = results["training"]
        lines += ["", f"Training (configs/smollm2-135m.yaml): {t['seconds_per_step']:.1f} s per optimizer step "
                  f"(mean of {t['steps'] - 1}), peak RSS {t['peak_rss_gib']:.1f} GiB."]  # fmt: skip
    lines += ["", "General chat prompts (greedy, first 160 characters):", ""]
    for p, a, b in zip(GENERAL_PROMPTS, base["general"], dist["general"]):
        lines += [f"- **{p}**", f"  - base: {a[:160]!r}", f"  - distilled: {b[:160]!r}"]
    results["distilled_vs_base"] = agree
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("base", "--"), ("distilled", "-")):
        res = results[name]
        jac = sorted((int(k.split("N=")[1]), v["tpf"]) for k, v in res.items() if k.startswith("jacobi N="))
        left.plot([n for n, _ in jac], [t for _, t in jac], style, marker="o", label=f"{name}: jacobi (lossless)")
        ref = [(v["tpf"], v["vs_greedy"]["prefix"], k) for k, v in res.items() if k.startswith("refine")]
        right.scatter([t for t, _, _ in ref], [a for _, a, _ in ref], marker="o" if name == "distilled" else "x",
                      label=f"{name}: refine")  # fmt: skip
        for t, a, k in ref:
            right.annotate(k.replace("refine ", ""), (t, a), fontsize=7)
    left.set(xlabel="N (draft tokens)", ylabel="tokens per forward", title="jacobi, held-out prompts")
    right.set(xlabel="tokens per forward", ylabel=f"first {PREFIX} tokens = greedy", title="refine N/R")
    left.legend(), right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="models/smollm2-135m", help="HF folder of the base model")
    parser.add_argument("--distilled", default="runs/smollm2-135m/hf", help="HF folder of the distilled model")
    parser.add_argument("--train-file", default="data/distill-answers.jsonl", help="training data for the step timing")
    parser.add_argument("--num", type=int, default=32, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="batch size of the quality runs")
    parser.add_argument("--speed-prompts", type=int, default=4, help="prompts timed at batch 1")
    parser.add_argument("--jacobi-n", type=int, nargs="+", default=[3, 7, 15])
    parser.add_argument("--refine", default="3x2,7x1,7x2,15x2", help="refine N x R settings")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (same for every method)")
    parser.add_argument("--train-steps", type=int, default=4, help="steps of the training timing (0 = skip)")
    parser.add_argument("--out-dir", default="bench/results/real")
    parser.add_argument("--_train-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._train_probe:
        train_probe(args)
        return 0
    args.refine = [tuple(int(x) for x in s.split("x")) for s in args.refine.split(",")]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [r["prompt"] for r in make_prompts("test", args.num, seed=args.seed)] + GENERAL_PROMPTS
    results: dict = {"settings": {k: v for k, v in vars(args).items() if not k.startswith(("_", "probe"))}}
    if args.train_steps > 0:
        results["training"] = measure_training(args, out_dir)
    results["base"] = evaluate("base", args.base, args, prompts)
    results["distilled"] = evaluate("distilled", args.distilled, args, prompts)
    text = report(results, args, out_dir)
    (out_dir / "real.md").write_text(text)
    plot(results, out_dir / "real.png")
    for name in ("base", "distilled"):  # token lists are bulky: keep the decoded greedy answers only
        tok = load_tokenizer(results[name]["path"])
        results[name]["greedy_answers"] = [
            tok.decode(o, skip_special_tokens=True) for o in results[name]["hf"]["outputs"]
        ]
        for v in results[name].values():
            if isinstance(v, dict):
                v.pop("outputs", None)
    (out_dir / "real.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
