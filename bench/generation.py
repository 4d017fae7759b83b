"""Speed of block-EOS generation against Hugging Face greedy ``generate``.

What it measures, on a tiny randomly initialised ``Qwen2ForCausalLM`` (seeded;
scale it with ``--hidden-size``, ``--layers``, ``--vocab-size``):

1. Method comparison, at batch 1 and batch 8, with a fixed budget of
   ``--new-tokens`` generated tokens per row after a random prompt of
   ``--prompt-length`` tokens:

   - ``hf``: ``model.generate(do_sample=False)``, one token per forward;
   - ``refine``: ``dllm.iterative_generate(mode="refine")`` for
     N (``add_eos_length``) in {3, 7, 15} and R (``refine_iter``) in {1, 2, 3};
   - ``jacobi``: ``dllm.iterative_generate(mode="jacobi")`` for N in {3, 7, 15}.

   For each: wall time, tokens/s (generated tokens of all rows per second),
   tokens per forward (per sequence), model forwards, and the ratio to HF
   generate's tokens/s at the same batch size. For refine the table also shows
   the target ``0.8 x (N+1)/R x HF`` and whether it is met.

2. Cache scaling: refine N=7 R=2 at batch 1 with ``use_cache=True`` and
   ``use_cache=False`` at 128, 512 and 1,024 new tokens. With the cache a
   forward reads only the new columns, so the cost grows about linearly with
   the length; without it every forward re-reads the whole sequence, so the
   cost grows about quadratically. The table prints the speedup
   cached/uncached and each time relative to the shortest length.

The stop id is the last vocabulary id, and its ``lm_head`` row is set to the
mean of the other rows: its logit is then the mean of the other logits, never
above their maximum, and ``argmax`` returns the first maximal index, so the
random model never emits it. Every method therefore generates the full budget
(checked, and recorded as ``full_budget`` in the JSON). Each configuration is
run once untimed as a warm-up, then ``--repeats`` times; the best time counts.
Times come from ``time.perf_counter`` (after ``torch.cuda.synchronize`` on cuda).

Both tables are printed as markdown and all measurements go to ``--out`` as
JSON, with the device, dtype, torch/transformers versions and thread count.

Run it on CPU (from the repository root)::

    python bench/generation.py --device cpu --dtype float32 --threads 2

A smoke run of a few seconds::

    python bench/generation.py --quick --out /tmp/generation.json

On a GPU::

    python bench/generation.py --device cuda --dtype bfloat16 --hidden-size 1024 --layers 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dllm import iterative_generate  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Config:
    """One timed generation setting.

    Attributes:
        method: ``"hf"``, ``"refine"`` or ``"jacobi"``.
        batch: rows generated together.
        new_tokens: generated tokens per row (the budget).
        n: ``add_eos_length`` (refine/jacobi), ``None`` for hf.
        r: ``refine_iter`` (refine), ``None`` otherwise.
        use_cache: whether the KV cache is used.
    """

    method: str
    batch: int
    new_tokens: int
    n: int | None = None
    r: int | None = None
    use_cache: bool = True


@dataclass
class Result:
    """Measurements of one :class:`Config`.

    Attributes:
        config: what was run.
        seconds: best wall time over the repeats.
        all_seconds: wall time of every repeat.
        generated_tokens: generated tokens of all rows.
        forwards: model calls for the whole batch.
        tokens_per_forward: generated tokens per forward, per sequence.
        tokens_per_s: ``generated_tokens / seconds``.
        full_budget: every row generated exactly ``new_tokens`` tokens.
    """

    config: Config
    seconds: float
    all_seconds: list[float] = field(default_factory=list)
    generated_tokens: int = 0
    forwards: int = 0
    tokens_per_forward: float = 0.0
    tokens_per_s: float = 0.0
    full_budget: bool = True


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
    p.add_argument("--hidden-size", type=int, default=128, help="model hidden size (default: 128)")
    p.add_argument("--layers", type=int, default=4, help="number of transformer layers (default: 4)")
    p.add_argument("--vocab-size", type=int, default=384, help="vocabulary size (default: 384)")
    p.add_argument("--new-tokens", type=int, default=256, help="generated tokens per row (default: 256)")
    p.add_argument("--prompt-length", type=int, default=32, help="random prompt length (default: 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument(
        "--cache-lengths",
        type=int,
        nargs="+",
        default=[128, 512, 1024],
        help="new-token budgets of the cached vs uncached comparison (default: 128 512 1024)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration; the best counts (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and prompts (default: 0)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 32 new tokens, prompt 16, N=3 only, cache lengths 32 64, 1 thread unless --threads",
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


def block_sizes(quick: bool) -> tuple[list[int], list[int]]:
    """The N and R values to sweep.

    Args:
        quick: use the smoke configuration.

    Returns:
        ``(ns, rs)``: ``add_eos_length`` and ``refine_iter`` values.
    """
    return ([3], [1, 2, 3]) if quick else ([3, 7, 15], [1, 2, 3])


def method_configs(batch_sizes: list[int], new_tokens: int, quick: bool) -> list[Config]:
    """Configurations of the method comparison: hf, refine (N x R) and jacobi (N), per batch size.

    Args:
        batch_sizes: batch sizes to run.
        new_tokens: generated tokens per row.
        quick: use the smoke configuration.

    Returns:
        The configurations, hf first within each batch size.
    """
    ns, rs = block_sizes(quick)
    configs = []
    for batch in batch_sizes:
        configs.append(Config("hf", batch, new_tokens))
        configs += [Config("refine", batch, new_tokens, n, r) for n in ns for r in rs]
        configs += [Config("jacobi", batch, new_tokens, n) for n in ns]
    return configs


def cache_configs(lengths: list[int]) -> list[Config]:
    """Configurations of the cache scaling: refine N=7 R=2, batch 1, cached and uncached.

    Args:
        lengths: new-token budgets.

    Returns:
        The configurations, cached before uncached at each length.
    """
    return [Config("refine", 1, length, 7, 2, use_cache) for length in lengths for use_cache in (True, False)]


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    """A seeded random Qwen2 model whose last vocabulary id is never generated.

    Args:
        args: the parsed options (model size, dtype, device, seed).

    Returns:
        ``(model, stop_id)``: the model in eval mode, and the id used as EOS.
    """
    torch.manual_seed(args.seed)
    heads = 4
    config = Qwen2Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    stop_id = args.vocab_size - 1
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[stop_id] = weight[:stop_id].mean(0)  # its logit is the mean of the others: never the argmax
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    model.generation_config.eos_token_id = stop_id
    model.generation_config.pad_token_id = stop_id
    return model, stop_id


def make_prompts(batch: int, length: int, vocab: int, stop_id: int, seed: int, device: str) -> torch.Tensor:
    """Random prompts ``[batch, length]`` that never contain the stop id.

    Args:
        batch: rows.
        length: tokens per row.
        vocab: vocabulary size.
        stop_id: the id to leave out (the last one).
        seed: generator seed.
        device: where to put the tensor.

    Returns:
        The prompt ids.
    """
    gen = torch.Generator().manual_seed(seed + batch)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    ids[ids == stop_id] = 0
    return ids.to(device)


class ForwardCounter:
    """Counts calls of a module's ``forward`` with a pre-hook."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_) -> None:
        self.calls += 1

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on CPU).

    Args:
        device: ``"cpu"`` or ``"cuda"``.
    """
    if device == "cuda":
        torch.cuda.synchronize()


def generate_once(model, ids: torch.Tensor, cfg: Config, stop_id: int) -> tuple[torch.Tensor, int, float]:
    """Run one generation.

    Args:
        model: the causal LM.
        ids: prompts ``[B, W]``.
        cfg: what to run.
        stop_id: EOS / pad id.

    Returns:
        ``(new_tokens_per_row, forwards, tokens_per_forward)``.
    """
    mask = torch.ones_like(ids)
    if cfg.method == "hf":
        counter = ForwardCounter(model)
        try:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=cfg.new_tokens,
                    eos_token_id=stop_id,
                    pad_token_id=stop_id,
                    use_cache=cfg.use_cache,
                )
        finally:
            counter.close()
        generated = out[:, ids.size(1) :]
        new_tokens = (generated != stop_id).sum(-1).cpu()
        return new_tokens, counter.calls, new_tokens.float().mean().item() / max(counter.calls, 1)
    out = iterative_generate(
        model,
        ids,
        mask,
        eos_token_id=stop_id,
        pad_token_id=stop_id,
        add_eos_length=cfg.n,
        refine_iter=cfg.r or 1,
        max_new_tokens=cfg.new_tokens,
        mode=cfg.method,
        use_cache=cfg.use_cache,
        return_dict=True,
    )
    return out.new_tokens, out.num_forwards, out.tokens_per_forward


def measure(model, cfg: Config, args: argparse.Namespace, stop_id: int) -> Result:
    """Warm up once, then time ``args.repeats`` runs of one configuration and keep the best.

    Args:
        model: the causal LM.
        cfg: what to run.
        args: the parsed options (prompt length, seed, device, repeats).
        stop_id: EOS / pad id.

    Returns:
        The measurements.
    """
    ids = make_prompts(cfg.batch, args.prompt_length, args.vocab_size, stop_id, args.seed, args.device)
    generate_once(model, ids, cfg, stop_id)  # warm-up
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        new_tokens, forwards, tpf = generate_once(model, ids, cfg, stop_id)
        sync(args.device)
        times.append(time.perf_counter() - start)
    best = min(times)
    total = int(new_tokens.sum())
    return Result(
        config=cfg,
        seconds=best,
        all_seconds=times,
        generated_tokens=total,
        forwards=int(forwards),
        tokens_per_forward=float(tpf),
        tokens_per_s=total / best,
        full_budget=bool((new_tokens == cfg.new_tokens).all()),
    )


def target_ratio(cfg: Config) -> float | None:
    """The issue's refine target as a multiple of HF tokens/s: ``0.8 x (N+1)/R``.

    Args:
        cfg: a configuration.

    Returns:
        The target ratio for refine, ``None`` for other methods.
    """
    return 0.8 * (cfg.n + 1) / cfg.r if cfg.method == "refine" else None


def method_rows(results: list[Result]) -> list[dict]:
    """Flatten method-comparison results into JSON rows with ratios to HF at the same batch size.

    Args:
        results: measurements of :func:`method_configs`.

    Returns:
        One dict per result.
    """
    hf = {r.config.batch: r.tokens_per_s for r in results if r.config.method == "hf"}
    rows = []
    for res in results:
        cfg = res.config
        ratio = res.tokens_per_s / hf[cfg.batch] if cfg.batch in hf else None
        target = target_ratio(cfg)
        row = {**asdict(cfg), **{k: v for k, v in asdict(res).items() if k != "config"}}
        row.update(
            ratio_to_hf=ratio,
            target_ratio=target,
            target_met=None if target is None or ratio is None else ratio >= target,
        )
        rows.append(row)
    return rows


def cache_rows(results: list[Result]) -> list[dict]:
    """Pair cached and uncached results per length, with the speedup and growth vs the shortest length.

    Args:
        results: measurements of :func:`cache_configs`.

    Returns:
        One dict per length: ``new_tokens``, ``cached``, ``uncached``, ``speedup``,
        ``cached_growth``, ``uncached_growth`` (time / time at the shortest length).
    """
    by_length: dict[int, dict[bool, Result]] = {}
    for res in results:
        by_length.setdefault(res.config.new_tokens, {})[res.config.use_cache] = res
    lengths = sorted(by_length)
    first = by_length[lengths[0]]
    rows = []
    for length in lengths:
        cached, uncached = by_length[length][True], by_length[length][False]
        rows.append(
            {
                "new_tokens": length,
                "cached": {k: v for k, v in asdict(cached).items() if k != "config"},
                "uncached": {k: v for k, v in asdict(uncached).items() if k != "config"},
                "speedup": uncached.seconds / cached.seconds,
                "cached_growth": cached.seconds / first[True].seconds,
                "uncached_growth": uncached.seconds / first[False].seconds,
            }
        )
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    """Format a number for a table cell, ``-`` for ``None``."""
    return "-" if value is None else f"{value:.{digits}f}"


def method_table(rows: list[dict]) -> str:
    """Markdown table of the method comparison.

    Args:
        rows: from :func:`method_rows`.

    Returns:
        The table.
    """
    lines = [
        "| batch | method | N | R | forwards | tok/fwd | seconds | tok/s | x HF | target x HF | met |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        met = "-" if r["target_met"] is None else ("yes" if r["target_met"] else "no")
        budget = "" if r["full_budget"] else " (short)"
        lines.append(
            f"| {r['batch']} | {r['method']}{budget} | {r['n'] if r['n'] is not None else '-'} "
            f"| {r['r'] if r['r'] is not None else '-'} | {r['forwards']} | {_fmt(r['tokens_per_forward'])} "
            f"| {_fmt(r['seconds'], 3)} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['ratio_to_hf'])} "
            f"| {_fmt(r['target_ratio'])} | {met} |"
        )
    return "\n".join(lines)


def cache_table(rows: list[dict]) -> str:
    """Markdown table of the cache scaling.

    Args:
        rows: from :func:`cache_rows`.

    Returns:
        The table.
    """
    lines = [
        "| new tokens | cached s | uncached s | cached tok/s | uncached tok/s | speedup cached/uncached "
        "| cached time growth | uncached time growth |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, u = r["cached"], r["uncached"]
        lines.append(
            f"| {r['new_tokens']} | {_fmt(c['seconds'], 3)} | {_fmt(u['seconds'], 3)} | {_fmt(c['tokens_per_s'], 1)} "
            f"| {_fmt(u['tokens_per_s'], 1)} | {_fmt(r['speedup'])}x | {_fmt(r['cached_growth'])}x "
            f"| {_fmt(r['uncached_growth'])}x |"
        )
    return "\n".join(lines)


def environment(args: argparse.Namespace, model: torch.nn.Module, stop_id: int) -> dict:
    """What the numbers were measured on.

    Args:
        args: the parsed options.
        model: the benchmarked model.
        stop_id: the EOS id.

    Returns:
        Device, dtype, versions, threads, model shape and run settings.
    """
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    return {
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": {
            "class": type(model).__name__,
            "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size,
            "intermediate_size": 3 * args.hidden_size,
            "layers": args.layers,
            "heads": 4,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "eos_token_id": stop_id,
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "batch_sizes": args.batch_sizes,
        "cache_lengths": args.cache_lengths,
        "repeats": args.repeats,
        "seed": args.seed,
        "quick": args.quick,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink the run to the smoke configuration when ``--quick`` is given.

    Args:
        args: the parsed options, changed in place.
    """
    if args.quick:
        args.new_tokens, args.prompt_length, args.cache_lengths, args.repeats = 32, 16, [32, 64], 1
        args.threads = args.threads or 1  # a tiny model gains nothing from threads on a shared CPU


def main(argv: list[str] | None = None) -> dict:
    """Run both benchmarks, print the tables and write the JSON.

    Args:
        argv: command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        Everything written to ``--out``.
    """
    args = parse_args(argv)
    apply_quick(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, stop_id = build_model(args)
    configs = method_configs(args.batch_sizes, args.new_tokens, args.quick) + cache_configs(args.cache_lengths)
    results = [measure(model, cfg, args, stop_id) for cfg in tqdm(configs, desc="configurations", unit="cfg")]
    n_methods = len(configs) - 2 * len(args.cache_lengths)
    report = {
        "environment": environment(args, model, stop_id),
        "methods": method_rows(results[:n_methods]),
        "cache_scaling": cache_rows(results[n_methods:]),
    }
    env = report["environment"]
    print(
        f"\n## Methods ({env['device']} {env['device_name']}, {env['dtype']}, threads={env['threads']}, "
        f"prompt {args.prompt_length}, {args.new_tokens} new tokens per row)\n"
    )
    print(method_table(report["methods"]))
    print("\n## Cache scaling (refine N=7 R=2, batch 1)\n")
    print(cache_table(report["cache_scaling"]))
    if not all(r["full_budget"] for r in report["methods"]):
        print("\nwarning: some runs stopped before the budget; their tokens/s are not comparable", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
