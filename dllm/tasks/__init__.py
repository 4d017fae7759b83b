"""Deterministic, seeded synthetic reasoning tasks with answer checkers.

Each task (one module each) draws a prompt and a worked response ending in ``answer: <value>``.
``generate_examples`` turns tasks into records for training and evaluation:

- Deterministic: the same ``(tasks, split, num, seed)`` always gives the same records.
- Disjoint splits: a prompt's split is fixed by a hash of its text (``split_of``); samples whose
  hash lands in another split's buckets are rejected, so no prompt can be in two splits, whatever
  seeds or sizes were used.
- No duplicates within a split: a prompt already drawn is rejected. If a task's problem space is
  too small to give ``num`` distinct prompts (``MAX_MISSES`` rejections in a row), ``train`` falls
  back to allowing duplicates (still only prompts of the train split); ``val`` and ``test`` raise
  ``ValueError`` instead, since repeated test items would skew accuracy.

Run ``python -m dllm.tasks --help`` for the command line that writes JSONL.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from dllm.tasks.addition import AdditionTask
from dllm.tasks.base import ANSWER_PREFIX, Example, Task, extract_answer
from dllm.tasks.chain import ChainTask
from dllm.tasks.recurrence import RecurrenceTask
from dllm.tasks.reverse import ReverseTask

__all__ = [
    "ANSWER_PREFIX",
    "SPLIT_BUCKETS",
    "TASKS",
    "AdditionTask",
    "ChainTask",
    "Example",
    "RecurrenceTask",
    "ReverseTask",
    "Task",
    "check_answer",
    "extract_answer",
    "generate_examples",
    "get_task",
    "split_of",
]

Split = Literal["train", "val", "test"]

# Registry of the default task variants. Add a variant by registering another instance under its name,
# e.g. ``TASKS["chain10"] = ChainTask(num_letters=10, name="chain10")``.
# ``addition-small`` (1-2 digit operands) is the tiny CPU default's task: small enough to learn in minutes.
_DEFAULT_TASKS = (
    AdditionTask(),
    AdditionTask(min_digits=1, max_digits=2, name="addition-small"),
    ChainTask(),
    RecurrenceTask(),
    ReverseTask(),
)
TASKS: dict[str, Task] = {task.name: task for task in _DEFAULT_TASKS}

# Hash buckets (out of 100) owned by each split.
SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 90), "val": range(90, 95), "test": range(95, 100)}

# Rejections in a row after which the problem space counts as exhausted.
MAX_MISSES = 10_000


def get_task(name: str) -> Task:
    """Look up a registered task.

    Args:
        name: Task name, a key of ``TASKS``.

    Returns:
        The task.

    Raises:
        ValueError: If no task has that name; the message lists the known ones.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from the SHA-256 of its UTF-8 text.

    Args:
        prompt: The prompt text.

    Returns:
        ``"train"``, ``"val"`` or ``"test"``.
    """
    bucket = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16) % 100
    for split, buckets in SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    raise AssertionError(f"bucket {bucket} has no split")  # SPLIT_BUCKETS covers 0-99


def check_answer(task: str, response: str, answer: str) -> bool:
    """Grade a response with the named task's checker.

    Args:
        task: Task name.
        response: Model output without EOS.
        answer: Reference answer.

    Returns:
        True if the final ``answer:`` line of ``response`` equals ``answer``.
    """
    return get_task(task).check(response, answer)


def _weights(tasks: str | list[str] | dict[str, float]) -> list[tuple[str, float]]:
    """Normalise a task spec to sorted ``(name, weight)`` pairs, checking names and weights."""
    if isinstance(tasks, str):
        pairs = [(tasks, 1.0)]
    elif isinstance(tasks, dict):
        pairs = [(name, float(w)) for name, w in tasks.items()]
    else:
        pairs = [(name, 1.0) for name in tasks]
    if not pairs:
        raise ValueError("no tasks given")
    merged: dict[str, float] = {}
    for name, weight in pairs:
        get_task(name)
        if not weight > 0:
            raise ValueError(f"task {name!r} needs a positive weight, got {weight}")
        merged[name] = merged.get(name, 0.0) + weight
    return sorted(merged.items())


def generate_examples(
    tasks: str | list[str] | dict[str, float],
    split: Split,
    num: int,
    seed: int = 0,
) -> list[dict]:
    """Generate ``num`` records of the given task or task mix for one split.

    Args:
        tasks: A task name, a list of names (an equal-weight mix) or a dict of name to weight.
        split: ``"train"``, ``"val"`` or ``"test"``.
        num: Number of records.
        seed: Random seed.

    Returns:
        Records ``{"id", "prompt", "response", "answer", "task"}``; ``id`` looks like
        ``"addition-test-00012"`` (task, split, index in this list).

    Raises:
        ValueError: On an unknown task, bad split, negative ``num``, a non-positive weight, or when
            ``val``/``test`` cannot get ``num`` distinct prompts.
    """
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_BUCKETS)}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    pairs = _weights(tasks)
    names = [name for name, _ in pairs]
    weights = [weight for _, weight in pairs]
    spec = ",".join(f"{name}:{weight!r}" for name, weight in pairs)
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes and Python runs.
    rng = random.Random(f"dllm.tasks|{seed}|{split}|{spec}")

    records: list[dict] = []
    seen: set[str] = set()
    allow_duplicates = False
    misses = 0
    while len(records) < num:
        name = names[0] if len(names) == 1 else rng.choices(names, weights)[0]
        ex = TASKS[name].make(rng)
        if split_of(ex.prompt) != split or (ex.prompt in seen and not allow_duplicates):
            misses += 1
            if misses >= MAX_MISSES:
                if split != "train" or not records:
                    raise ValueError(
                        f"could not draw {num} distinct {split} prompts for {spec} "
                        f"(got {len(records)}); the problem space is too small"
                    )
                allow_duplicates = True  # train only: documented fallback for small problem spaces
                misses = 0
            continue
        misses = 0
        seen.add(ex.prompt)
        records.append(
            {
                "id": f"{ex.task}-{split}-{len(records):05d}",
                "prompt": ex.prompt,
                "response": ex.response,
                "answer": ex.answer,
                "task": ex.task,
            }
        )
    return records
