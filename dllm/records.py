"""Data files and data arguments: read records, check what the user gave, before anything heavy loads.

A record is a dict from a ``.jsonl`` line, a ``.json`` list entry, a ``.parquet``
row or a ``.txt`` line, plus ``_where`` ("file:line", "file: record i") so every
error about it can name it. ``check_arguments`` validates the DataModule's
arguments without a tokenizer or model. Mistakes raise ``UserError``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dllm.errors import UserError

Record = dict[str, Any]

# ``_where`` (file:line) is ours: never a data field, never written out.
INTERNAL_KEYS = ("_where",)
TRAIN_SUFFIXES = (".jsonl", ".json", ".parquet")
PROMPT_SUFFIXES = (*TRAIN_SUFFIXES, ".txt")


def read_records(path: str | Path, text_key: str = "prompt") -> list[Record]:
    """Records from ``.jsonl``, ``.json`` (a list of objects), ``.parquet`` or ``.txt``, each with its ``_where``.

    Args:
        path: the file.
        text_key: the key a ``.txt`` line is stored under (one prompt per line, blank lines skipped).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise UserError(f"{path}: record {i}: expected a JSON object, got {type(record).__name__}")
        return [{**record, "_where": f"{path}: record {i}"} for i, record in enumerate(data)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading .parquet needs pyarrow (pip install 'dllm[parquet]')") from None
        rows = pq.read_table(path).to_pylist()
        # values JSON cannot hold (timestamps, decimals, bytes) as text, so predictions can carry them
        rows = [json.loads(json.dumps(record, default=str)) for record in rows]
        return [{**record, "_where": f"{path}: row {i}"} for i, record in enumerate(rows)]
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [{text_key: line, "_where": f"{path}:{i}"} for i, line in enumerate(lines, 1) if line.strip()]
    raise UserError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, or .txt for prompts)")


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append({**record, "_where": f"{path}:{line_no}"})
    return records


def is_messages(value: Any) -> bool:
    """A non-empty list of chat messages (dicts with ``role`` and ``content``)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def field(record: Record, key: str, argument: str) -> str | list[dict]:
    """``record[key]``, a string or chat messages; ``argument`` is the setting that names the key."""
    if key not in record or record[key] is None:
        keys = sorted(k for k in record if k not in INTERNAL_KEYS)
        raise UserError(f"{record['_where']}: missing key {key!r} ({argument}; the record has {keys})")
    value = record[key]
    if isinstance(value, str) or is_messages(value):
        return value
    raise UserError(f"{record['_where']}: {key!r} must be a string or a list of {{'role', 'content'}} messages")


# ----------------------------------------------------------------------------
# Checking arguments (before anything heavy loads)


def check_arguments(arguments: Mapping[str, Any], stage: str | None = None) -> None:
    """Raise ``UserError`` for data arguments that cannot work, naming the argument.

    It needs neither the tokenizer nor the model, so it runs before either loads: the
    DataModule calls it on construction, and the CLI can call it on the parsed ``data``
    config before instantiating anything (a large model takes minutes to load).

    Args:
        arguments: the DataModule's init arguments (a dict or the CLI's ``data`` namespace).
        stage: ``"fit"``/``"validate"``/``"predict"`` also checks that the stage has data.
    """
    _check_files(arguments)
    _check_sources(arguments)
    _check_prompts(arguments.get("prompt"))
    template = arguments.get("chat_template", True)
    if isinstance(template, str) and "{{" not in template and "{%" not in template:
        raise UserError(f"data.chat_template must be true, false or a Jinja template string, got {template!r}")
    if stage in ("fit", "validate") and arguments.get("train_file") is None and arguments.get("task") is None:
        raise UserError("set data.train_file or data.task to train")
    if stage == "predict" and arguments.get("prompts_file") is None and arguments.get("prompt") is None:
        raise UserError("set data.prompts_file or data.prompt to predict")


def _check_files(arguments: Mapping[str, Any]) -> None:
    """Every file given exists and has a type we read."""
    for name, suffixes in (
        ("train_file", TRAIN_SUFFIXES),
        ("val_file", TRAIN_SUFFIXES),
        ("prompts_file", PROMPT_SUFFIXES),
    ):
        path = arguments.get(name)
        if path is None:
            continue
        if not Path(path).is_file():
            raise UserError(f"data.{name}: no such file: {path}")
        if Path(path).suffix.lower() not in suffixes:
            raise UserError(f"data.{name}: unsupported file type of {path} (use {', '.join(suffixes)})")


def _check_sources(arguments: Mapping[str, Any]) -> None:
    """One source of training data and one of prompts: a second one would be silently ignored."""
    get = arguments.get
    for name in ("train_file", "val_file"):
        if get(name) is not None and get("task") is not None:
            raise UserError(
                f"data.{name}={get(name)} and data.task={get('task')!r} are both set; train on one "
                "(add --data.task null to use the file)"
            )
    if get("val_file") is not None and get("train_file") is None:
        raise UserError(f"data.val_file={get('val_file')} needs data.train_file")
    if get("prompt") is not None and get("prompts_file") is not None:
        raise UserError(
            f"data.prompt and data.prompts_file={get('prompts_file')} are both set; predict one "
            "(add --data.prompts_file null to predict only data.prompt)"
        )


def _check_prompts(prompt: str | list[str] | None) -> None:
    for i, text in enumerate([prompt] if isinstance(prompt, str) else prompt or []):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"data.prompt[{i}]: expected a non-empty string, got {text!r}")


def write_jsonl(records: list[dict], out: str, what: str) -> None:
    """Write ``records`` as JSONL to the path ``out`` (its folder created) or, for ``"-"``, to stdout.

    ``what`` names them in the line printed to stderr after a file is written ("400 train prompts").
    """
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if out == "-":
        sys.stdout.write(lines)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(lines, encoding="utf-8")
    print(f"wrote {what} to {path}", file=sys.stderr)
