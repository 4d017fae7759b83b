"""A real model before and after self-distillation: SmolLM2-135M-Instruct on held-out prompts.

Compares the base model with one or more self-distilled ones (fine-tuned with the objective on their own
greedy answers, docs/real.md) in one run. Everything is on prompts never trained on (``dllm.data.prompts``,
split ``test``), plus a few hand-written general chat prompts:

- do the answers stay the model's? KL(base || distilled) in nats per token and the share of positions whose
  argmax agrees, both teacher-forced on the base model's greedy answers; the distilled model's greedy answers
  against the base model's (exact, and first 32 tokens);
- are they still right? accuracy on held-out checkable questions (``dllm.data.prompts.checkable_prompts``:
  capitals, languages, sums, days in weeks, ...; an answer counts when the response contains it);
- is it faster? jacobi tokens per forward (TPF) at each N (and whether jacobi's output is the same model's
  greedy output); refine N/R TPF and agreement with greedy; tokens/s at batch 1 of HF ``generate``, jacobi
  and refine (same thread count); training seconds per optimizer step and peak memory (a few steps of
  ``--train-config``, by default ``configs/smollm2-135m.yaml``, in a child process).

Greedy references come from HF ``generate`` in float32; quality runs are batched (left-padded), speed runs
are batch 1. Each model's results are cached in ``--out-dir``/cache (same settings: reused), so models can
be measured one at a time, or in parallel processes, and reported together. Outputs: ``real.md``,
``real.json`` and ``real.png``. Timings go under the shared lock so they do not overlap::

    flock /work/bench.lock python bench/real.py --threads 1 --base models/smollm2-135m \\
        --distilled runs/smollm2-135m/hf --train-file data/distill-answers.jsonl
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
from dllm.data.prompts import checkable_prompts, is_answer, make_prompts  # noqa: E402
from dllm.data.tokenizer import load_tokenizer  # noqa: E402
from dllm.prediction_records import stop_token_ids  # noqa: E402

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


def generate(model, tokenizer, prompt_ids, method: str, n: int, r: int, batch: int, max_new_tokens: int) -> dict:
    """Run one method over all prompts; tokens per prompt, forwards, seconds."""
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    outputs, forwards, seconds = [], 0, 0.0
    for ids, mask in batches(prompt_ids, batch, pad):
        start = time.perf_counter()
        if method == "hf":
            seq = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                eos_token_id=stops, pad_token_id=pad,
            )  # fmt: skip
            rows = [cut(s[ids.size(1) :].tolist(), stops) for s in seq]
            forwards += sum(len(x) for x in rows)
        else:
            extra = {"adaptive_draft": method == "jacobi-adaptive"}
            out = iterative_generate(
                model, ids, mask, eos_token_id=stops, pad_token_id=pad, add_eos_length=n, refine_iter=r,
                max_new_tokens=max_new_tokens, mode="refine" if method == "refine" else "jacobi",
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


@torch.no_grad()
def teacher_forced(base, model, prompt_ids: list[list[int]], answers: list[list[int]]) -> dict:
    """KL(base || model) in nats per answer token and argmax agreement, on ``prompt + base answer``.

    Each answer token's position is scored once: the two models' next-token distributions where the base
    model wrote it. Token-weighted means over all answers.
    """
    kl_sum, same, count = 0.0, 0, 0
    for prompt, answer in zip(prompt_ids, answers):
        if not answer:
            continue
        ids = torch.tensor([prompt + answer])
        where = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)  # the positions that predict the answer
        logp = base(ids).logits[0, where].double().log_softmax(-1)
        logq = model(ids).logits[0, where].double().log_softmax(-1)
        kl_sum += float((logp.exp() * (logp - logq)).sum())
        same += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        count += len(answer)
    return {"kl_nats_per_token": kl_sum / max(count, 1), "argmax_agreement": same / max(count, 1), "tokens": count}


def evaluate(name: str, path: str, args, prompts: list[str], checks: list[dict]) -> dict:
    """Every quality and speed measurement of one model."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt_ids = encode(tokenizer, prompts)
    held = prompt_ids[: args.num]
    res: dict = {"name": name, "path": path}
    runs = [("hf", 0, 0)] + [("jacobi", n, 1) for n in args.jacobi_n]
    runs += [("jacobi-adaptive", max(args.jacobi_n), 1)] if args.adaptive else []
    runs += [("refine", n, r) for n, r in args.refine]
    for method, n, r in tqdm(runs, desc=f"{name}: quality"):
        out = generate(model, tokenizer, held, method, n, r, args.batch, args.max_new_tokens)
        key = method if method == "hf" else f"{method} N={n}" + (f" R={r}" if method == "refine" else "")
        res[key] = out
        if method != "hf":
            res[key]["vs_greedy"] = agreement(out["outputs"], res["hf"]["outputs"])
    check_ids = encode(tokenizer, [c["prompt"] for c in checks])
    out = generate(model, tokenizer, check_ids, "hf", 0, 0, args.check_batch, args.check_max_new_tokens)
    answers = [tokenizer.decode(o, skip_special_tokens=True) for o in out["outputs"]]
    right = [is_answer(a, c["answers"]) for a, c in zip(answers, checks)]
    families = sorted({c["family"] for c in checks})
    res["checkable"] = {
        "accuracy": sum(right) / max(len(right), 1),
        "num": len(right),
        "by_family": {f: sum(ok for ok, c in zip(right, checks) if c["family"] == f) for f in families},
        "answers": answers,
    }
    general = generate(model, tokenizer, prompt_ids[args.num :], "hf", 0, 0, args.batch, args.max_new_tokens)
    res["general"] = [tokenizer.decode(o, skip_special_tokens=True) for o in general["outputs"]]
    return res


def measure_speed(name: str, path: str, args, prompts: list[str]) -> dict:
    """Tokens/s at batch 1 of HF ``generate``, jacobi (adaptive and fixed N=7) and refine N=7 R=2."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    speed, res = encode(tokenizer, prompts[: args.speed_prompts]), {}
    methods = [("hf", 0, 0), ("jacobi-adaptive", 7, 1), ("jacobi", 7, 1), ("refine", 7, 2)]
    for method, n, r in tqdm(methods, desc=f"{name}: batch-1 speed"):
        out = generate(model, tokenizer, speed, method, n, r, 1, args.max_new_tokens)
        res["hf" if method == "hf" else f"{method} N={n}" + (f" R={r}" if method == "refine" else "")] = out
    return {k: v["tokens_per_s"] for k, v in res.items()}


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
        args=["fit", "--config", args.train_config, "--model.pretrained", args.base,
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
        "--train-config", args.train_config,
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    marks = {step: t for step, t in json.loads(probe.read_text())}  # last batch of each optimizer step
    steps = sorted(marks)
    per_step = (marks[steps[-1]] - marks[steps[0]]) / max(len(steps) - 1, 1)
    return {"seconds_per_step": per_step, "peak_rss_gib": peak, "steps": len(steps), "config": args.train_config}


def report(results: dict, args) -> str:
    base, models = results["base"], results["distilled"]
    names = ["base", *models]
    every = {"base": base, **models}
    head = f"| | {' | '.join(names)} |"
    rule = "|---|" + "---:|" * len(names)

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(every[n]) for n in names) + " |"

    lines = [
        f"# SmolLM2-135M-Instruct: base vs self-distilled ({args.num} held-out prompts, {args.max_new_tokens} new "
        f"tokens max; {results['base']['checkable']['num']} checkable questions; {args.threads} thread(s))",
        "",
        head,
        rule,
        row("KL(base ‖ model), nats per token, teacher-forced on base answers",
            lambda r: f"{r['teacher_forced']['kl_nats_per_token']:.4f}"),
        row("teacher-forced argmax = base argmax", lambda r: f"{r['teacher_forced']['argmax_agreement']:.1%}"),
        row("checkable-question accuracy", lambda r: f"{r['checkable']['accuracy']:.1%}"),
        row(f"greedy = base greedy: exact / first {PREFIX} tokens",
            lambda r: f"{r['vs_base']['exact']:.0%} / {r['vs_base']['prefix']:.0%}"),
    ]  # fmt: skip
    for k in [k for k in base if k.startswith(("jacobi", "refine"))]:
        lines.append(row(f"{k}: TPF (= own greedy: exact / first {PREFIX})",
                         lambda r, k=k: f"{r[k]['tpf']:.3f} ({r[k]['vs_greedy']['exact']:.0%} / "
                                        f"{r[k]['vs_greedy']['prefix']:.0%})"))  # fmt: skip
    if "speed" in base:
        for k in base["speed"]:
            speed = lambda r, k=k: f"{r['speed'][k]:.1f} ({r['speed'][k] / r['speed']['hf']:.2f}x)"  # noqa: E731
            lines.append(row(f"batch 1: {k}, tokens/s (x HF)", speed))
    families = list(base["checkable"]["by_family"])
    lines += ["", "Checkable questions right, by family:", "", f"| family | {' | '.join(names)} |", rule]
    lines += [row(f, lambda r, f=f: str(r["checkable"]["by_family"][f])) for f in families]
    if "training" in results:
        t = results["training"]
        lines += ["", f"Training ({t['config']}): {t['seconds_per_step']:.1f} s per optimizer step "
                  f"(mean of {t['steps'] - 1}), peak RSS {t['peak_rss_gib']:.1f} GiB."]  # fmt: skip
    lines += ["", "General chat prompts (greedy, first 160 characters):", ""]
    for i, p in enumerate(GENERAL_PROMPTS):
        lines += [f"- **{p}**"] + [f"  - {n}: {every[n]['general'][i][:160]!r}" for n in names]
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = {"base": results["base"], **results["distilled"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, res in every.items():
        jac = sorted((int(k.split("N=")[1]), v["tpf"]) for k, v in res.items() if k.startswith("jacobi N="))
        left.plot([n for n, _ in jac], [t for _, t in jac], "--" if name == "base" else "-", marker="o", label=name)
    left.set(xlabel="N (draft tokens)", ylabel="tokens per forward", title="jacobi (lossless), held-out prompts")
    left.legend(fontsize=7)
    metrics = {
        "checkable accuracy": lambda r: r["checkable"]["accuracy"],
        f"first {PREFIX} = base": lambda r: r["vs_base"]["prefix"],
        "TF argmax = base": lambda r: r["teacher_forced"]["argmax_agreement"],
    }
    width = 0.8 / len(every)
    for i, (name, res) in enumerate(every.items()):
        right.bar([j + i * width for j in range(len(metrics))], [f(res) for f in metrics.values()], width, label=name)
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], list(metrics), fontsize=8)
    right.set(ylim=(0, 1), title="answers that stay the model's")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def cached_evaluate(label: str, path: str, args, prompts: list[str], checks: list[dict], out_dir: Path) -> dict:
    """``evaluate``, reused from ``out_dir/cache/<label>.json`` when measured with the same settings.

    So models can be measured one at a time (or in parallel processes) and reported together.
    """
    keys = ("num", "seed", "max_new_tokens", "batch", "jacobi_n", "adaptive", "refine",
            "check_num", "check_max_new_tokens", "check_batch", "threads")  # fmt: skip
    settings = json.loads(json.dumps({"path": path, **{k: getattr(args, k) for k in keys}}))
    cache = out_dir / "cache" / f"{label}.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if all(cached["settings"].get(k) == v for k, v in settings.items()):  # keys that no longer matter aside
            print(f"{label}: results reused from {cache}", file=sys.stderr)
            return cached["results"]
    res = evaluate(label, path, args, prompts, checks)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"settings": settings, "results": res}))
    return res


def teacher_forced_report(base: dict, models: dict[str, str], args, prompts: list[str], out_dir: Path) -> int:
    """``--teacher-forced-only``: KL(base || model) and argmax agreement of each model, printed and in JSON."""
    from transformers import AutoModelForCausalLM

    held = encode(load_tokenizer(args.base), prompts[: args.num])
    base_model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    results = {}
    for label, path in tqdm(models.items(), desc="teacher-forced"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results[label] = teacher_forced(base_model, model, held, base["hf"]["outputs"])
    lines = [
        "| model | KL(base ‖ model), nats per token | teacher-forced argmax = base argmax | tokens |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {k} | {v['kl_nats_per_token']:.4f} | {v['argmax_agreement']:.1%} | {v['tokens']} |"
              for k, v in results.items()]  # fmt: skip
    (out_dir / "teacher_forced.json").write_text(json.dumps(results, indent=1))
    plot_teacher_forced(results, out_dir / "teacher_forced.png")
    print("\n".join(lines))
    return 0


def plot_teacher_forced(results: dict, out: Path) -> None:
    """KL and argmax agreement of each model, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(labels, [results[k]["kl_nats_per_token"] for k in labels])
    left.axhline(0.05, color="gray", linestyle="--", label="target 0.05")
    left.set(ylabel="nats per token", title="KL(base || model), teacher-forced")
    left.legend(fontsize=7)
    right.bar(labels, [results[k]["argmax_agreement"] for k in labels])
    low = min([0.8] + [results[k]["argmax_agreement"] - 0.05 for k in labels])
    right.set(ylim=(max(low, 0.0), 1.0), title="teacher-forced argmax = base argmax")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="models/smollm2-135m", help="HF folder of the base model")
    parser.add_argument("--distilled", nargs="+", default=["runs/smollm2-135m/hf"], help="HF folders to compare")
    parser.add_argument("--labels", nargs="+", help="names of the distilled models (default: their folders)")
    parser.add_argument("--train-file", default="data/distill-answers.jsonl", help="training data for the step timing")
    parser.add_argument("--train-config", default=str(ROOT / "configs/smollm2-135m.yaml"), help="config timed")
    parser.add_argument("--num", type=int, default=32, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--check-num", type=int, default=120, help="held-out checkable questions")
    parser.add_argument("--check-max-new-tokens", type=int, default=64, help="answer budget of a checkable question")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the quality runs")
    parser.add_argument("--check-batch", type=int, default=50, help="batch size of the checkable questions")
    parser.add_argument("--speed-prompts", type=int, default=4, help="prompts timed at batch 1 (0 = skip)")
    parser.add_argument("--jacobi-n", type=int, nargs="+", default=[3, 7, 15])
    parser.add_argument("--adaptive", type=int, default=1, help="1 = also jacobi with the adaptive draft")
    parser.add_argument("--refine", default="7x2", help="refine N x R settings, comma-separated ('' = none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (same for every method)")
    parser.add_argument("--train-steps", type=int, default=4, help="steps of the training timing (0 = skip)")
    parser.add_argument(
        "--teacher-forced-only",
        action="store_true",
        help="distilled models: only KL and argmax agreement on the base answers (minutes, not an hour)",
    )
    parser.add_argument("--out-dir", default="bench/results/real")
    parser.add_argument("--_train-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._train_probe:
        train_probe(args)
        return 0
    args.refine = [tuple(int(x) for x in s.split("x")) for s in args.refine.split(",") if s]
    labels = args.labels or args.distilled
    if len(labels) != len(args.distilled):
        parser.error(f"--labels: {len(labels)} names for {len(args.distilled)} --distilled folders")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [r["prompt"] for r in make_prompts("test", args.num, seed=args.seed)] + GENERAL_PROMPTS
    checks = checkable_prompts("test", args.check_num, seed=args.seed)
    results: dict = {"settings": {k: v for k, v in vars(args).items() if not k.startswith(("_", "probe"))}}
    if args.train_steps > 0:
        results["training"] = measure_training(args, out_dir)
    results["base"] = cached_evaluate("base", args.base, args, prompts, checks, out_dir)
    if args.teacher_forced_only:
        return teacher_forced_report(results["base"], dict(zip(labels, args.distilled)), args, prompts, out_dir)
    results["distilled"] = {
        label: cached_evaluate(label, path, args, prompts, checks, out_dir)
        for label, path in zip(labels, args.distilled)
    }
    if args.speed_prompts > 0:  # timings are never cached
        for res in [results["base"], *results["distilled"].values()]:
            res["speed"] = measure_speed(res["name"], res["path"], args, prompts)
    from transformers import AutoModelForCausalLM

    held = encode(load_tokenizer(args.base), prompts[: args.num])
    base_answers, base_model = results["base"]["hf"]["outputs"], None
    for label, res in [("base", results["base"]), *results["distilled"].items()]:
        if "teacher_forced" not in res:  # cached with the model's results (it depends on the base answers only)
            base_model = base_model or AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
            model = AutoModelForCausalLM.from_pretrained(res["path"], dtype=torch.float32).eval()
            res["teacher_forced"] = teacher_forced(base_model, model, held, base_answers)
            cache = json.loads((out_dir / "cache" / f"{label}.json").read_text())
            (out_dir / "cache" / f"{label}.json").write_text(json.dumps({**cache, "results": res}))
        res["vs_base"] = agreement(res["hf"]["outputs"], base_answers)
    text = report(results, args)
    (out_dir / "real.md").write_text(text)
    plot(results, out_dir / "real.png")
    for res in [results["base"], *results["distilled"].values()]:  # token lists are bulky: keep decoded answers
        tok = load_tokenizer(res["path"])
        res["greedy_answers"] = [tok.decode(o, skip_special_tokens=True) for o in res["hf"]["outputs"]]
        for v in res.values():
            if isinstance(v, dict):
                v.pop("outputs", None)
    (out_dir / "real.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
