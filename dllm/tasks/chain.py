"""``chain``: pointer chasing through a letter mapping, with every hop written out.

Why: it has long sequential dependencies that are still learnable by a tiny transformer. The
prompt lists a mapping ``x>y`` over a few letters, in shuffled order; the response follows it from
a start letter one hop at a time. Each hop is a content lookup in the prompt keyed by the letter the
previous hop produced (induction-head style, which small transformers learn readily), so a token
late in the response depends on every hop before it. That makes it the hard case for writing
several tokens per forward pass: a later hop cannot be guessed before the earlier ones are known.

The mapping is a single random cycle over the letters, so a walk never revisits a letter before
it has gone round all of them: there are no fixed points or short loops that would let the answer
be guessed without following the chain.

Format (defaults: 8 letters ``a``-``h``, 6 steps)::

    prompt:   "h>a e>h b>f g>d d>c c>b f>e a>g start b, 6 steps:"
    response: "b>f>e>h>a>g>d\\nanswer: d"
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from dllm.tasks.base import Example, Task, format_answer


@dataclass(frozen=True)
class ChainTask(Task):
    """Follow a random cyclic mapping over ``num_letters`` letters for ``min_steps``..``max_steps`` hops."""

    num_letters: int = 8
    min_steps: int = 6
    max_steps: int = 6
    name: str = "chain"

    def __post_init__(self) -> None:
        if not 2 <= self.num_letters <= 26:
            raise ValueError(f"num_letters must be in [2, 26], got {self.num_letters}")
        if not 1 <= self.min_steps <= self.max_steps <= 9:
            raise ValueError(f"need 1 <= min_steps <= max_steps <= 9, got {self.min_steps}, {self.max_steps}")

    def make(self, rng: random.Random) -> Example:
        """Draw a cyclic mapping, a start letter and a step count, and walk the chain."""
        letters = list(string.ascii_lowercase[: self.num_letters])
        # A random cyclic order of the letters; each maps to the next one in that order.
        order = letters[:]
        rng.shuffle(order)
        mapping = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
        # List the pairs in a shuffled order so a lookup has to match content, not position.
        keys = letters[:]
        rng.shuffle(keys)
        start = rng.choice(letters)
        steps = rng.randint(self.min_steps, self.max_steps)

        # The walk is written as one path, "d>b>h>...": every "x>" in it is followed by the same
        # letter as the pair "x>" in the prompt, a plain induction-style copy.
        path = [start]
        for _ in range(steps):
            path.append(mapping[path[-1]])
        listing = " ".join(f"{k}>{mapping[k]}" for k in keys)
        prompt = f"{listing} start {start}, {steps} steps:"
        response = ">".join(path) + "\n" + format_answer(path[-1])
        return Example(prompt=prompt, response=response, answer=path[-1], task=self.name)
