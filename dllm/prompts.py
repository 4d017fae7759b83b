"""Seeded, varied chat prompts for self-distillation: no external data needed.

Self-distillation (as in CLLM and Jacobi Forcing) fine-tunes a model on its *own* greedy answers, so
what it writes stays its own while it learns to write blocks. It needs prompts only; this module
draws them from templates: instructions ("Write a haiku about the sea."), short questions ("What
is the capital of Peru?") and the embedded reasoning tasks of ``dllm.tasks`` rendered as chat.

- Deterministic: the same ``(split, num, seed)`` always gives the same prompts.
- Disjoint splits: a prompt's split is fixed by a hash of its text (``dllm.tasks.split_of``), so a
  held-out (``test``) prompt is never a training prompt, whatever seeds or sizes were used. Held-out
  prompts come from the same templates with other fillers: they measure in-distribution
  generalisation, not a new domain.

The recipe (README, docs/real.md): prompts, the base model's answers, fine-tune on them::

    python -m dllm.prompts --split train --num 400 --out data/distill-prompts.jsonl
    python -m dllm.prompts --split test --num 64 --out data/heldout-prompts.jsonl
"""

from __future__ import annotations

import argparse
import random
import sys

from dllm.records import write_jsonl
from dllm.tasks import SPLIT_BUCKETS, TASKS, split_of

TOPICS = [
    "the sea", "autumn", "a city at night", "friendship", "the moon", "a rainy day", "mountains", "coffee",
    "a lost key", "the first snow", "a quiet library", "a train journey", "the desert", "a garden", "time",
    "a lighthouse", "music", "an old photograph", "the stars", "a river", "childhood", "a busy market",
]  # fmt: skip
COUNTRIES = [
    "France", "Japan", "Brazil", "Canada", "Egypt", "Kenya", "Peru", "Norway", "India", "Mexico", "Italy",
    "Spain", "Germany", "Australia", "Argentina", "Chile", "Greece", "Turkey", "Thailand", "Vietnam",
    "Portugal", "Poland", "Ireland", "Sweden", "Morocco", "Nigeria", "China", "Indonesia", "Colombia", "Cuba",
]  # fmt: skip
CONCEPTS = [
    "photosynthesis", "gravity", "inflation", "democracy", "a black hole", "the water cycle", "evolution",
    "electricity", "a vaccine", "machine learning", "the internet", "a volcano", "an eclipse", "recycling",
    "compound interest", "a rainbow", "the immune system", "a computer program", "climate change", "tides",
    "an atom", "a budget", "the heart", "a map", "sound", "friction", "a battery", "a language", "a calendar",
]  # fmt: skip
ACTIVITIES = [
    "learning a new language", "running", "saving money", "sleeping well", "cooking at home", "reading more",
    "studying for an exam", "starting a garden", "working from home", "travelling on a budget", "meditation",
    "writing a story", "public speaking", "learning to swim", "keeping a journal", "making new friends",
    "drinking enough water", "playing chess", "taking photographs", "cycling to work", "learning the guitar",
]  # fmt: skip
THINGS = [
    "fruits", "colours", "animals that live in the ocean", "musical instruments", "planets", "board games",
    "vegetables", "sports", "programming languages", "kitchen tools", "birds", "trees", "famous painters",
    "jobs in a hospital", "things to pack for a trip", "ways to say hello", "breakfast foods", "flowers",
]  # fmt: skip
PAIRS = [
    ("a cat", "a dog"), ("weather", "climate"), ("a virus", "bacteria"), ("tea", "coffee"), ("a lake", "a sea"),
    ("a town", "a city"), ("speed", "velocity"), ("a poem", "a song"), ("a fruit", "a vegetable"),
    ("a star", "a planet"), ("saving", "investing"), ("a frog", "a toad"), ("a book", "a film"),
    ("rain", "snow"), ("a laptop", "a tablet"), ("a rabbit", "a hare"), ("walking", "running"),
]  # fmt: skip
PEOPLE = ["a friend", "a teacher", "a neighbour", "a colleague", "your manager", "a customer", "your landlord"]
REASONS = [
    "a meeting next week", "a late delivery", "a birthday party", "a broken heater", "a new project",
    "a thank-you for their help", "a change of plans", "a book you borrowed", "a team lunch",
]  # fmt: skip
CHARACTERS = [
    "a robot", "a young fox", "an old sailor", "a curious child", "a baker", "a dragon", "a lonely astronaut",
    "a clever mouse", "a detective", "a tired teacher", "a lost penguin", "a street musician",
]  # fmt: skip
EVENTS = [
    "finds a map", "learns to fly", "opens a shop", "makes a new friend", "gets lost in a forest",
    "wins a prize", "discovers a secret door", "plants a tree", "misses the last bus", "paints a picture",
]  # fmt: skip

INSTRUCTIONS = [
    ("Write a haiku about {topic}.", {"topic": TOPICS}),
    ("Write a short poem about {topic}.", {"topic": TOPICS}),
    ("Write a two-sentence story about {character} who {event}.", {"character": CHARACTERS, "event": EVENTS}),
    ("Write a short story about {character} who {event}.", {"character": CHARACTERS, "event": EVENTS}),
    ("Give three tips for {activity}.", {"activity": ACTIVITIES}),
    ("List five {things}.", {"things": THINGS}),
    ("Name three {things} and say one thing about each.", {"things": THINGS}),
    ("Explain {concept} in one sentence.", {"concept": CONCEPTS}),
    ("Explain {concept} to a ten-year-old.", {"concept": CONCEPTS}),
    ("Write a short email to {person} about {reason}.", {"person": PEOPLE, "reason": REASONS}),
    ("Describe {topic} in three sentences.", {"topic": TOPICS}),
    ("Summarize the benefits of {activity} in a few sentences.", {"activity": ACTIVITIES}),
    ("Write a product description for a new kind of {object}.", {"object": ["lamp", "backpack", "kettle", "chair",
     "umbrella", "watch", "bicycle", "notebook", "pillow", "toothbrush", "phone case", "water bottle"]}),
]  # fmt: skip
QUESTIONS = [
    ("What is the capital of {country}?", {"country": COUNTRIES}),
    ("What language is spoken in {country}?", {"country": COUNTRIES}),
    ("What is {concept}?", {"concept": CONCEPTS}),
    ("Why is {concept} important?", {"concept": CONCEPTS}),
    ("What is the difference between {pair}?", {"pair": [f"{a} and {b}" for a, b in PAIRS]}),
    ("How do I get started with {activity}?", {"activity": ACTIVITIES}),
    ("Is {activity} good for your health?", {"activity": ACTIVITIES}),
    ("What are some {things}?", {"things": THINGS}),
    ("What is {a} plus {b}?", {"a": [str(n) for n in range(2, 60)], "b": [str(n) for n in range(2, 60)]}),
    ("How many days are there in {n} weeks?", {"n": [str(n) for n in range(2, 30)]}),
]  # fmt: skip
# The embedded reasoning tasks as chat: an instruction that explains the format, then the task's prompt.
TASK_INSTRUCTIONS = {
    "addition": "Add the two numbers column by column and end with a line 'answer: <sum>'.",
    "addition-small": "Add the two numbers and end with a line 'answer: <sum>'.",
    "recurrence": "Each term is f(k) = f(k-2) + f(k-1) + c, keeping only the last digit. Find the asked term "
    "and end with a line 'answer: <digit>'.",
    "chain": "Each pair x>y maps a letter to the next one. Follow the mapping from the start letter for the "
    "given number of steps and end with a line 'answer: <letter>'.",
    "reverse": "Reverse the letters of the word and end with a line 'answer: <reversed word>'.",
}
KINDS = {"instruction": 0.45, "question": 0.35, "task": 0.2}
MAX_MISSES = 10_000


def _fill(rng: random.Random, template: str, fillers: dict[str, list[str]]) -> str:
    return template.format(**{key: rng.choice(values) for key, values in fillers.items()})


def draw_prompt(rng: random.Random) -> tuple[str, str]:
    """One ``(kind, prompt)`` drawn with ``rng``: an instruction, a short question or a reasoning task."""
    kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
    if kind == "task":
        name = rng.choice(sorted(TASK_INSTRUCTIONS))
        return kind, f"{TASK_INSTRUCTIONS[name]}\n\n{TASKS[name].make(rng).prompt}"
    template, fillers = rng.choice(INSTRUCTIONS if kind == "instruction" else QUESTIONS)
    return kind, _fill(rng, template, fillers)


def make_prompts(split: str, num: int, seed: int = 0) -> list[dict]:
    """``num`` distinct prompts of one split, as records ``{"id", "prompt", "kind"}``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (held out); splits never share a prompt.
        num: number of prompts.
        seed: random seed; the same arguments always give the same prompts.

    Raises:
        ValueError: on an unknown split, a negative ``num``, or more prompts than the split holds.
    """
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_BUCKETS)}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    rng = random.Random(f"dllm.prompts|{seed}|{split}")
    records: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(records) < num:
        kind, prompt = draw_prompt(rng)
        if prompt in seen or split_of(prompt) != split:
            misses += 1
            if misses >= MAX_MISSES:
                raise ValueError(f"could not draw {num} distinct {split} prompts (got {len(records)})")
            continue
        misses = 0
        seen.add(prompt)
        records.append({"id": f"{split}-{len(records):05d}", "prompt": prompt, "kind": kind})
    return records


def main(argv: list[str] | None = None) -> int:
    """Command line: write prompts as JSONL (``id``, ``prompt``, ``kind``), a valid ``data.prompts_file``."""
    parser = argparse.ArgumentParser(prog="python -m dllm.prompts", description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="train", choices=list(SPLIT_BUCKETS), help="test = held out")
    parser.add_argument("--num", type=int, default=400, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="-", help="output .jsonl path ('-' for stdout)")
    args = parser.parse_args(argv)
    try:
        records = make_prompts(args.split, args.num, args.seed)
    except ValueError as err:
        parser.error(str(err))
    write_jsonl(records, args.out, f"{len(records)} {args.split} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
