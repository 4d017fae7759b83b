"""``addition``: multi-digit addition with the carries written out, one digit column per line.

Why: it is the classic small-model reasoning task. Written column by column from the right, each
line needs only two prompt digits and the carry from the line before, so the answer is learnable
step by step, while the carry chain makes later lines depend on earlier ones.

Format (every sum is written with two digits, so all lines have the same width)::

    prompt:   "57+68="
    response: "7+8+0=15\\n5+6+1=12\\nanswer: 125"

Each line is ``a+b+c=ds`` for one column: digits ``a`` and ``b`` (``0`` where an operand is
shorter), carry-in ``c``, and the two-digit column sum ``ds`` (``d`` is the carry-out, ``s`` the
answer digit). The answer is the plain decimal sum.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dllm.tasks.base import Example, Task, format_answer


@dataclass(frozen=True)
class AdditionTask(Task):
    """Add two numbers whose digit counts are each drawn uniformly from ``[min_digits, max_digits]``."""

    min_digits: int = 2
    max_digits: int = 4
    name: str = "addition"

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def make(self, rng: random.Random) -> Example:
        """Draw two operands and write the column-by-column working."""
        a, b = self._operand(rng), self._operand(rng)
        xs, ys = str(a)[::-1], str(b)[::-1]
        lines = []
        carry = 0
        for i in range(max(len(xs), len(ys))):
            x = int(xs[i]) if i < len(xs) else 0
            y = int(ys[i]) if i < len(ys) else 0
            total = x + y + carry
            lines.append(f"{x}+{y}+{carry}={total:02d}")
            carry = total // 10
        answer = str(a + b)
        lines.append(format_answer(answer))
        return Example(prompt=f"{a}+{b}=", response="\n".join(lines), answer=answer, task=self.name)
