"""``reverse``: write a short lowercase string backwards.

Why: a tiny, easy control task. Each output letter is a plain positional lookup in the prompt and
does not depend on the other output letters, so it should be solved even when many tokens are
written per forward pass; comparing against ``chain`` separates "the model is weak" from "the
decoding scheme struggles with sequential dependencies".

Format::

    prompt:   "reverse kqzt:"
    response: "answer: tzqk"
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from dllm.tasks.base import Example, Task, format_answer


@dataclass(frozen=True)
class ReverseTask(Task):
    """Reverse a random string of ``min_len``..``max_len`` lowercase letters."""

    min_len: int = 3
    max_len: int = 8
    name: str = "reverse"

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")

    def make(self, rng: random.Random) -> Example:
        """Draw a string and reverse it."""
        length = rng.randint(self.min_len, self.max_len)
        text = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        answer = text[::-1]
        return Example(prompt=f"reverse {text}:", response=format_answer(answer), answer=answer, task=self.name)
