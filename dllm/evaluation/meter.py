"""Per task: the tokens generated, the forwards they took and the time, for ``dllm`` and for lm-eval's ``hf``.

lm-eval sends every ``generate_until`` request of a run (all tasks) in one call; ``per_task`` splits them by
task so that each task is timed alone. ``Meter`` keeps the counts; ``add_generation_metrics`` writes them
into lm-eval's results as metrics of each task, so they reach its printed table and its output files:

- ``tokens_per_forward``: generated tokens over the forwards each prompt took part in (a batch forward
  over 8 prompts counts 8): plain decoding makes 1.0, whatever the batch;
- ``forwards``: model calls (a batch forward counts once);
- ``tokens_per_s``: generated tokens over the wall-clock seconds of the task's generation (tokenizing,
  generating, decoding);
- ``generated_tokens`` and ``generate_seconds``, the totals behind them.

Generated tokens are counted up to where lm-eval's ``hf`` model would have stopped (``dllm.evaluation.stops``):
the text a task scores. ``instrument_hf`` counts the same for lm-eval's own ``hf`` model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lm_eval.models.huggingface import HFLM

from dllm.evaluation.stops import stop_point


@dataclass
class TaskCounts:
    """What one task's generation cost."""

    requests: int = 0
    generated_tokens: int = 0
    row_forwards: int = 0
    forwards: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, float | int]:
        return {
            "tokens_per_forward": self.generated_tokens / max(self.row_forwards, 1),
            "forwards": self.forwards,
            "tokens_per_s": self.generated_tokens / max(self.seconds, 1e-9),
            "generated_tokens": self.generated_tokens,
            "generate_seconds": self.seconds,
        }


# lm-eval's table marks these; the totals get no arrow
HIGHER_IS_BETTER = {"tokens_per_forward": True, "forwards": False, "tokens_per_s": True}


class Meter:
    """Counts per task; ``current`` is the task being generated."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskCounts] = {}
        self.current = TaskCounts()  # outside ``measure``: counted nowhere

    def reset(self) -> None:
        self.tasks = {}

    @contextmanager
    def measure(self, task: str, requests: int) -> Iterator[TaskCounts]:
        """Time a task's generation; what is counted inside goes to that task."""
        counts = self.tasks.setdefault(task, TaskCounts())
        counts.requests += requests
        previous, self.current = self.current, counts
        start = time.perf_counter()
        try:
            yield counts
        finally:
            counts.seconds += time.perf_counter() - start
            self.current = previous


METER = Meter()


def per_task(requests: list, generate: Callable[[list], list[str]]) -> list[str]:
    """Run ``generate`` on each task's requests (``Instance.task_name``) under ``METER``, in the given order."""
    by_task: dict[str | None, list[int]] = {}
    for index, request in enumerate(requests):
        by_task.setdefault(request.task_name, []).append(index)
    results: list[str | None] = [None] * len(requests)
    for task, indices in by_task.items():
        with METER.measure(str(task), len(indices)):
            outputs = generate([requests[i] for i in indices])
        for index, output in zip(indices, outputs):
            results[index] = output
    return results


def add_generation_metrics(results: dict, meter: Meter = METER) -> dict:
    """Add each measured task's generation metrics to lm-eval's ``results`` (in place) and return it."""
    for task, counts in meter.tasks.items():
        if task not in results.get("results", {}):
            continue
        results["results"][task].update({f"{name},none": value for name, value in counts.metrics().items()})
        results.setdefault("higher_is_better", {}).setdefault(task, {}).update(HIGHER_IS_BETTER)
    return results


def hf_stop_ids(lm: HFLM) -> list[int]:
    """The ids lm-eval's ``hf`` model stops at: the tokenizer's EOS (lm-eval stops on its text) and the
    ``eos_token_id`` of the model's generation config (``generate`` stops on those)."""
    ids = [lm.tokenizer.eos_token_id]
    config = getattr(lm.model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for token in [extra] if isinstance(extra, int) else list(extra or []):
        if token not in ids:
            ids.append(token)
    return ids


@contextmanager
def instrument_hf() -> Iterator[None]:
    """Count tokens, forwards and time per task for lm-eval's own ``hf`` model while inside.

    Wraps ``HFLM.generate_until`` (split per task) and ``HFLM._model_generate`` (a forward hook counts the
    model calls of ``generate``; each row's tokens are counted up to where it stopped, and plain decoding
    takes one forward per token). Subclasses that override ``generate_until`` (``dllm``) are unaffected.
    """
    generate_until, model_generate = HFLM.generate_until, HFLM._model_generate

    def metered_generate_until(self, requests, disable_tqdm: bool = False):
        return per_task(requests, lambda part: generate_until(self, part, disable_tqdm))

    def metered_model_generate(self, context, max_length, stop, **kwargs):
        calls = []
        hook = self.model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            out = model_generate(self, context, max_length, stop, **kwargs)
        finally:
            hook.remove()
        eos_ids = hf_stop_ids(self)
        counts = METER.current
        for row in out[:, context.shape[1] :].tolist():
            tokens = stop_point(row, stop, eos_ids, self.tokenizer) or len(row)
            counts.generated_tokens += tokens
            counts.row_forwards += tokens  # one token per forward
        counts.forwards += len(calls)
        return out

    HFLM.generate_until, HFLM._model_generate = metered_generate_until, metered_model_generate
    try:
        yield
    finally:
        HFLM.generate_until, HFLM._model_generate = generate_until, model_generate
