"""Evaluation of ``bench/quality.py``: decode the test prompts with each method and score the outputs.

:class:`Method` (HF ``generate``, refine, fixed or adaptive jacobi), :func:`methods` (the grid of a
:class:`~qualitybench.settings.Setup`), :func:`evaluate` (accuracy, TPF, tokens/s, agreement with AR) and
:func:`test_batches` (the test split as left-padded prompt batches).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics import MeanMetric, SumMetric

from dllm.data import DLLMDataModule
from dllm.module import DLLMModule
from dllm.tasks import check_answer, generate_examples
from qualitybench.settings import Setup


@dataclass
class Method:
    """One decoding setting: ``hf`` (HF generate), ``refine``, ``jacobi`` (fixed N) or ``adaptive`` jacobi."""

    mode: str
    n: int | None = None
    r: int | None = None
    sources: str | None = None  # jacobi's draft_sources; None: the library default

    @property
    def label(self) -> str:
        tail = f" sources={self.sources}" if self.sources else ""
        if self.mode == "hf":
            return "AR (HF generate)"
        if self.mode == "adaptive":
            return f"jacobi adaptive N<={self.n}{tail}"
        return f"refine N={self.n} R={self.r}" if self.mode == "refine" else f"jacobi N={self.n}{tail}"


def methods(setup: Setup) -> list[Method]:
    grid = [Method("hf")]
    grid += [Method("refine", n, r) for n in setup.refine_n for r in setup.refine_r]
    grid += [Method("jacobi", n) for n in setup.jacobi_n]
    # the model's own drafts alone beside the default sources: a source that costs forwards shows up
    n = max(setup.jacobi_n)
    return grid + [Method("jacobi", n, sources="none"), Method("adaptive", n), Method("adaptive", n, sources="none")]


def hf_generate(module: DLLMModule, batch: dict, max_new_tokens: int) -> list[dict]:
    """Greedy ``model.generate``: responses cut at the first stop id, one forward per token."""
    out = module.model.generate(
        input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], max_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=module.stop_ids, pad_token_id=module.tokenizer.pad_token_id,
    )  # fmt: skip
    records = []
    for row in out[:, batch["prompt_ids"].size(1) :].tolist():
        stop = next((j for j, t in enumerate(row) if t in module.stop_ids), None)
        tokens = row if stop is None else row[:stop]
        n = len(row) if stop is None else stop + 1
        records.append({"response": module.tokenizer.decode(tokens), "new_tokens": n, "forwards": n})
    return records


def generate(module: DLLMModule, method: Method, batch: dict, setup: Setup) -> list[dict]:
    if method.mode == "hf":
        return hf_generate(module, batch, setup.max_new_tokens)
    mode = "jacobi" if method.mode == "adaptive" else method.mode
    extra = {"adaptive_draft": method.mode == "adaptive"} if mode == "jacobi" else {}
    if method.sources:
        extra["draft_sources"] = method.sources
    return module.generate_records(
        batch, mode=mode, add_eos_length=method.n, refine_iter=method.r or 1, max_new_tokens=setup.max_new_tokens,
        max_length=4096, temperature=0.0, **extra,
    )  # fmt: skip


def evaluate(module: DLLMModule, method: Method, batches: list[dict], setup: Setup, reference: dict | None) -> dict:
    """Accuracy, TPF, tokens/s and agreement with AR over the test batches."""
    accuracy, same_as_ar = MeanMetric(), MeanMetric()
    tokens, forwards = SumMetric(), SumMetric()
    responses, seconds = {}, 0.0
    for batch in batches:
        start = time.perf_counter()
        with torch.no_grad():
            records = generate(module, method, batch, setup)
        seconds += time.perf_counter() - start
        for i, record in enumerate(records):
            accuracy.update(float(check_answer(batch["task"][i], record["response"], batch["answer"][i])))
            tokens.update(record["new_tokens"])
            forwards.update(record["forwards"])
            responses[batch["id"][i]] = record["response"]
            if reference is not None:
                same_as_ar.update(float(record["response"] == reference[batch["id"][i]]))
    total = float(tokens.compute())
    return {
        "method": method.label, "mode": method.mode, "N": method.n, "R": method.r, "sources": method.sources,
        "accuracy": float(accuracy.compute()), "tpf": total / float(forwards.compute()),
        "tokens_per_s": total / seconds, "seconds": seconds,
        "same_as_ar": float(same_as_ar.compute()) if reference is not None else 1.0, "responses": responses,
    }  # fmt: skip


def test_batches(setup: Setup, module: DLLMModule, out: Path, batch_size: int | None = None) -> list[dict]:
    """The test split as left-padded prompt batches, with each prompt's task and answer."""
    records = generate_examples(setup.task, "test", setup.num_test, seed=0)
    path = out / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    size = batch_size or setup.eval_batch
    data = DLLMDataModule(prompts_file=str(path), val_batch_size=size, tokenizer=module.tokenizer)
    data.setup("predict")
    by_id = {r["id"]: r for r in records}
    batches = []
    for batch in data.predict_dataloader():
        batch["task"] = [by_id[i]["task"] for i in batch["id"]]
        batch["answer"] = [by_id[i]["answer"] for i in batch["id"]]
        batches.append(batch)
    return batches
