"""The timing harness of ``bench/generation.py``: one timed setting, how it runs and is timed, shared tables.

:class:`Config` (one setting), :class:`Result` (its measurements), :class:`Workload` (a model with its
prompts); :func:`generate_once` runs HF ``generate`` or :func:`dllm.iterative_generate`, :func:`measure`
times it (warm-up, then the best of ``repeats``), :func:`run_section` measures a section's configurations in
order; :func:`rows_of` and :func:`method_table` turn results into JSON rows and a markdown table;
:func:`environment` records what the numbers were measured on. The sections live beside it
(:mod:`genbench.tiny`, :mod:`genbench.real`, :mod:`genbench.grounded`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from dllm import iterative_generate  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SAMPLING = {"temperature": 0.7, "top_p": 0.9}
LOOKUP_TOKENS = 10  # HF prompt lookup's prompt_lookup_num_tokens


@dataclass
class Config:
    """One timed generation setting.

    Attributes:
        section: ``"methods"``, ``"cache"``, ``"sampling"`` or ``"real"``.
        method: ``"hf"``, ``"refine"`` or ``"jacobi"``.
        batch: rows generated together.
        new_tokens: generated tokens per row (the budget).
        n: ``add_eos_length`` (refine/jacobi), ``None`` for hf.
        r: ``refine_iter`` (refine), ``None`` otherwise.
        adaptive: jacobi's adaptive draft length (``None`` for other methods).
        use_cache: whether the KV cache is used.
        sampled: temperature 0.7, top-p 0.9 instead of greedy.
        sources: jacobi's ``draft_sources`` (``None``: the library default).
        lookup: hf with ``prompt_lookup_num_tokens`` (HF's prompt lookup decoding).
    """

    section: str
    method: str
    batch: int
    new_tokens: int
    n: int | None = None
    r: int | None = None
    adaptive: bool | None = None
    use_cache: bool = True
    sampled: bool = False
    sources: str | None = None
    lookup: bool = False

    @property
    def label(self) -> str:
        """A short name: ``hf``, ``refine N=7 R=2``, ``jacobi N=7 adaptive`` ..."""
        if self.method == "hf":
            return f"hf prompt lookup {LOOKUP_TOKENS}" if self.lookup else "hf"
        if self.method == "refine":
            return f"refine N={self.n} R={self.r}"
        label = f"jacobi N={self.n}" + (" adaptive" if self.adaptive else "")
        return label + (f" sources={self.sources}" if self.sources else "")


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
        matches_hf: the rows equal HF greedy's (real model; ``None`` elsewhere).
    """

    config: Config
    seconds: float
    all_seconds: list[float] = field(default_factory=list)
    generated_tokens: int = 0
    forwards: int = 0
    tokens_per_forward: float = 0.0
    tokens_per_s: float = 0.0
    full_budget: bool = True
    matches_hf: bool | None = None


@dataclass
class Workload:
    """A model with its prompts and stop id.

    Attributes:
        model: the causal LM (eval mode).
        stop_id: the stop (and placeholder) id.
        pad_id: the padding id.
        prompts: per batch size, ``(input_ids, attention_mask)`` (left-padded).
        name: what the model is.
        groups: per batch size, several such batches run one after another (the input-grounded
            prompts); ``None``: one batch, ``prompts``.
    """

    model: torch.nn.Module
    stop_id: int
    pad_id: int
    prompts: dict[int, tuple[torch.Tensor, torch.Tensor]]
    name: str
    groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None


# --- running ---------------------------------------------------------------------------


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
    """Wait for queued GPU work (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def generate_once(work: Workload, cfg: Config, first_only: bool = False) -> tuple[list[list[int]], int, float]:
    """Run one generation (every batch of ``work.groups`` in turn, when it has groups).

    Args:
        work: model, prompts and stop id.
        cfg: what to run.
        first_only: with groups, only the first batch (a warm-up).

    Returns:
        ``(rows, forwards, tokens_per_forward)``: each row's generated tokens (stop token
        included), the model calls, and generated tokens per forward per sequence.
    """
    if work.groups is None:
        return _generate_batch(work, cfg, *work.prompts[cfg.batch])
    rows, forwards, row_forwards = [], 0, 0.0
    for ids, mask in work.groups[cfg.batch][: 1 if first_only else None]:
        batch_rows, calls, per_forward = _generate_batch(work, cfg, ids, mask)
        rows += batch_rows
        forwards += calls
        row_forwards += sum(map(len, batch_rows)) / per_forward if per_forward else 0.0
    return rows, forwards, sum(map(len, rows)) / max(row_forwards, 1e-9)


def _generate_batch(work: Workload, cfg: Config, ids: torch.Tensor, mask: torch.Tensor):
    """One batch of :func:`generate_once`."""
    sampling = dict(SAMPLING) if cfg.sampled else {}
    width = ids.size(1)
    if cfg.method == "hf":
        counter = ForwardCounter(work.model)
        try:
            with torch.inference_mode():
                lookup = {"prompt_lookup_num_tokens": LOOKUP_TOKENS} if cfg.lookup else {}
                out = work.model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=cfg.sampled, max_new_tokens=cfg.new_tokens,
                    eos_token_id=work.stop_id, pad_token_id=work.pad_id, use_cache=cfg.use_cache, top_k=None,
                    **sampling, **lookup,
                )  # fmt: skip
        finally:
            counter.close()
        rows = []
        for row in out[:, width:].tolist():
            cut = row.index(work.stop_id) + 1 if work.stop_id in row else len(row)
            rows.append(row[:cut])
        return rows, counter.calls, sum(map(len, rows)) / max(ids.size(0) * counter.calls, 1)
    generator = torch.Generator(device=ids.device).manual_seed(0) if cfg.sampled else None
    out = iterative_generate(
        work.model, ids, mask, eos_token_id=work.stop_id, pad_token_id=work.pad_id, add_eos_length=cfg.n,
        refine_iter=cfg.r or 1, max_new_tokens=cfg.new_tokens, mode=cfg.method, use_cache=cfg.use_cache,
        adaptive_draft=bool(cfg.adaptive), generator=generator, return_dict=True, **sampling,
        **({"draft_sources": cfg.sources} if cfg.sources else {}),
    )  # fmt: skip
    rows = [out.sequences[i, width : width + int(n)].tolist() for i, n in enumerate(out.new_tokens)]
    return rows, out.num_forwards, out.tokens_per_forward


def measure(work: Workload, cfg: Config, repeats: int, device: str, reference=None) -> Result:
    """Warm up once, then time ``repeats`` runs of one configuration and keep the best.

    Args:
        work: model, prompts and stop id.
        cfg: what to run.
        repeats: timed runs.
        device: ``"cpu"`` or ``"cuda"``.
        reference: HF greedy's rows for the same batch (``matches_hf``), or ``None``.

    Returns:
        The measurements.
    """
    generate_once(work, cfg, first_only=True)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        rows, forwards, per_forward = generate_once(work, cfg)
        sync(device)
        times.append(time.perf_counter() - start)
    best = min(times)
    total = sum(len(r) for r in rows)
    return Result(
        config=cfg,
        seconds=best,
        all_seconds=times,
        generated_tokens=total,
        forwards=int(forwards),
        tokens_per_forward=per_forward,
        tokens_per_s=total / best,
        full_budget=all(len(r) == cfg.new_tokens for r in rows),
        matches_hf=None if reference is None else rows == reference,
    )


# --- tables ----------------------------------------------------------------------------


def rows_of(results: list[Result]) -> list[dict]:
    """JSON rows with the ratio to HF at the same section and batch size (and to greedy when sampled).

    Args:
        results: measurements.

    Returns:
        One dict per result.
    """
    hf = {(r.config.batch, r.config.sampled): r.tokens_per_s for r in results if r.config.label == "hf"}
    greedy = {(r.config.label, r.config.batch): r.seconds for r in results if not r.config.sampled}
    out = []
    for res in results:
        cfg = res.config
        row = {**asdict(cfg), "label": cfg.label, **{k: v for k, v in asdict(res).items() if k != "config"}}
        base = hf.get((cfg.batch, False))
        row["ratio_to_hf"] = res.tokens_per_s / base if base else None
        if cfg.method == "refine" and cfg.section == "methods":
            row["target_ratio"] = 0.8 * (cfg.n + 1) / cfg.r
        if cfg.sampled:
            row["time_vs_greedy"] = res.seconds / greedy[(cfg.label, cfg.batch)]
        out.append(row)
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    """Format a number for a table cell, ``-`` for ``None``."""
    return "-" if value is None else f"{value:.{digits}f}"


def method_table(rows: list[dict], real: bool = False) -> str:
    """Markdown table of a method comparison (tiny or real model).

    Args:
        rows: from :func:`rows_of`.
        real: add the ``= HF`` column (lossless check).

    Returns:
        The table.
    """
    head = "| batch | method | forwards | tok/fwd | seconds | tok/s | x HF |" + (" = HF |" if real else "")
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|" + ("---|" if real else "")]
    for r in rows:
        short = "" if r["full_budget"] or real else " (short)"
        line = (
            f"| {r['batch']} | {r['label']}{short} | {r['forwards']} | {_fmt(r['tokens_per_forward'])} "
            f"| {_fmt(r['seconds'], 3)} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['ratio_to_hf'])} |"
        )
        if real:
            line += " - |" if r["matches_hf"] is None else (" yes |" if r["matches_hf"] else " NO |")
        lines.append(line)
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict:
    """What the numbers were measured on: device, dtype, versions, threads, settings."""
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    return {
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "sampling": SAMPLING,
        "batch_sizes": args.batch_sizes,
        "repeats": args.repeats,
        "seed": args.seed,
        "quick": args.quick,
        "argv": sys.argv[1:],
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_section(work: Workload, configs: list[Config], args: argparse.Namespace, desc: str) -> list[Result]:
    """Measure the configurations in order (HF greedy first per batch: the reference for ``matches_hf``)."""
    results, reference = [], {}
    for cfg in tqdm(configs, desc=desc, unit="cfg"):
        checked = cfg.section in ("real", "chat", "grounded")
        ref = reference.get(cfg.batch) if checked and cfg.label != "hf" else None
        res = measure(work, cfg, args.repeats, args.device, ref)
        if checked and cfg.label == "hf":
            reference[cfg.batch] = generate_once(work, cfg)[0]
        results.append(res)
    return results
