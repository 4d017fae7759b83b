"""Sections 1-3 of ``bench/generation.py``: the tiny random Qwen2 models.

``methods`` (hf, refine N x R, fixed and adaptive jacobi), ``cache_scaling`` (refine N=7 R=2 cached vs
uncached) and ``sampling`` (greedy vs temperature 0.7, top-p 0.9 on a 152,064-token vocabulary): their
configurations, the seeded model and prompts (:func:`tiny_workload`), and the cache and sampling tables.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from genbench.harness import DTYPES, Config, Result, Workload, _fmt


def method_configs(batch_sizes: list[int], new_tokens: int, quick: bool) -> list[Config]:
    """The method comparison: hf, refine (N x R), fixed and adaptive jacobi, per batch size.

    Args:
        batch_sizes: batch sizes to run.
        new_tokens: generated tokens per row.
        quick: use the smoke configuration.

    Returns:
        The configurations, hf first within each batch size.
    """
    ns, rs = ([3], [1, 2, 3]) if quick else ([3, 7, 15], [1, 2, 3])
    adaptive_ns = [3] if quick else [7, 15]
    configs = []
    for batch in batch_sizes:
        configs.append(Config("methods", "hf", batch, new_tokens))
        configs += [Config("methods", "refine", batch, new_tokens, n, r) for n in ns for r in rs]
        configs += [Config("methods", "jacobi", batch, new_tokens, n, adaptive=False) for n in ns]
        configs += [Config("methods", "jacobi", batch, new_tokens, n, adaptive=True) for n in adaptive_ns]
    return configs


def cache_configs(lengths: list[int]) -> list[Config]:
    """Refine N=7 R=2, batch 1, cached and uncached at each length."""
    return [Config("cache", "refine", 1, length, 7, 2, use_cache=use) for length in lengths for use in (True, False)]


def sampling_configs(batch_sizes: list[int], new_tokens: int) -> list[Config]:
    """Greedy then sampled, per method and batch size: one-token, adaptive jacobi, refine, hf."""
    configs = []
    for batch in batch_sizes:
        for method, n, r, adaptive in [("hf", None, None, None), ("jacobi", 0, None, True),
                                       ("jacobi", 7, None, True), ("refine", 7, 2, None)]:  # fmt: skip
            for sampled in (False, True):
                configs.append(Config("sampling", method, batch, new_tokens, n, r, adaptive, sampled=sampled))
    return configs


def tiny_workload(args: argparse.Namespace, vocab_size: int, batch_sizes: list[int]) -> Workload:
    """A seeded random Qwen2 whose last vocabulary id is never the argmax, with random prompts.

    Args:
        args: the parsed options (model size, dtype, device, seed, prompt length).
        vocab_size: the vocabulary size.
        batch_sizes: batch sizes to make prompts for.

    Returns:
        The workload.
    """
    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    stop_id = vocab_size - 1
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[stop_id] = weight[:stop_id].mean(0)  # its logit is the mean of the others: never the argmax
    model = model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    prompts = {}
    for batch in batch_sizes:
        gen = torch.Generator().manual_seed(args.seed + batch)
        ids = torch.randint(0, vocab_size, (batch, args.prompt_length), generator=gen)
        ids[ids == stop_id] = 0
        prompts[batch] = (ids.to(args.device), torch.ones_like(ids).to(args.device))
    name = f"Qwen2 hidden {args.hidden_size}, {args.layers} layers, vocabulary {vocab_size} (random)"
    return Workload(model, stop_id, stop_id, prompts, name)


def sampling_table(rows: list[dict]) -> str:
    """Markdown table: greedy vs sampled seconds per method and batch size."""
    lines = [
        "| batch | method | greedy s | sampled s | sampled / greedy | greedy tok/s | sampled tok/s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    greedy = {(r["label"], r["batch"]): r for r in rows if not r["sampled"]}
    for r in rows:
        if r["sampled"]:
            g = greedy[(r["label"], r["batch"])]
            lines.append(
                f"| {r['batch']} | {r['label']} | {_fmt(g['seconds'], 3)} | {_fmt(r['seconds'], 3)} "
                f"| {_fmt(r['time_vs_greedy'])}x | {_fmt(g['tokens_per_s'], 1)} | {_fmt(r['tokens_per_s'], 1)} |"
            )
    return "\n".join(lines)


def cache_rows(results: list[Result]) -> list[dict]:
    """Pair cached and uncached results per length, with the speedup and growth vs the shortest length."""
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


def cache_table(rows: list[dict]) -> str:
    """Markdown table of the cache scaling."""
    lines = [
        "| new tokens | cached s | uncached s | speedup cached/uncached | cached time growth | uncached time growth |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, u = r["cached"], r["uncached"]
        lines.append(
            f"| {r['new_tokens']} | {_fmt(c['seconds'], 3)} | {_fmt(u['seconds'], 3)} | {_fmt(r['speedup'])}x "
            f"| {_fmt(r['cached_growth'])}x | {_fmt(r['uncached_growth'])}x |"
        )
    return "\n".join(lines)
