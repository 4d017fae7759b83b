"""The predictions file: resume safely, one writer at a time, score against references.

``dllm.callbacks.PredictionWriter`` (the Lightning side) uses these plain functions:

- ``read_predictions`` / ``repair_torn_tail``: a killed run leaves at most one torn last
  line per file; it is dropped and that prompt is predicted again.
- ``model_fingerprint``: the identity of the weights (a SHA-256 of every byte of the checkpoint
  or model folder, cached by path, size and mtime) and of the options that load them.
- ``mismatch``: an earlier record is reused only when its prompt, its rendered prompt, the
  generation settings, the model and the tokenizer match this run; anything else is named, in
  one line, and nothing is deleted.
- ``reusable``: applies ``mismatch`` to the output and each leftover shard, naming the file that holds a
  record it may not reuse; shards that match this run while the output does not are a stopped
  ``--predictions.overwrite``, which the same command finishes (the shards are reused).
- ``OutputLock``: ``<output>.lock`` so two runs never write one output; a lock left by a
  killed run on this host (or left empty or unreadable) is taken over.
- ``with_inputs``: a reused record takes this run's input fields and reference (they are not part of
  what was generated), so the scores always compare against today's references.
- ``score`` (``dllm.data.scoring``): exact- and contains-match rates over records that carry a reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from dllm.data.records import decode_text, dumps_line, split_lines
from dllm.data.scoring import is_exact_match, score  # noqa: F401  (their home before dllm.data.scoring)
from dllm.errors import UserError

# The model options that change what the same weights compute (or which weights and tokenizer load).
MODEL_KEYS = ("pretrained", "model_config", "tokenizer", "dtype", "trust_remote_code", "attn_implementation")
CACHED_HASH_BYTES = 64 << 20  # files at least this big keep their hash in the cache (a 1 GB file takes seconds)


# ----------------------------------------------------------------------------
# Reading and writing JSONL


def read_predictions(path: Path) -> dict[str, dict]:
    """Records of a predictions JSONL by id; a torn last line (killed run) is ignored.

    Lines end only at ``\\n``: a U+2028 or U+0085 inside a response (written raw by older versions) is text.
    A last line without its ``\\n`` that does not decode or parse (the kill may cut a character
    in half) is the torn write of a killed run: that prompt is predicted again.
    """
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    lines = split_lines(decode_text(data[:end], path))
    if data[end:]:
        try:
            last = data[end:].decode("utf-8")
            json.loads(last)
            lines.append(last)  # complete but for its newline
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass  # torn by a kill
    for line_no, line in enumerate(lines, 1):
        if not line.strip(" \t\r"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            reason = e.msg.removesuffix(" at")
            raise UserError(
                f"{path}:{line_no}: malformed JSON in an existing predictions file: {reason} at column {e.colno} "
                "(--predictions.overwrite true replaces the file)"
            ) from None
        if not isinstance(record, dict) or "id" not in record:
            raise UserError(f"{path}:{line_no}: not a prediction record (no 'id')")
        records[str(record["id"])] = record
    return records


def repair_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a write cut off by a kill) before appending to the file."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def write_in_order(path: Path, records: Mapping[str, dict], order: Iterable[str]) -> None:
    """Write the records of ``order`` that exist, in that order, replacing ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        for record_id in order:
            if record_id in records:
                f.write(dumps_line(records[record_id]))
    tmp.replace(path)


# ----------------------------------------------------------------------------
# Which model wrote a record


def _hash_cache_path() -> Path:
    root = os.environ.get("DLLM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dllm"
    return Path(root) / "file-hashes.json"


def file_sha256(path: Path) -> str:
    """SHA-256 of every byte of ``path``; for big files cached by (path, size, mtime, inode).

    A rewritten file gets a new mtime (and usually size), so the cache never serves a stale hash for a
    file changed through the file system; the cache file is ``$DLLM_CACHE_DIR/file-hashes.json``
    (default ``~/.cache/dllm``) and is only a speed-up: when it cannot be read or written, files are hashed.
    """
    stat = path.stat()
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cache_path = _hash_cache_path()
    cache: dict = {}
    if stat.st_size >= CACHED_HASH_BYTES:
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
            if cache.get(key, {}).get("stamp") == stamp:
                return cache[key]["sha256"]
        except (OSError, ValueError, AttributeError):
            cache = {}
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    if stat.st_size >= CACHED_HASH_BYTES:
        try:
            cache = cache if isinstance(cache, dict) else {}
            cache[key] = {"stamp": stamp, "sha256": digest}
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache), encoding="utf-8")
            tmp.replace(cache_path)
        except OSError:
            pass
    return digest


def _hash_path(h: Any, path: Path) -> None:
    """Every byte of a file, or of every file of a folder (sharded checkpoints, HF folders)."""
    if path.is_file():
        h.update(f"{path.name}:{file_sha256(path)}:".encode())
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{file.relative_to(path)}:{file_sha256(file)}:".encode())
    else:
        h.update(str(path).encode())  # "last", a URL: the name is all we can check


def model_fingerprint(checkpoint: str | None, hparams: Mapping[str, Any]) -> str:
    """``"<source>@<16 hex digits>"``: the checkpoint (or pretrained model) and a hash of what computes with it.

    The hash covers every byte of the checkpoint (or, without one, of a local ``pretrained``
    folder) and the model options that change the result of the same weights: ``MODEL_KEYS``
    (dtype, attention implementation, tokenizer, ...). A change anywhere changes the fingerprint.
    """
    h = hashlib.sha256()
    h.update(json.dumps({k: hparams.get(k) for k in MODEL_KEYS}, sort_keys=True, default=str).encode())
    pretrained = hparams.get("pretrained")
    if checkpoint is not None:
        source = str(checkpoint)
        _hash_path(h, Path(checkpoint))
    else:
        source = str(pretrained) if pretrained else "model_config"
        if pretrained and Path(pretrained).exists():
            _hash_path(h, Path(pretrained))
    return f"{source}@{h.hexdigest()[:16]}"


def prompt_digest(text: str, ids: list[int]) -> str:
    """16 hex digits of the rendered prompt text and its token ids: what the model was asked."""
    h = hashlib.sha256(text.encode("utf-8", "surrogatepass"))
    h.update(json.dumps(ids).encode())
    return h.hexdigest()[:16]


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
    existing: Mapping[str, dict],
    prompts: Mapping[str, Any],
    settings: Mapping[str, Any],
    model: str,
    tokenizer: str | None = None,
    rendered: Mapping[str, str] | None = None,
) -> str | None:
    """Why the earlier records may not be reused by this run, in one phrase; ``None`` when all match.

    Args:
        existing: earlier records by id (output file and shards).
        prompts: this run's prompts by id (a string or chat messages, as in the records).
        settings: this run's generation settings, as records store them.
        model: this run's ``model_fingerprint``.
        tokenizer: this run's ``tokenizer_fingerprint``; ``None`` does not check it.
        rendered: this run's ``prompt_digest`` by id (the prompt after the chat template, as token ids);
            ``None`` does not check it.
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
        if tokenizer is not None and _digest(record.get("tokenizer")) != _digest(tokenizer):
            theirs = record.get("tokenizer")
            return f"id {record_id!r} was written with another tokenizer ({theirs}; this run: {tokenizer})"
    for record_id, record in existing.items():
        if record.get("settings") != settings:
            change = _settings_change(record.get("settings"), settings)
            return f"id {record_id!r} was written with other generation settings ({change})"
    for record_id, record in existing.items():
        if record.get("prompt") != prompts[record_id]:
            return (
                f"id {record_id!r} has another prompt text ({record.get('prompt')!r}; this run: {prompts[record_id]!r})"
            )
    for record_id, record in existing.items():
        if rendered is not None and record.get("prompt_digest") != rendered[record_id]:
            return (
                f"id {record_id!r} was written for another rendered prompt (data.chat_template or the template "
                f"changed: prompt_digest {record.get('prompt_digest')}; this run: {rendered[record_id]})"
            )
    return None


def reusable(output: Path, shards: list[Path], why_not: Callable[[dict], str | None], overwrite: bool) -> list[str]:
    """The ids of earlier records this run reuses, or ``UserError`` naming the file that holds one it may not.

    Args:
        output: the predictions file (an earlier run's, if any).
        shards: ``<output>.rank<r>`` of a run that was killed or stopped before it merged them.
        why_not: ``mismatch`` bound to this run: why some records may not be reused, or ``None``.
        overwrite: ``--predictions.overwrite``: the output is never reused; shards are reused when they all
            match this run (an overwrite that was stopped: the same command finishes it) and removed otherwise.
    """
    for shard in shards:
        repair_torn_tail(shard)
    sources = [(shard, read_predictions(shard)) for shard in shards]
    in_shards = {i: r for _, records in sources for i, r in records.items()}
    ours = bool(in_shards) and why_not(in_shards) is None  # the shards of a stopped run of these very settings
    if overwrite:
        if not ours:
            for shard in shards:
                shard.unlink()
        return sorted(in_shards) if ours else []
    earlier = read_predictions(output)
    for source, records in [(output, earlier), *sources]:
        why = why_not(records) if records else None
        if why:
            hint = "pass --predictions.overwrite true to replace them"
            if ours and source == output:
                names = ", ".join(str(s) for s in shards)
                hint = (
                    f"{names} {'holds' if len(shards) == 1 else 'hold'} {len(in_shards)} predictions of this run, "
                    "left by an interrupted --predictions.overwrite run: pass --predictions.overwrite true to finish "
                    "it (they are reused)"
                )
            raise UserError(
                f"{source} already holds {len(records)} predictions that this run may not reuse: {why}; "
                f"{hint}, or choose another --predictions.output"
            )
    return sorted({**earlier, **in_shards})


def remove_torn_merge(output: Path) -> None:
    """Remove ``<output>.tmp`` of a run killed while it merged: the shards it was merging are still there."""
    tmp = output.with_name(output.name + ".tmp")
    if tmp.is_file():
        tmp.unlink()
        print(
            f"removed {tmp}, left by a run killed while it merged (the shards still hold its records)", file=sys.stderr
        )


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
        """Take the lock or raise ``UserError`` naming its holder; returns a note when a stale lock was taken over.

        A lock is stale when its pid is gone on this host, or when it is empty or unreadable (a
        lock is written whole before it appears, so a live writer's lock is never empty).
        """
        note = None
        for _ in range(2):
            if self._create():
                self.held = True
                return note
            holder = self._holder()
            if holder == {}:
                continue  # released just now: try again
            if holder is None:
                self.path.unlink(missing_ok=True)
                note = f"removed an empty or unreadable lock {self.path}"
                continue
            if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
                if not _alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)
                    note = f"removed a stale lock {self.path} (pid {holder['pid']} is gone)"
                    continue
            raise UserError(
                f"{self.path.with_suffix('')} is being written by another predict run "
                f"(pid {holder.get('pid')} on {holder.get('host')}); wait for it or choose another "
                f"--predictions.output (delete {self.path} only if that run is gone)"
            )
        raise UserError(f"could not take the lock {self.path}")

    def _create(self) -> bool:
        """Create the lock with its content in one step (a hard link of a written file); ``False`` if it exists."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: create, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _holder(self) -> dict | None:
        """The lock's holder; ``None`` when the lock is empty or not a holder record."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}  # released just now: try again
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and "pid" in holder else None

    def release(self) -> None:
        """Remove the lock if this process holds it (never another run's)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------------------
# What a reused record takes from this run

# what generation wrote into a record (the rest of a record is the input's: its fields and its reference)
GENERATED_KEYS = (
    "new_tokens", "finish_reason", "forwards", "settings", "response_ids", "tokenizer", "checkpoint", "prompt_digest",
)  # fmt: skip


def with_inputs(record: Mapping[str, Any], extra: Mapping[str, Any], reference: str | None) -> dict:
    """``record`` with this run's input fields (``extra``) and ``reference`` in place of those it was written with.

    A reuse matches the prompt, the model and the settings, not the references (``response``, ``answer``,
    ``data.reference_key``) nor the other fields of the input record: those may have been corrected since,
    and the scores must compare against them. The field order is the one a fresh record has.
    """
    out = {**extra, "id": record["id"], "prompt": record["prompt"], "response": record["response"]}
    if reference is not None:
        out["reference"] = reference
    out.update({k: record[k] for k in GENERATED_KEYS if k in record})
    return out
