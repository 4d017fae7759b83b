"""The predictions file: resume safely, one writer at a time, score against references.

``dllm.callbacks.PredictionWriter`` (the Lightning side) uses these plain functions:

- ``read_predictions`` / ``repair_torn_tail``: a killed run leaves at most one torn last
  line per file; it is dropped and that prompt is predicted again.
- ``model_fingerprint``: a cheap identity of the weights (a checkpoint's size and last MiB,
  where a torch zip keeps the CRC-32 of every tensor), stored in each record.
- ``mismatch``: an earlier record is reused only when its prompt text, generation settings
  and model match this run; anything else is named, in one line, and nothing is deleted.
- ``OutputLock``: ``<output>.lock`` so two runs never write one output; a lock left by a
  killed run on this host is recognised by its pid and taken over.
- ``score``: exact- and contains-match rates over records that carry a reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dllm.errors import UserError

TAIL_BYTES = 1 << 20  # a torch zip's central directory (CRC-32 per tensor) sits in its last bytes


# ----------------------------------------------------------------------------
# Reading and writing JSONL


def read_predictions(path: Path) -> dict[str, dict]:
    """Records of a predictions JSONL by id; a torn last line (killed run) is ignored."""
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    lines = path.read_text(encoding="utf-8").splitlines()
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line_no == len(lines):
                continue  # the write was cut off by a kill: that prompt is predicted again
            raise UserError(f"{path}:{line_no}: malformed JSON in an existing predictions file") from None
        if not isinstance(record, dict) or "id" not in record:
            raise UserError(f"{path}:{line_no}: not a prediction record (no 'id')")
        records[str(record["id"])] = record
    return records


def repair_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a write cut off by a kill) before appending to the file."""
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")


def write_in_order(path: Path, records: Mapping[str, dict], order: Iterable[str]) -> None:
    """Write the records of ``order`` that exist, in that order, replacing ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record_id in order:
            if record_id in records:
                f.write(json.dumps(records[record_id], ensure_ascii=False) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------
# Which model wrote a record


def _hash_file(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as f:
        f.seek(max(0, size - TAIL_BYTES))
        h.update(f.read())


def _hash_path(h: Any, path: Path) -> None:
    """Size and tail of a file, or of every file of a folder (sharded checkpoints, HF folders)."""
    if path.is_file():
        _hash_file(h, path)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(file.relative_to(path)).encode())
            _hash_file(h, file)
    else:
        h.update(str(path).encode())  # "last", a URL: the name is all we can check cheaply


def model_fingerprint(checkpoint: str | None, hparams: Mapping[str, Any]) -> str:
    """``"<source>@<16 hex digits>"``: the checkpoint (or pretrained model) and a cheap hash of its bytes.

    Without a checkpoint the hash covers the model's hyperparameters and, for a local
    ``pretrained`` folder, its files, so a changed model is never mistaken for the old one.
    """
    h = hashlib.sha256()
    if checkpoint is not None:
        source = str(checkpoint)
        _hash_path(h, Path(checkpoint))
    else:
        pretrained = hparams.get("pretrained")
        source = str(pretrained) if pretrained else "model_config"
        h.update(json.dumps(dict(hparams), sort_keys=True, default=str).encode())
        if pretrained and Path(pretrained).exists():
            _hash_path(h, Path(pretrained))
    return f"{source}@{h.hexdigest()[:16]}"


def _digest(fingerprint: Any) -> str | None:
    return fingerprint.rpartition("@")[2] if isinstance(fingerprint, str) else None


# ----------------------------------------------------------------------------
# May an earlier record be reused?


def _settings_change(old: Any, new: Mapping[str, Any]) -> str:
    if not isinstance(old, dict):
        return "no generation settings recorded"
    keys = [k for k in {**old, **new} if old.get(k, "<unset>") != new.get(k, "<unset>")]
    return ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys)


def mismatch(
    existing: Mapping[str, dict], prompts: Mapping[str, Any], settings: Mapping[str, Any], model: str
) -> str | None:
    """Why the earlier records may not be reused by this run, in one phrase; ``None`` when all match.

    Args:
        existing: earlier records by id (output file and shards).
        prompts: this run's prompts by id (a string or chat messages, as in the records).
        settings: this run's generation settings, as records store them.
        model: this run's ``model_fingerprint``.
    """
    settings = json.loads(json.dumps(dict(settings)))  # tuples -> lists, as read back from JSON
    orphans = [i for i in existing if i not in prompts]
    if orphans:
        return (
            f"{len(orphans)} of them have ids that are not among this run's prompts (first: {orphans[0]!r}); "
            "they would be dropped"
        )
    for record_id, record in existing.items():
        if _digest(record.get("checkpoint")) != _digest(model):
            return f"id {record_id!r} was written by another model ({record.get('checkpoint')}; this run: {model})"
    for record_id, record in existing.items():
        if record.get("settings") != settings:
            change = _settings_change(record.get("settings"), settings)
            return f"id {record_id!r} was written with other generation settings ({change})"
    for record_id, record in existing.items():
        if record.get("prompt") != prompts[record_id]:
            return (
                f"id {record_id!r} has another prompt text ({record.get('prompt')!r}; this run: {prompts[record_id]!r})"
            )
    return None


# ----------------------------------------------------------------------------
# One writer per output


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


class OutputLock:
    """``<output>.lock`` holds the writer's host and pid while a run writes ``output``.

    Args:
        output: the predictions file the lock guards.
    """

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + ".lock")
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock or raise ``UserError`` naming its holder; returns a note when a stale lock was taken over."""
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
                    if not _alive(holder["pid"]):
                        self.path.unlink(missing_ok=True)
                        note = f"removed a stale lock {self.path} (pid {holder['pid']} is gone)"
                        continue
                raise UserError(
                    f"{self.path.with_suffix('')} is being written by another predict run "
                    f"(pid {holder.get('pid')} on {holder.get('host')}); wait for it or choose another "
                    f"--predictions.output (delete {self.path} only if that run is gone)"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
            self.held = True
            return note
        raise UserError(f"could not take the lock {self.path}")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written right now, or not ours: treat as held
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        """Remove the lock if this process holds it (never another run's)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------------------
# Scoring against references


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
