"""Synthetic tasks: determinism, disjoint splits, checkers, mixing and the JSONL command line."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dllm.tasks import (
    TASKS,
    AdditionTask,
    ChainTask,
    check_answer,
    extract_answer,
    generate_examples,
    split_of,
)
from dllm.tasks.__main__ import parse_tasks

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(TASKS)
FIELDS = {"id", "prompt", "response", "answer", "task"}


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed(name):
    a = generate_examples(name, "train", 50, seed=1)
    assert a == generate_examples(name, "train", 50, seed=1)
    assert a != generate_examples(name, "train", 50, seed=2)
    assert all(set(r) == FIELDS and r["task"] == name for r in a)
    assert a[12]["id"] == f"{name}-train-00012"


@pytest.mark.parametrize("name", NAMES)
def test_splits_disjoint_and_distinct(name):
    prompts = {}
    for split, num in [("train", 2000), ("val", 200), ("test", 200)]:
        records = generate_examples(name, split, num, seed=0)
        prompts[split] = [r["prompt"] for r in records]
        assert len(set(prompts[split])) == num  # no duplicates within a split
        assert all(split_of(p) == split for p in prompts[split])
    # Different seeds still cannot leak test prompts into train.
    train_other_seed = {r["prompt"] for r in generate_examples(name, "train", 2000, seed=7)}
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not set(prompts[a]) & set(prompts[b])
    assert not train_other_seed & set(prompts["test"])


@pytest.mark.parametrize("name", NAMES)
def test_checker(name):
    for r in generate_examples(name, "val", 100, seed=3):
        resp, ans = r["response"], r["answer"]
        assert resp.splitlines()[-1] == f"answer: {ans}"
        assert extract_answer(resp) == ans
        assert check_answer(name, resp, ans)
        assert check_answer(name, resp + "\n", " " + ans + " ")  # whitespace is stripped
        body = resp.rsplit("\n", 1)[0] + "\n" if "\n" in resp else ""
        assert not check_answer(name, body + "answer: " + ans + "x", ans)  # wrong final answer
        assert not check_answer(name, body.strip(), ans)  # no answer line
        assert not check_answer(name, resp + "\nmore text", ans)  # answer line is not last
        assert not check_answer(name, "", ans)


def test_extract_answer():
    assert extract_answer("1+2+0=03\nanswer: 3") == "3"
    assert extract_answer("answer:   42  \n\n") == "42"
    assert extract_answer("the answer is 3") == ""
    assert extract_answer("answer: 3\nxyz") == ""


def test_addition_is_correct():
    task = AdditionTask(min_digits=1, max_digits=5)
    rng = random.Random(0)
    for _ in range(500):
        ex = task.make(rng)
        a, b = ex.prompt.rstrip("=").split("+")
        assert int(ex.answer) == int(a) + int(b)
    ex = task.make(random.Random(1))
    assert ex.prompt.endswith("=")
    assert generate_examples("addition", "train", 1)[0]["response"].count("\n") >= 2


class ScriptedRng(random.Random):
    """An rng whose randint returns scripted values, to pin an exact example."""

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def randint(self, a, b):
        value = self.values.pop(0)
        assert a <= value <= b
        return value


def test_addition_format():
    # digit count, operand, digit count, operand
    ex = AdditionTask().make(ScriptedRng([2, 57, 2, 68]))
    assert ex.prompt == "57+68="
    assert ex.response == "7+8+0=15\n5+6+1=12\nanswer: 125"
    assert ex.answer == "125"
    ex = AdditionTask().make(ScriptedRng([4, 1234, 2, 99]))
    assert ex.response == "4+9+0=13\n3+9+1=13\n2+0+1=03\n1+0+0=01\nanswer: 1333"
    for r in generate_examples("addition", "train", 300):
        *lines, last = r["response"].splitlines()
        assert all(re.fullmatch(r"\d\+\d\+[01]=\d\d", line) for line in lines)
        assert len(r["response"]) < 60


def test_chain_follows_mapping():
    task = ChainTask(num_letters=10, min_steps=3, max_steps=8)
    rng = random.Random(0)
    for _ in range(200):
        ex = task.make(rng)
        listing, rest = ex.prompt.split(" start ")
        mapping = dict(pair.split(">") for pair in listing.split())
        assert len(mapping) == 10
        start, steps = rest.split(", ")
        steps = int(steps.split()[0])
        path = ex.response.splitlines()[0].split(">")
        assert len(path) == steps + 1 and 3 <= steps <= 8
        assert path[0] == start
        for src, dst in zip(path, path[1:]):
            assert mapping[src] == dst
        assert len(set(path)) == len(path)  # a single cycle: no letter repeats within 10 steps
        assert ex.answer == path[-1]


def test_mix_list_and_dict():
    mixed = generate_examples(["addition", "chain"], "train", 400, seed=0)
    counts = {name: sum(r["task"] == name for r in mixed) for name in ("addition", "chain")}
    assert sum(counts.values()) == 400 and min(counts.values()) > 120
    assert mixed == generate_examples(["chain", "addition"], "train", 400, seed=0)  # order does not matter

    weighted = generate_examples({"addition": 1.0, "chain": 9.0}, "test", 500, seed=0)
    n_chain = sum(r["task"] == "chain" for r in weighted)
    assert 400 < n_chain < 500
    for r in weighted:
        assert r["id"].startswith(f"{r['task']}-test-")
        assert check_answer(r["task"], r["response"], r["answer"])
    assert len({r["id"] for r in weighted}) == 500


def test_unknown_task_and_bad_args():
    with pytest.raises(ValueError, match="nope"):
        generate_examples("nope", "train", 1)
    with pytest.raises(ValueError, match="nope"):
        generate_examples(["addition", "nope"], "train", 1)
    with pytest.raises(ValueError, match="nope"):
        check_answer("nope", "answer: 1", "1")
    with pytest.raises(ValueError):
        generate_examples("addition", "dev", 1)
    with pytest.raises(ValueError):
        generate_examples({"addition": 0.0}, "train", 1)


def test_small_space(monkeypatch):
    # 1-digit addition has only 100 prompts: train falls back to duplicates, test refuses.
    monkeypatch.setitem(TASKS, "tiny", AdditionTask(min_digits=1, max_digits=1, name="tiny"))
    monkeypatch.setattr("dllm.tasks.MAX_MISSES", 500)
    train = generate_examples("tiny", "train", 300)
    assert len(train) == 300 and len({r["prompt"] for r in train}) <= 100
    assert all(split_of(r["prompt"]) == "train" for r in train)
    with pytest.raises(ValueError, match="too small"):
        generate_examples("tiny", "test", 50)


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "sub" / "train.jsonl"
    cmd = [sys.executable, "-m", "dllm.tasks", "--task", "chain", "--split", "train", "--num", "25", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == generate_examples("chain", "train", 25, seed=0)


def test_cli_parse_tasks():
    assert parse_tasks("chain") == "chain"
    assert parse_tasks("addition:1,reverse:3") == {"addition": 1.0, "reverse": 3.0}
    assert parse_tasks("addition,chain") == {"addition": 1.0, "chain": 1.0}
    with pytest.raises(ValueError, match="nope"):
        parse_tasks("addition,nope")
    with pytest.raises(ValueError, match="weight"):
        parse_tasks("addition:x")


def test_cli_unknown_task():
    cmd = [sys.executable, "-m", "dllm.tasks", "--task", "nope", "--split", "train", "--num", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "addition" in proc.stderr and "chain" in proc.stderr


def test_recurrence_follows_its_rule():
    from dllm.tasks import RecurrenceTask

    task = RecurrenceTask(min_terms=6, max_terms=9)
    for record in generate_examples("recurrence", "train", 50, seed=3):
        first, second, c, last = map(int, re.fullmatch(r"f1=(\d) f2=(\d) c=(\d) f(\d+)=\?", record["prompt"]).groups())
        terms = [first, second]
        while len(terms) < last:
            terms.append((terms[-2] + terms[-1] + c) % 10)
        lines = record["response"].splitlines()
        assert len(lines) == last - 2 + 1  # one line per computed term, then the answer
        assert lines[0].startswith(f"f3={first}+{second}+{c}=")
        assert record["answer"] == str(terms[-1]) and lines[-1] == f"answer: {terms[-1]}"
    lengths = {len(task.make(random.Random(s)).response.splitlines()) for s in range(200)}
    assert lengths == {5, 6, 7, 8}  # 6..9 terms: 4..7 step lines + the answer
    with pytest.raises(ValueError, match="min_terms"):
        RecurrenceTask(min_terms=2)
