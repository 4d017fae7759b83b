"""The embedded reasoning tasks (``dllm.tasks``) as offline lm-eval tasks, ``dllm_<task>``.

Each task is a YAML file in this folder over a JSONL file in ``data/``: the 200 test-split prompts of
``generate_examples(task, "test", 200, seed=0)`` (the prompts ``bench/quality.py`` tests on), shipped
in the package so that scoring needs no network. The model answers each prompt (``generate_until``,
greedy, stopping at EOS) and scores exact match on the final ``answer:`` line, with the task's own
checker. Prompts are the bare task text: give ``--apply_chat_template`` for a model trained with a chat
template (dllm's default, the byte tokenizer's ``Q: ...\\nA: `` included).

``python -m dllm.evaluation.tasks`` rewrites the JSONL files (they are deterministic).
"""

from __future__ import annotations

import json
from pathlib import Path

from dllm.data.records import write_jsonl
from dllm.tasks import TASKS, check_answer, generate_examples

TASKS_DIR = Path(__file__).resolve().parent
DATA_DIR = TASKS_DIR / "data"
NUM_TEST = 200
SEED = 0
__all__ = ["TASKS_DIR", "lm_eval_name", "load_dataset", "process_results", "split_records", "write_data"]


def lm_eval_name(task: str) -> str:
    """``addition-small`` -> ``dllm_addition_small``."""
    return "dllm_" + task.replace("-", "_")


def split_records(task: str) -> list[dict]:
    """The task's test prompts as shipped: ``id``, ``prompt``, ``answer`` and ``task``."""
    keep = ("id", "prompt", "answer", "task")
    return [{k: r[k] for k in keep} for r in generate_examples(task, "test", NUM_TEST, seed=SEED)]


def write_data(out_dir: Path = DATA_DIR) -> list[Path]:
    """Write ``<task>.jsonl`` for every embedded task into ``out_dir``."""
    paths = []
    for task in sorted(TASKS):
        path = Path(out_dir) / f"{task}.jsonl"
        write_jsonl(split_records(task), str(path), f"{NUM_TEST} {task} test prompts")
        paths.append(path)
    return paths


def load_dataset(task: str, **_):
    """lm-eval's ``custom_dataset`` hook: the shipped JSONL of ``task`` as the ``test`` split.

    lm-eval also passes the run's metadata (the model's arguments among them); they do not change the data.
    """
    from datasets import Dataset, DatasetDict

    path = DATA_DIR / f"{task}.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(records)})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match of the response's final ``answer:`` line with the reference answer."""
    return {"exact_match": float(check_answer(doc["task"], results[0], doc["answer"]))}
