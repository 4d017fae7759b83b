"""Speed of block generation against Hugging Face ``generate``, greedy and sampled, tiny and real models.

Five sections, each timed in the same process (the ratios compare runs of one
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
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dllm import iterative_generate  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SAMPLING = {"temperature": 0.7, "top_p": 0.9}
DEFAULT_REAL = Path("models/smollm2-135m")
REAL_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue.",
    "Describe a sunset over the ocean.",
    "How do I bake bread at home?",
    "Write a poem about autumn leaves.",
    "Summarize the plot of Romeo and Juliet.",
    "What are the benefits of regular exercise?",
    "Tell me about the history of the bicycle.",
]

# answers that copy much of the prompt: rewrite, edit code, fix text, reformat data, answer from a passage
GROUNDED_PROMPTS = [
    # fix text
    "Fix the spelling mistakes in this sentence and write it out again: "
    '"The quick brwn fox jumpd over the lazzy dog and ran into the forrest."',
    # rewrite
    "Rewrite this paragraph in a formal tone:\n\n"
    "Hey team, the meeting got moved to Thursday at 3pm because the room was double booked. "
    "Please bring your laptops and the sales numbers from last quarter. If you can't make it, "
    "let Sarah know by Wednesday so she can send you the notes.",
    # edit code
    "Rename the variable `x` to `total` in this Python function and return the full function:\n\n"
    "def add_all(numbers):\n    x = 0\n    for n in numbers:\n        x = x + n\n    return x\n",
    # edit code: docstring
    "Add a docstring to this function and return the complete code:\n\n"
    "def is_prime(n):\n    if n < 2:\n        return False\n    for i in range(2, int(n ** 0.5) + 1):\n"
    "        if n % i == 0:\n            return False\n    return True\n",
    # reformat data
    "Convert this CSV to a JSON list of objects:\n\nname,age,city\nAlice,30,Paris\nBob,25,London\n"
    "Carol,41,Berlin\nDave,35,Madrid\n",
    # reformat list
    "Turn this comma-separated list into a numbered list, one item per line: "
    "apples, bananas, cherries, dates, elderberries, figs, grapes, honeydew melon",
    # answer from passage
    "Read the passage and answer the question.\n\nPassage: The Eiffel Tower is a wrought-iron lattice tower on "
    "the Champ de Mars in Paris, France. It is named after the engineer Gustave Eiffel, whose company designed "
    "and built the tower from 1887 to 1889. It was the entrance arch to the 1889 World's Fair.\n\n"
    "Question: Who is the Eiffel Tower named after, and when was it built?",
    # fix grammar email
    "Correct the grammar of this email and write the corrected email:\n\n"
    "Dear Mr. Smith,\n\nI am writing to informs you that the package have been delivered yesterday. "
    "We was very happy with the service and we will uses your company again.\n\nBest regards,\nAnna",
    # edit code: print to logging
    "Replace every print call with logging.info in this code and show the result:\n\n"
    'import logging\n\ndef process(items):\n    print("starting")\n    for item in items:\n'
    '        print("processing", item)\n    print("done")\n',
    # reformat: markdown table
    "Reformat this data as a markdown table with columns Country and Capital:\n\n"
    "France - Paris\nGermany - Berlin\nItaly - Rome\nSpain - Madrid\nPortugal - Lisbon\n",
    # answer from passage, longer
    "Answer using only the text below.\n\nText: Photosynthesis is the process by which green plants use sunlight "
    "to make food from carbon dioxide and water. It takes place mainly in the leaves, inside small structures "
    "called chloroplasts, which contain a green pigment called chlorophyll. The process releases oxygen as a "
    "by-product, which is why plants are so important for life on Earth.\n\n"
    "Question: Where does photosynthesis take place, and what does it release?",
    # rewrite: replace words
    'Repeat the following text, replacing every occurrence of "cat" with "dog":\n\n'
    "The cat sat on the mat. The cat was happy because the cat had eaten. Later the cat slept.",
    # edit code: add type hints
    "Add type hints to this function and return it:\n\n"
    "def greet(name, times):\n    result = []\n    for _ in range(times):\n"
    '        result.append("Hello, " + name)\n    return result\n',
    # fix text: capitalisation
    'Fix the capitalization of this text: "my name is john. i live in new york and i work at google."',
]
GROUNDED_SOURCES = ["all", "none", "ngram", "pool"]  # jacobi: defaults, then each source alone
GROUNDED_N = 15  # GenerationSettings' default add_eos_length
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
        default=["methods", "cache", "sampling", "real", "grounded"],
        help="what to run (default: all five)",
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
            args.sections = [s for s in args.sections if s not in ("real", "grounded")]


# --- configurations ---------------------------------------------------------------------


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


def real_configs(batch_sizes: list[int], new_tokens: int) -> list[Config]:
    """HF, adaptive jacobi, fixed jacobi N=3 and 7, refine N=7 R=2 on the real model."""
    configs = []
    for batch in batch_sizes:
        configs.append(Config("real", "hf", batch, new_tokens))
        configs.append(Config("real", "jacobi", batch, new_tokens, 7, adaptive=True))
        configs += [Config("real", "jacobi", batch, new_tokens, n, adaptive=False) for n in (3, 7)]
        configs.append(Config("real", "refine", batch, new_tokens, 7, 2))
    return configs


def grounded_configs(batch_sizes: list[int], new_tokens: int) -> list[Config]:
    """Input-grounded prompts: HF, HF prompt lookup (batch 1 only: HF refuses larger batches), adaptive jacobi
    with the default sources and with each source alone."""
    configs = []
    for batch in batch_sizes:
        configs.append(Config("grounded", "hf", batch, new_tokens))
        if batch == 1:
            configs.append(Config("grounded", "hf", batch, new_tokens, lookup=True))
        configs += [Config("grounded", "jacobi", batch, new_tokens, GROUNDED_N, adaptive=True, sources=s)
                    for s in GROUNDED_SOURCES]  # fmt: skip
    return configs


# --- models and prompts ------------------------------------------------------------------


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


def find_real_model(path: Path | None) -> Path | None:
    """The real model to benchmark: ``path``, else ``models/smollm2-135m`` if present, else ``None``."""
    if path is not None:
        return path
    return DEFAULT_REAL if (DEFAULT_REAL / "config.json").exists() else None


def real_workload(path: Path, args: argparse.Namespace, batch_sizes: list[int], grounded: bool = False) -> Workload:
    """Load a real model (HF folder or ``.gguf``) and chat prompts, left-padded.

    Args:
        path: the folder or GGUF file.
        args: the parsed options (device, dtype).
        batch_sizes: batch sizes to make prompts for (the first ``b`` of :data:`REAL_PROMPTS`).
        grounded: the input-grounded prompts instead (:data:`GROUNDED_PROMPTS`, all of them at every batch
            size, in consecutive batches of up to ``b``).

    Returns:
        The workload; the stop id is the model's EOS.
    """
    folder, extra = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[args.dtype], **extra).to(args.device).eval()

    def encode(questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            if tokenizer.chat_template
            else q
            for q in questions
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc.input_ids.to(args.device), enc.attention_mask.to(args.device)

    prompts, groups = {}, {}
    for batch in batch_sizes:
        if grounded:
            groups[batch] = [encode(GROUNDED_PROMPTS[i : i + batch]) for i in range(0, len(GROUNDED_PROMPTS), batch)]
            prompts[batch] = groups[batch][0]
        else:
            prompts[batch] = encode((REAL_PROMPTS * 8)[:batch])
    stop = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = f"{path} ({type(model).__name__}, {params:.1f}M parameters, vocabulary {model.config.vocab_size})"
    return Workload(model, stop, pad, prompts, name, groups if grounded else None)


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


def plot_grounded(rows: list[dict], path: Path) -> None:
    """Bar chart: tokens/s as a multiple of HF ``generate`` per method, batch 1 and 8, input-grounded prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mine = [r for r in rows if r["batch"] == batch]
        labels = [r["label"].replace("jacobi N=15 adaptive ", "jacobi ").replace("sources=", "") for r in mine]
        ratios = [r["ratio_to_hf"] for r in mine]
        colors = ["#888888" if r["method"] == "hf" else "#3b7dd8" for r in mine]
        ax.barh(labels[::-1], ratios[::-1], color=colors[::-1])
        ax.axvline(1.0, color="black", linewidth=0.8)
        for y, (value, r) in enumerate(zip(ratios[::-1], mine[::-1])):
            same = "" if r["matches_hf"] is None else (" =" if r["matches_hf"] else " DIFFERS")
            ax.text(value, y, f" {value:.2f}x{same}", va="center", fontsize=8)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("tokens/s / HF generate")
        ax.set_xlim(0, max(ratios) * 1.35)
    fig.suptitle("SmolLM2-135M, input-grounded prompts, CPU 1 thread (= : same tokens as HF greedy)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        checked = cfg.section in ("real", "grounded")
        ref = reference.get(cfg.batch) if checked and cfg.label != "hf" else None
        res = measure(work, cfg, args.repeats, args.device, ref)
        if checked and cfg.label == "hf":
            reference[cfg.batch] = generate_once(work, cfg)[0]
        results.append(res)
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the sections, print the tables and write the JSON.

    Args:
        argv: command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        Everything written to ``--out``.
    """
    args = parse_args(argv)
    if args.processes > 1:
        return spread(argv if argv is not None else sys.argv[1:], args)
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
    if "real" in args.sections:
        path = find_real_model(args.real_model)
        if path is None or not path.exists():
            print(
                f"\n## Real model: skipped: no model at {path or DEFAULT_REAL} "
                "(python -m dllm.models smollm2 --out models/smollm2-135m, or --real-model PATH)"
            )
        else:
            real = real_workload(path, args, args.batch_sizes)
            report["environment"]["real_model"] = real.name
            configs = real_configs(args.batch_sizes, args.real_new_tokens)
            report["real"] = rows_of(run_section(real, configs, args, "real"))
            print(f"\n## Real model: {real.name}, up to {args.real_new_tokens} new tokens, its own stop token\n")
            print(method_table(report["real"], real=True))
    if "grounded" in args.sections:
        path = find_real_model(args.real_model)
        if path is None or not path.exists():
            print(f"\n## Input-grounded: skipped: no model at {path or DEFAULT_REAL} (--real-model PATH)")
        else:
            real = real_workload(path, args, args.batch_sizes, grounded=True)
            report["environment"]["real_model"] = real.name
            configs = grounded_configs(args.batch_sizes, args.real_new_tokens)
            report["grounded"] = rows_of(run_section(real, configs, args, "grounded"))
            print(
                f"\n## Input-grounded: {real.name}, {len(GROUNDED_PROMPTS)} prompts, up to {args.real_new_tokens} new "
                "tokens, its own stop token (HF prompt lookup: batch 1 only; no assistant model offline)\n"
            )
            print(method_table(report["grounded"], real=True))
            if args.plot is not None:
                plot_grounded(report["grounded"], args.plot)
    env = report["environment"]
    print(f"\n{env['device']} {env['device_name']}, {env['dtype']}, threads={env['threads']}, best of {args.repeats}")
    if not all(r["full_budget"] for r in report.get("methods", [])):
        print("\nwarning: some runs stopped before the budget; their tokens/s are not comparable", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


def spread(argv: list[str], args: argparse.Namespace) -> dict:
    """Run the same command in ``args.processes`` fresh processes and report each configuration's spread.

    Forwards depend on the step times the adaptive policy measured (so on the
    machine's load), speed ratios on the load during each run: one process
    says little on a shared machine. Each run writes its own JSON beside
    ``--out`` (``.run<i>.json``); the spread goes to ``--out``.
    """
    import statistics
    import subprocess

    base = [a for i, a in enumerate(argv) if a != "--processes" and (i == 0 or argv[i - 1] != "--processes")]
    base = [a for a in base if not a.startswith("--processes=")]
    runs = []
    for i in range(args.processes):
        out = args.out.with_suffix(f".run{i}.json")
        rest = [a for j, a in enumerate(base) if a != "--out" and (j == 0 or base[j - 1] != "--out")]
        subprocess.run([sys.executable, __file__, *rest, "--out", str(out)], check=True)
        runs.append(json.loads(out.read_text()))
    rows = []
    for section in ("methods", "sampling", "real", "grounded"):
        keys = [(r["batch"], r["label"]) for r in runs[0].get(section, [])]
        for batch, label in keys:
            found = [r for run in runs for r in run.get(section, []) if (r["batch"], r["label"]) == (batch, label)]
            row = {"section": section, "batch": batch, "label": label, "runs": len(found)}
            for key in ("forwards", "ratio_to_hf"):
                values = [r[key] for r in found if r.get(key) is not None]
                if values:
                    row[key] = [min(values), statistics.median(values), max(values)]
            rows.append(row)
    lines = [
        "| section | batch | method | forwards min / median / max | x HF min / median / max | runs |",
        "|---|---:|---|---|---|---:|",
    ]
    for row in rows:
        fw, x = row.get("forwards"), row.get("ratio_to_hf")
        fw = f"{fw[0]} / {fw[1]:g} / {fw[2]}" if fw else "-"
        x = f"{x[0]:.2f} / {x[1]:.2f} / {x[2]:.2f}" if x else "-"
        lines.append(f"| {row['section']} | {row['batch']} | {row['label']} | {fw} | {x} | {row['runs']} |")
    print(f"\n## Spread over {args.processes} fresh processes\n\n" + "\n".join(lines))
    report = {"spread": rows, "processes": args.processes, "runs": [str(args.out.with_suffix(f".run{i}.json"))
                                                                    for i in range(args.processes)]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
