"""Data files and data arguments: read records, check what the user gave, before anything heavy loads.

A record is a dict from a ``.jsonl`` line, a ``.json`` list entry, a ``.parquet``
row or a ``.txt`` line, plus ``_where`` ("file:line", "file: record i") so every
error about it can name it. ``check_arguments`` validates the DataModule's
arguments without a tokenizer or model. Mistakes raise ``UserError``.
"""

from __future__ import annotations

import json
import re
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


def read_text(path: str | Path) -> str:
    r"""The file as UTF-8 text (a leading byte-order mark dropped), its line ends untouched.

    Python's text mode would turn a lone ``\r`` into a line end; here only the callers split lines,
    and only at ``\n``. Bytes that are not UTF-8 raise ``UserError`` naming the byte offset and line.
    """
    return decode_text(Path(path).read_bytes(), path)


def decode_text(data: bytes, path: str | Path) -> str:
    """``data`` (the bytes of ``path``) as UTF-8 text, a leading byte-order mark dropped; see ``read_text``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte offset {e.start}: 0x{data[e.start]:02x}); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def split_lines(text: str) -> list[str]:
    r"""Lines that end only at ``\n`` (a ``\r`` before it dropped): U+2028, U+0085, form feeds stay inside a line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def json_error(path: str | Path, line: int, error: json.JSONDecodeError, column_only: bool = False) -> UserError:
    """One line for a JSON syntax error: the file, the line, the whole reason and the column."""
    place = f"column {error.colno}" if column_only else f"line {error.lineno} column {error.colno}"
    reason = error.msg.removesuffix(" at")
    return UserError(f"{path}:{line}: malformed JSON: {reason} at {place}")


def dumps_line(record: Mapping[str, Any]) -> str:
    r"""``record`` as one JSONL line (with its ``\n``), readable by any line splitter.

    Non-ASCII text is written as is, except U+0085, U+2028 and U+2029, which JSON allows raw in a
    string but which ``str.splitlines`` and many tools take for line ends: they are escaped.
    """
    return json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: Any, where: str) -> None:
    """Raise ``UserError`` when a string in ``value`` holds a lone surrogate (an escaped ``\\ud800`` in JSON).

    Such a string is not Unicode: no tokenizer can encode it and no UTF-8 file can hold it.
    """
    if isinstance(value, str):
        bad = _SURROGATE.search(value)
        if bad:
            raise UserError(
                f"{where}: a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start()} of a string "
                "(not Unicode text; an escaped emoji needs both halves)"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, where)
    elif isinstance(value, list):
        for item in value:
            check_text(item, where)


def read_records(path: str | Path, text_key: str = "prompt") -> list[Record]:
    r"""Records from ``.jsonl``, ``.json`` (a list of objects), ``.parquet`` or ``.txt``, each with its ``_where``.

    Text files must be UTF-8 (a byte-order mark is fine). Lines end only at ``\n`` (or ``\r\n``).

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
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise json_error(path, e.lineno, e) from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        records = []
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise UserError(f"{path}: record {i}: expected a JSON object, got {type(record).__name__}")
            check_text(record, f"{path}: record {i}")
            records.append({**record, "_where": f"{path}: record {i}"})
        return records
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".txt":
        lines = split_lines(read_text(path))
        return [{text_key: line, "_where": f"{path}:{i}"} for i, line in enumerate(lines, 1) if line.strip()]
    raise UserError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, or .txt for prompts)")


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for line_no, line in enumerate(split_lines(read_text(path)), 1):
        if not line.strip(" \t\r"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise json_error(path, line_no, e, column_only=True) from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        check_text(record, f"{path}:{line_no}")
        records.append({**record, "_where": f"{path}:{line_no}"})
    return records


def _read_parquet(path: Path) -> list[Record]:
    """Rows as records; values JSON cannot hold become text, so predictions can carry them.

    Binary columns hold text as UTF-8 bytes in many data sets: they are decoded, and bytes that are
    not UTF-8 raise ``UserError`` naming the column and row (a Python repr is never passed on as text).
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading .parquet needs pyarrow (pip install 'dllm[parquet]')") from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:  # pyarrow's message: "Could not open ...: <reason>. <advice>"
        reason = str(e).rpartition("': ")[2].split(". ")[0]
        raise UserError(f"{path}: not a readable parquet file ({reason})") from None
    records = []
    for i, row in enumerate(table.to_pylist()):
        where = f"{path}: row {i}"
        record = {column: _plain(value, f"{where}: column {column!r}") for column, value in row.items()}
        records.append({**record, "_where": where})
    return records


def _plain(value: Any, where: str) -> Any:
    """A parquet value as JSON holds it: UTF-8 bytes decoded, other values JSON cannot hold as their text."""

    def convert(value: Any) -> str:
        if isinstance(value, (bytes, bytearray)):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{where} holds bytes that are not UTF-8 text (byte offset {e.start}); "
                    "only UTF-8 binary columns can be read"
                ) from None
        return str(value)

    return json.loads(json.dumps(value, default=convert))


def is_messages(value: Any) -> bool:
    """A non-empty list of chat messages (dicts with ``role`` and ``content``)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def content_text(content: Any) -> str | None:
    """A message's text: its ``content`` string, or its text parts joined by newlines; ``None`` for anything else.

    OpenAI-style data sets write ``content`` as a list of parts (``[{"type": "text", "text": "hi"}]``);
    a part of any other type (an image, audio) has no text a language model could read.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        if all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    return None


def plain_messages(messages: list[dict]) -> list[dict]:
    """``messages`` with every ``content`` as one string (text parts joined); ``field`` has checked them."""
    return [{**m, "content": content_text(m["content"])} for m in messages]


def _describe(content: Any) -> str:
    if content is None:
        return "null"
    if isinstance(content, list):
        kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content]
        other = [k for k in kinds if k != "text"]
        return f"a {other[0]!r} part" if other else "an empty list"
    return f"a {type(content).__name__}"


def field(record: Record, key: str, argument: str) -> str | list[dict]:
    """``record[key]``, a string or chat messages; ``argument`` is the setting that names the key.

    Messages may hold their ``content`` as OpenAI-style text parts; anything else that is not text
    (``null``, an image part) raises ``UserError`` naming the record and the message.
    """
    if key not in record or record[key] is None:
        keys = sorted(k for k in record if k not in INTERNAL_KEYS)
        raise UserError(f"{record['_where']}: missing key {key!r} ({argument}; the record has {keys})")
    value = record[key]
    if isinstance(value, str):
        return value
    if is_messages(value):
        for i, message in enumerate(value):
            if not isinstance(message["role"], str):
                raise UserError(f"{record['_where']}: {key!r} message {i}: role must be a string")
            if content_text(message["content"]) is None:
                raise UserError(
                    f"{record['_where']}: {key!r} message {i}: content must be a string or a list of text parts "
                    f"({{'type': 'text', 'text': ...}}), got {_describe(message['content'])}"
                )
        return value
    raise UserError(f"{record['_where']}: {key!r} must be a string or a list of {{'role', 'content'}} messages")


def is_blank(prompt: str | list[dict]) -> bool:
    """A prompt with no visible text: a blank string, or messages whose contents are all blank."""
    if isinstance(prompt, str):
        return not prompt.strip()
    return all(not (content_text(m["content"]) or "").strip() for m in prompt)


def prompt_of(record: Record, key: str) -> str | list[dict]:
    """``record[key]`` as a prompt (``field``); a prompt without visible text raises ``UserError``."""
    prompt = field(record, key, "data.prompt_key")
    if is_blank(prompt):
        raise UserError(f"{record['_where']}: empty prompt ({key!r}); give it text or remove the record")
    return prompt


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


def check_records(arguments: Mapping[str, Any], stage: str) -> None:
    """Read the stage's data files and check every record's prompt (and response), before the model loads.

    A bad line (encoding, JSON, a missing key, a non-text message, an empty prompt) is then reported
    before minutes of model loading; the DataModule reads the files again when it sets up.
    """
    prompt_key = arguments.get("prompt_key") or "prompt"
    response_key = arguments.get("response_key") or "response"
    names = {"predict": ["prompts_file"], "fit": ["train_file", "val_file"], "validate": ["train_file", "val_file"]}
    for name in names.get(stage, []):
        path = arguments.get(name)
        if path is None:
            continue
        for record in read_records(path, text_key=prompt_key):
            prompt_of(record, prompt_key)
            if name != "prompts_file":
                field(record, response_key, "data.response_key")


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
        if Path(path).is_dir():
            raise UserError(f"data.{name}: {path} is a folder, not a file")
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
    lines = "".join(dumps_line(r) for r in records)
    if out == "-":
        sys.stdout.write(lines)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(lines, encoding="utf-8")
    print(f"wrote {what} to {path}", file=sys.stderr)
