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

Checkable questions (``checkable_prompts``, ``--checkable``): the capital or language of a country, a sum,
the days in some weeks, the hours in some days, each with its known answers, so a model's answers can be
scored (``is_answer``: an answer contained in the response, case, accents and thousands separators aside), as
CLLM and Jacobi Forcing score accuracy. They share the split rule: the ``test`` ones are never trained on.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import unicodedata

from dllm.checks import check_output_file
from dllm.data.records import write_jsonl
from dllm.errors import UserError
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
# Checkable questions: country -> (capital, official or main languages); a response naming any one is right.
# Countries with a disputed or split capital (Bolivia, South Africa, Israel, Sri Lanka) are left out.
COUNTRY_FACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "France": (("Paris",), ("French",)), "Japan": (("Tokyo",), ("Japanese",)),
    "Brazil": (("Brasilia",), ("Portuguese",)), "Canada": (("Ottawa",), ("English", "French")),
    "Egypt": (("Cairo",), ("Arabic",)), "Kenya": (("Nairobi",), ("Swahili", "English")),
    "Peru": (("Lima",), ("Spanish",)), "Norway": (("Oslo",), ("Norwegian",)),
    "India": (("New Delhi",), ("Hindi", "English")), "Mexico": (("Mexico City",), ("Spanish",)),
    "Italy": (("Rome",), ("Italian",)), "Spain": (("Madrid",), ("Spanish",)),
    "Germany": (("Berlin",), ("German",)), "Australia": (("Canberra",), ("English",)),
    "Argentina": (("Buenos Aires",), ("Spanish",)), "Chile": (("Santiago",), ("Spanish",)),
    "Greece": (("Athens",), ("Greek",)), "Turkey": (("Ankara",), ("Turkish",)),
    "Thailand": (("Bangkok",), ("Thai",)), "Vietnam": (("Hanoi",), ("Vietnamese",)),
    "Portugal": (("Lisbon",), ("Portuguese",)), "Poland": (("Warsaw",), ("Polish",)),
    "Ireland": (("Dublin",), ("English", "Irish")), "Sweden": (("Stockholm",), ("Swedish",)),
    "Morocco": (("Rabat",), ("Arabic", "Berber", "Amazigh")), "Nigeria": (("Abuja",), ("English",)),
    "China": (("Beijing",), ("Chinese", "Mandarin")), "Indonesia": (("Jakarta",), ("Indonesian",)),
    "Colombia": (("Bogota",), ("Spanish",)), "Cuba": (("Havana",), ("Spanish",)),
    "Russia": (("Moscow",), ("Russian",)), "the Netherlands": (("Amsterdam",), ("Dutch",)),
    "Austria": (("Vienna",), ("German",)), "Denmark": (("Copenhagen",), ("Danish",)),
    "Finland": (("Helsinki",), ("Finnish", "Swedish")), "Hungary": (("Budapest",), ("Hungarian",)),
    "the Czech Republic": (("Prague",), ("Czech",)), "Romania": (("Bucharest",), ("Romanian",)),
    "Ukraine": (("Kyiv", "Kiev"), ("Ukrainian",)), "Iran": (("Tehran",), ("Persian", "Farsi")),
    "Iraq": (("Baghdad",), ("Arabic", "Kurdish")), "Saudi Arabia": (("Riyadh",), ("Arabic",)),
    "Pakistan": (("Islamabad",), ("Urdu", "English")), "Bangladesh": (("Dhaka",), ("Bengali", "Bangla")),
    "South Korea": (("Seoul",), ("Korean",)), "the Philippines": (("Manila",), ("Filipino", "Tagalog", "English")),
    "Malaysia": (("Kuala Lumpur",), ("Malay",)), "New Zealand": (("Wellington",), ("English", "Maori")),
    "Ethiopia": (("Addis Ababa",), ("Amharic",)), "Ghana": (("Accra",), ("English",)),
    "Venezuela": (("Caracas",), ("Spanish",)), "Ecuador": (("Quito",), ("Spanish",)),
    "Uruguay": (("Montevideo",), ("Spanish",)), "Iceland": (("Reykjavik",), ("Icelandic",)),
    "Croatia": (("Zagreb",), ("Croatian",)), "Serbia": (("Belgrade",), ("Serbian",)),
    "Bulgaria": (("Sofia",), ("Bulgarian",)), "Nepal": (("Kathmandu",), ("Nepali",)),
    "Jamaica": (("Kingston",), ("English",)), "Senegal": (("Dakar",), ("French", "Wolof")),
    "Afghanistan": (("Kabul",), ("Pashto", "Dari")), "Syria": (("Damascus",), ("Arabic",)),
    "Lebanon": (("Beirut",), ("Arabic",)), "Jordan": (("Amman",), ("Arabic",)),
    "Qatar": (("Doha",), ("Arabic",)), "Belgium": (("Brussels",), ("Dutch", "French", "German")),
}  # fmt: skip
# family -> (templates, every (fillers, answers) of the family); the first template of each family but the last
# two is one of QUESTIONS', so those held-out prompts are the distillation prompts' own kind.
CHECKABLE: dict[str, tuple[tuple[str, ...], list[tuple[dict[str, str], tuple[str, ...]]]]] = {
    "capital": (
        ("What is the capital of {country}?", "Which city is the capital of {country}?"),
        [({"country": c}, capitals) for c, (capitals, _) in COUNTRY_FACTS.items()],
    ),
    "language": (
        ("What language is spoken in {country}?", "What is the main language of {country}?"),
        [({"country": c}, languages) for c, (_, languages) in COUNTRY_FACTS.items()],
    ),
    "sum": (("What is {a} plus {b}?",), [({"a": str(a), "b": str(b)}, (str(a + b),))
                                          for a in range(2, 100) for b in range(2, 100)]),
    "weeks": (("How many days are there in {n} weeks?",), [({"n": str(n)}, (str(7 * n),)) for n in range(2, 300)]),
    "days": (("How many hours are there in {n} days?",), [({"n": str(n)}, (str(24 * n),)) for n in range(2, 300)]),
    "hours": (("How many minutes are there in {n} hours?",), [({"n": str(n)}, (str(60 * n),))
                                                             for n in range(2, 300)]),
}  # fmt: skip
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


def _check_split(split: str, num: int) -> None:
    """The arguments every draw takes: a known split and a non-negative count."""
    if split not in SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_BUCKETS)}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")


def make_prompts(split: str, num: int, seed: int = 0) -> list[dict]:
    """``num`` distinct prompts of one split, as records ``{"id", "prompt", "kind"}``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (held out); splits never share a prompt.
        num: number of prompts.
        seed: random seed; the same arguments always give the same prompts.

    Raises:
        ValueError: on an unknown split, a negative ``num``, or more prompts than the split holds.
    """
    _check_split(split, num)
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


def checkable_prompts(split: str, num: int, seed: int = 0) -> list[dict]:
    """``num`` distinct questions with known answers, as records ``{"id", "prompt", "kind", "family", "answers"}``.

    The families (capital, language, sum, weeks, days, hours) take turns, so every family is represented
    while it has prompts in the split; within a family the order is a seeded shuffle.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (held out); a prompt's split is the one ``make_prompts``
            gives it, so test questions are never among the training prompts.
        num: number of questions.
        seed: random seed of the order.

    Raises:
        ValueError: on an unknown split, a negative ``num``, or more questions than the split holds.
    """
    _check_split(split, num)
    rng = random.Random(f"dllm.prompts.checkable|{seed}|{split}")
    pools = []
    for family, (templates, cases) in CHECKABLE.items():
        pool = [(family, t.format(**fillers), answers) for t in templates for fillers, answers in cases]
        pool = [case for case in pool if split_of(case[1]) == split]
        rng.shuffle(pool)
        pools.append(pool)
    records: list[dict] = []
    while len(records) < num and any(pools):
        for pool in pools:
            if pool and len(records) < num:
                family, prompt, answers = pool.pop()
                records.append({"id": f"{split}-check-{len(records):05d}", "prompt": prompt, "kind": "checkable",
                                "family": family, "answers": list(answers)})  # fmt: skip
    if len(records) < num:
        raise ValueError(f"could not draw {num} checkable {split} prompts (the split holds {len(records)})")
    return records


def _normalize(text: str) -> str:
    """Lowercase, accents dropped (Bogotá -> bogota), thousands separators dropped (1,008 -> 1008)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def is_answer(response: str, answers: list[str]) -> bool:
    """Whether ``response`` contains one of ``answers`` as a whole word or number (normalized).

    "The capital of Peru is Lima." contains "Lima"; "112" does not contain the number 12, nor "Limassol" "Lima".
    """
    text = _normalize(response)
    for answer in answers:
        pattern = re.escape(_normalize(answer))
        if re.search(rf"(?<![\w.]){pattern}(?!\w|\.\d)", text):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Command line: write prompts as JSONL (``id``, ``prompt``, ``kind``), a valid ``data.prompts_file``."""
    parser = argparse.ArgumentParser(prog="python -m dllm.prompts", description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="train", choices=list(SPLIT_BUCKETS), help="test = held out")
    parser.add_argument("--num", type=int, default=400, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkable", action="store_true", help="questions with known answers (field answers)")
    parser.add_argument("--out", default="-", help="output .jsonl path ('-' for stdout)")
    args = parser.parse_args(argv)
    if args.out != "-":
        try:
            check_output_file(args.out, "--out", "prompts.jsonl")  # before drawing anything
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        records = (checkable_prompts if args.checkable else make_prompts)(args.split, args.num, args.seed)
    except ValueError as err:
        parser.error(str(err))
    what = "checkable " if args.checkable else ""
    write_jsonl(records, args.out, f"{len(records)} {what}{args.split} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
