"""``recurrence``: a running computation where every written term uses the two terms before it.

Why: it is the hard case for writing several tokens per forward pass. Term ``k`` is
``f(k) = (f(k-2) + f(k-1) + c) mod 10``, so the final answer depends on every term before it
and a term cannot be known before the previous one is. It still stays learnable by a model of
well under a million parameters, because each line needs only values at a fixed distance back
(the previous line's last operand and result, and ``c``) and a one-digit sum: there is no lookup
by position into the prompt, which earlier candidates that stayed flat at the format-only loss
(running sums over a prompt list, chains mod 100) needed; that this was their obstacle is our
guess. ``c`` and the term count vary per problem, which gives
``10 * 10 * 10 * (max_terms - min_terms + 1)`` distinct prompts to split.

Format (defaults: ``f3`` up to ``f5``..``f10``)::

    prompt:   "f1=3 f2=5 c=7 f6=?"
    response: "f3=3+5+7=15\\nf4=5+5+7=17\\nf5=5+7+7=19\\nf6=7+9+7=23\\nanswer: 3"

Each line is ``fk=a+b+c=ds``: the two previous terms, ``c``, and their two-digit sum; the new
term is the last digit ``s``. The answer is the last term.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dllm.tasks.base import Example, Task, format_answer


@dataclass(frozen=True)
class RecurrenceTask(Task):
    """Write ``f(3)..f(n)`` of ``f(k) = f(k-2) + f(k-1) + c (mod 10)``, ``n`` drawn from ``[min_terms, max_terms]``."""

    min_terms: int = 5
    max_terms: int = 10
    name: str = "recurrence"

    def __post_init__(self) -> None:
        if not 3 <= self.min_terms <= self.max_terms <= 99:
            raise ValueError(f"need 3 <= min_terms <= max_terms <= 99, got {self.min_terms}, {self.max_terms}")

    def make(self, rng: random.Random) -> Example:
        """Draw the two first terms, ``c`` and the last index, and write every step."""
        first, second, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
        last = rng.randint(self.min_terms, self.max_terms)
        terms = [first, second]
        lines = []
        for k in range(3, last + 1):
            a, b = terms[-2], terms[-1]
            total = a + b + c
            lines.append(f"f{k}={a}+{b}+{c}={total:02d}")
            terms.append(total % 10)
        answer = str(terms[-1])
        lines.append(format_answer(answer))
        prompt = f"f1={first} f2={second} c={c} f{last}=?"
        return Example(prompt=prompt, response="\n".join(lines), answer=answer, task=self.name)
