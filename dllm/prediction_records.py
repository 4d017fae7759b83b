"""One record per generated prompt: what ``DLLMModule`` predicts and validates on, and the helpers it uses.

``generate_records`` runs ``iterative_generate`` on a batch of prompts and turns the output into the records
predict.py writes (docs/method.md, section 9); ``is_correct`` grades a record for validation's exact match.
Apart from ``dllm.module`` so the LightningModule holds only what Lightning calls, and this (no Lightning state:
a model, a tokenizer, the settings) reads on its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import torch
from lightning.pytorch.utilities import rank_zero_info

from dllm.distributed import forwards_are_collective
from dllm.generation import iterative_generate
from dllm.generation.settings import GenerationSettings
from dllm.tasks import TASKS, check_answer


def generate_records(
    model: torch.nn.Module,
    tokenizer,
    generation: GenerationSettings,
    stop_ids: list[int],
    batch: dict,
    *,
    device: torch.device,
    strategy=None,
    **overrides,
) -> list[dict]:
    """Generate for ``batch["prompt_ids"]`` and return one record per prompt.

    A record is the input record's extra fields (``batch["extra"]``, from a prompts file), then
    ``id``, ``prompt``, ``response`` (generated), ``reference`` (when the input has one),
    ``new_tokens``, ``finish_reason``, ``forwards``, ``settings`` and ``response_ids`` (the
    generated token ids of ``response``: the stop token is in neither).

    Args:
        model: the HF causal LM.
        tokenizer: its tokenizer (pad id, decoding, the trace).
        generation: the settings; ``overrides`` replace some of them for this call.
        stop_ids: the token ids that end a response (``stop_token_ids``).
        batch: a prompt batch of ``DLLMDataModule``.
        device: where the sampling generator lives (the module's device).
        strategy: the Lightning strategy, if any: whether every forward is a collective across ranks.
    """
    settings = {**asdict(generation), **overrides}
    seed, use_cache, trace = settings.pop("seed"), settings.pop("use_cache"), settings.pop("trace")
    out = iterative_generate(
        model,
        batch["prompt_ids"],
        batch["prompt_mask"],
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator(device=device).manual_seed(seed),
        sample_keys=[prompt_key(record_id) for record_id in batch["id"]],
        use_cache=use_cache,
        sync_ranks=forwards_are_collective(strategy),
        trace=TracePrinter(tokenizer, batch["id"][0]) if trace else None,
        return_dict=True,
        **settings,
    )
    width = batch["prompt_ids"].size(1)
    # the input record's own fields come first and its reference (when it has one) after the response
    extras = batch.get("extra") or [{}] * len(batch["id"])
    references = batch.get("reference") or [None] * len(batch["id"])
    records = []
    for i, record_id in enumerate(batch["id"]):
        n = int(out.new_tokens[i])
        tokens = out.sequences[i, width : width + n].tolist()
        if out.finish_reason[i] == "eos":
            tokens = tokens[:-1]  # the stop token is not part of the response text
        record = {
            **extras[i],
            "id": record_id,
            "prompt": batch["prompt"][i],
            "response": tokenizer.decode(tokens, skip_special_tokens=False),
        }
        if references[i] is not None:
            record["reference"] = references[i]
        record.update(
            new_tokens=n,
            finish_reason=out.finish_reason[i],
            forwards=int(out.forwards[i]),
            settings={**settings, "seed": seed, "use_cache": use_cache},
            response_ids=tokens,
        )
        records.append(record)
    return records


def stop_token_ids(tokenizer) -> list[int]:
    """EOS first (it is the placeholder), then other end-of-turn ids the tokenizer knows."""
    ids = [tokenizer.eos_token_id]
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def is_correct(record: dict, batch: dict, i: int) -> bool:
    """Exact match: the task's answer checker when there is one, else the whole response."""
    if batch.get("task") and batch["task"][i] in TASKS and batch["answer"][i] is not None:
        return check_answer(batch["task"][i], record["response"], batch["answer"][i])
    return record["response"].strip() == batch["reference"][i].strip()


def prompt_key(record_id: str) -> int:
    """A stable 63-bit key of a prompt's id: it keys the prompt's sampling noise (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(str(record_id).encode(), digest_size=8).digest(), "little") >> 1


class TracePrinter:
    """Prints ``iterative_generate``'s trace of one prompt, decoded with the tokenizer, one line per position.

    ``refine block 2 round 1`` then, per block position, the token (``*`` when it changed since the
    previous round) and the top-3 candidates with probabilities; jacobi forwards also show how many
    draft tokens the forward confirmed.
    """

    def __init__(self, tokenizer, record_id: str):
        self.tokenizer = tokenizer
        self.record_id = record_id

    def _token(self, token_id: int) -> str:
        return repr(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def __call__(self, step) -> None:
        head = f"[trace {self.record_id}] {step.mode} "
        head += f"block {step.block} round {step.round}" if step.mode == "refine" else f"forward {step.block}"
        if step.accepted is not None:
            head += f": {step.accepted} of {len(step.draft)} draft tokens confirmed"
        lines = [head]
        columns = zip(step.tokens, step.changed, step.top_ids, step.top_probs)
        for pos, (token, changed, ids, probs) in enumerate(columns):
            candidates = " | ".join(f"{self._token(i)} {p:.2f}" for i, p in zip(ids, probs))
            lines.append(f"  {pos:>3} {'*' if changed else ' '} {self._token(token):<12} top-3: {candidates}")
        rank_zero_info("\n".join(lines))
