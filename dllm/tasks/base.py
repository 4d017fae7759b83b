"""Shared pieces of the synthetic tasks: the ``Example`` record, the ``Task`` base class and answer extraction.

Every task writes a worked response whose final line is ``answer: <value>``. Checking a model's output
only looks at that final line, so a model is graded on its answer, not on how it wrote the working.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ANSWER_PREFIX = "answer:"


@dataclass(frozen=True)
class Example:
    """One generated problem.

    Attributes:
        prompt: The text the model is conditioned on.
        response: The target text: the worked steps, then a final ``answer: <value>`` line (no EOS).
        answer: The bare final answer, as it appears after ``answer: ``.
        task: Name of the task that made it.
    """

    prompt: str
    response: str
    answer: str
    task: str


def extract_answer(response: str) -> str:
    """Return the final answer written on the last line of a response.

    The last non-empty line must start with ``answer:``; the rest of that line, stripped, is the answer.

    Args:
        response: Model output or reference response (without EOS).

    Returns:
        The answer text, or ``""`` when the last line is not an answer line.
    """
    lines = response.strip().splitlines()
    if not lines:
        return ""
    last = lines[-1].strip()
    if not last.startswith(ANSWER_PREFIX):
        return ""
    return last[len(ANSWER_PREFIX) :].strip()


def format_answer(value: str) -> str:
    """The canonical final line for ``value``."""
    return f"{ANSWER_PREFIX} {value}"


class Task:
    """Base class of a synthetic task. Subclasses set ``name`` and implement ``make``.

    Subclasses are frozen dataclasses whose fields are the task's knobs (digit counts, steps, ...),
    so a variant is just another instance, e.g. ``AdditionTask(min_digits=3, max_digits=3)``.
    """

    name: str = ""

    def make(self, rng: random.Random) -> Example:
        """Draw one example using only ``rng`` for randomness.

        Args:
            rng: The random source; the same state must give the same example.

        Returns:
            A new example.
        """
        raise NotImplementedError

    def check(self, response: str, answer: str) -> bool:
        """Whether ``response``'s final answer line equals ``answer`` exactly (after stripping whitespace).

        Args:
            response: Model output (or reference response) without EOS.
            answer: The reference answer.

        Returns:
            True if the extracted answer is non-empty and equal to ``answer``.
        """
        got = extract_answer(response)
        return got != "" and got == answer.strip()
