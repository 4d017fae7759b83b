"""Exact- and contains-match rates of predictions against their references (``metrics.json``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def _target(record: Mapping[str, Any]) -> str | None:
    """What the response should contain: the task answer when there is one, else the reference text."""
    for key in ("answer", "reference"):
        value = record.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


def is_exact_match(record: Mapping[str, Any]) -> bool:
    """The task's answer checker for embedded-task records, else the whole response equals the reference."""
    from dllm.tasks import TASKS, check_answer

    if record.get("task") in TASKS and record.get("answer") is not None:
        return check_answer(record["task"], record["response"], str(record["answer"]))
    reference = record.get("reference")
    return isinstance(reference, str) and record["response"].strip() == reference.strip()


def score(records: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Exact- and contains-match rates over the records with a reference (or answer); ``None`` without any.

    Contains-match: the answer (or, without one, the reference text) occurs in the response.
    Tokens per forward covers every record.
    """
    from torchmetrics.aggregation import MeanMetric

    exact, contains = MeanMetric(), MeanMetric()
    total = scored = tokens = forwards = 0
    for record in records:
        total += 1
        tokens += int(record.get("new_tokens", 0))
        forwards += int(record.get("forwards", 0))
        target = _target(record)
        if target is None:
            continue
        scored += 1
        exact.update(float(is_exact_match(record)))
        contains.update(float(target in record["response"]))
    if not scored:
        return None
    return {
        "records": total,
        "scored": scored,
        "exact_match": round(float(exact.compute()), 6),
        "contains_match": round(float(contains.compute()), 6),
        "tokens_per_forward": round(tokens / max(forwards, 1), 4),
    }
