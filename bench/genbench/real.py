"""Section 4 of ``bench/generation.py``: a real model (HF folder or ``.gguf``) on eight chat prompts.

Its configurations (HF, adaptive jacobi, fixed jacobi N=3 and 7, refine N=7 R=2), where the model is found
(:func:`find_real_model`) and how it is loaded with left-padded chat prompts (:func:`real_workload`, also
used by the input-grounded and chat sections, which run every prompt of their list at each batch size).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genbench.harness import DTYPES, Config, Workload

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


def real_configs(batch_sizes: list[int], new_tokens: int) -> list[Config]:
    """HF, adaptive jacobi, fixed jacobi N=3 and 7, refine N=7 R=2 on the real model."""
    configs = []
    for batch in batch_sizes:
        configs.append(Config("real", "hf", batch, new_tokens))
        configs.append(Config("real", "jacobi", batch, new_tokens, 7, adaptive=True))
        configs += [Config("real", "jacobi", batch, new_tokens, n, adaptive=False) for n in (3, 7)]
        configs.append(Config("real", "refine", batch, new_tokens, 7, 2))
    return configs


def chat_configs(batch_sizes: list[int], new_tokens: int) -> list[Config]:
    """All eight chat prompts at each batch size: HF, and jacobi as a user runs it (adaptive, N=15, the default
    sources) and with the model's own drafts only. Issue 22's floor: the default never below 0.95x HF here."""
    configs = []
    for batch in batch_sizes:
        configs.append(Config("chat", "hf", batch, new_tokens))
        configs += [Config("chat", "jacobi", batch, new_tokens, 15, adaptive=True, sources=s) for s in ("all", "none")]
    return configs


def find_real_model(path: Path | None) -> Path | None:
    """The real model to benchmark: ``path``, else ``models/smollm2-135m`` if present, else ``None``."""
    if path is not None:
        return path
    return DEFAULT_REAL if (DEFAULT_REAL / "config.json").exists() else None


def real_workload(
    path: Path, args: argparse.Namespace, batch_sizes: list[int], every: list[str] | None = None
) -> Workload:
    """Load a real model (HF folder or ``.gguf``) and chat prompts, left-padded.

    Args:
        path: the folder or GGUF file.
        args: the parsed options (device, dtype).
        batch_sizes: batch sizes to make prompts for (the first ``b`` of :data:`REAL_PROMPTS`).
        every: prompts to run all of at every batch size, in consecutive batches of up to ``b`` (the
            input-grounded section's :data:`GROUNDED_PROMPTS`, the chat section's :data:`REAL_PROMPTS`);
            ``None``: one batch of the first ``b`` of :data:`REAL_PROMPTS`.

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
        if every is not None:
            groups[batch] = [encode(every[i : i + batch]) for i in range(0, len(every), batch)]
            prompts[batch] = groups[batch][0]
        else:
            prompts[batch] = encode((REAL_PROMPTS * 8)[:batch])
    stop = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = f"{path} ({type(model).__name__}, {params:.1f}M parameters, vocabulary {model.config.vocab_size})"
    return Workload(model, stop, pad, prompts, name, groups if every is not None else None)
