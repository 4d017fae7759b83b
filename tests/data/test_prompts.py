"""Checkable questions: enough held-out ones, never trained on, with answers a checker can score."""

import json

import pytest

from dllm.data.prompts import CHECKABLE, checkable_prompts, is_answer, main, make_prompts
from dllm.tasks import split_of


def test_at_least_100_held_out_checkable_questions_of_every_family():
    records = checkable_prompts("test", 120)
    assert len({r["prompt"] for r in records}) == 120
    assert {r["family"] for r in records} == set(CHECKABLE)
    assert all(split_of(r["prompt"]) == "test" and r["answers"] for r in records)
    assert checkable_prompts("test", 120) == records  # deterministic
    train = {r["prompt"] for r in make_prompts("train", 400)} | {r["prompt"] for r in checkable_prompts("train", 400)}
    assert not train & {r["prompt"] for r in records}


def test_the_known_answers_are_right():
    by_prompt = {r["prompt"]: r["answers"] for r in checkable_prompts("train", 2000)}
    assert by_prompt.get("What is 40 plus 2?", ["42"]) == ["42"]
    for prompt, answers in by_prompt.items():
        if prompt.startswith("How many days are there in "):
            assert answers == [str(7 * int(prompt.split()[6]))]
        if prompt.startswith("What is") and " plus " in prompt:
            a, b = prompt.removeprefix("What is ").removesuffix("?").split(" plus ")
            assert answers == [str(int(a) + int(b))]
    assert by_prompt.get("What is the capital of France?", ["Paris"]) == ["Paris"]


@pytest.mark.parametrize(
    ("response", "answers", "right"),
    [
        ("The capital of Colombia is Bogotá.", ["Bogota"], True),  # accents
        ("PARIS is the capital.", ["Paris"], True),  # case
        ("There are 1,008 days in 144 weeks.", ["1008"], True),  # thousands separator
        ("12 + 34 = 46", ["46"], True),
        ("The answer is 112.", ["12"], False),  # a number inside another
        ("It is 12.5", ["12"], False),
        ("Limassol is a city in Cyprus.", ["Lima"], False),  # a word inside another
        ("They speak English and French.", ["Dutch", "French"], True),  # any accepted answer
        ("", ["42"], False),
    ],
)
def test_checker(response, answers, right):
    assert is_answer(response, answers) is right


def test_too_many_checkable_questions_is_an_error():
    with pytest.raises(ValueError, match="could not draw 100000 checkable test prompts"):
        checkable_prompts("test", 100_000)


def test_command_line_writes_checkable_records(tmp_path):
    out = tmp_path / "check.jsonl"
    assert main(["--split", "test", "--num", "7", "--checkable", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == checkable_prompts("test", 7)
