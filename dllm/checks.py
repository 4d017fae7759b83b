"""Early checks that the command lines share, each raising ``UserError`` in one line.

Two kinds of mistakes otherwise surface late and as tracebacks (docs/method.md, section 10):

- a setting that torch, Lightning or transformers reject deep inside (``--model.lr -1`` in AdamW at
  the first step, ``--data.batch_size 0`` in the DataLoader, ``--model.dtype bogus`` while the model
  loads): ``check_settings`` checks them all from the parsed config, before anything is built;
- an output path that cannot be written (under a file, in a read-only folder, a folder where a file
  is meant): ``check_output_file`` and ``check_output_folder`` try the place before any work, so a
  predict run does not generate everything first and then fail leaving ``.rank0``/``.tmp`` files.

Everything here is cheap (no model, no tokenizer) and imports nothing heavy at module level, so the
small command lines (``python -m dllm.tasks``, ``dllm.data.prompts``, ``dllm.models``) use it too.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dllm.errors import UserError

_MISSING = object()
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")  # the keys of dllm.module.DTYPES

# (key, accepts the value, what it must be): values torch, Lightning or the DataLoader reject only later
BOUNDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("model.lr", lambda v: v > 0, "> 0 (the peak AdamW learning rate)"),
    ("model.weight_decay", lambda v: v >= 0, ">= 0"),
    ("model.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("model.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("model.dtype", lambda v: v is None or v in DTYPE_NAMES, f"one of {', '.join(DTYPE_NAMES)} or null"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.val_batch_size", lambda v: v is None or v >= 1, ">= 1 or null (= data.batch_size)"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.val_fraction", lambda v: 0 < v < 1, "in (0, 1): the share of data.train_file split off for validation"),
    ("trainer.max_steps", lambda v: v >= -1, ">= 0, or -1 for no limit"),
    ("trainer.max_epochs", lambda v: v is None or v >= -1, ">= 0, -1 for no limit, or null"),
]


def check_settings(config: Mapping[str, Any], subcommand: str) -> None:
    """The settings of ``config`` (one subcommand's namespace) that would fail only deep inside a run.

    Checked before any model loads: the ``BOUNDS`` table, ``model.attn_implementation``, ``model.pretrained``
    when it names a local folder, ``data.task``, and whether every device gets a full training batch.
    """
    for key, ok, expected in BOUNDS:
        value = _get(config, key)
        if value is not _MISSING and not ok(value):
            raise UserError(f"--{key} {value}: must be {expected}")
    model, data = config.get("model") or {}, config.get("data") or {}
    check_attn_implementation(
        model.get("attn_implementation"), f"--model.attn_implementation {model.get('attn_implementation')}"
    )
    check_pretrained(model.get("pretrained"), f"--model.pretrained {model.get('pretrained')}")
    task = data.get("task")
    if task is not None:
        from dllm.tasks import generate_examples  # checks names and weights; zero examples cost nothing

        try:
            generate_examples(task, "train", 0)
        except ValueError as e:
            raise UserError(f"--data.task {task}: {e}") from None
        if subcommand == "fit":
            world = world_size(config.get("trainer") or {})
            if world is not None:
                check_batches(data.get("num_train"), data.get("batch_size"), world, "from data.num_train")


def _get(config: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(config, Mapping) and not hasattr(config, "get"):
            return _MISSING
        config = config.get(part, _MISSING)
        if config is _MISSING:
            return _MISSING
    return config


def check_attn_implementation(name: str | None, shown: str) -> None:
    """``name`` is an attention transformers knows (``eager``, ``sdpa``, ``flash_attention_2``, a hub kernel...)."""
    if name is None:
        return
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name in known or name.removeprefix("paged|") in known or is_kernel(name):
        return
    raise UserError(f"{shown}: unknown attention; choose {', '.join(sorted(known))}, or a hub kernel (org/repo)")


# a name the hub could hold ("org/name"); anything else that does not exist locally is a missing folder
HUB_NAME = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")


def check_pretrained(name: str | None, shown: str) -> None:
    """``name`` is an HF model folder, or could be a hub name; a missing local path fails here, not in HF."""
    if name is None:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise UserError(f"{shown}: a file, not an HF model folder (a checkpoint of train.py goes to ckpt_path)")
    if not HUB_NAME.match(str(name)) or ".." in str(name) or str(name).startswith((".", "~")):
        raise UserError(f"{shown}: no such folder")


def world_size(trainer: Mapping[str, Any]) -> int | None:
    """Processes a run will have (``devices`` x ``num_nodes``) when the config says; ``None`` for ``auto`` or ``-1``."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(devices, str):
        text = devices.strip()
        if text.lstrip("-").isdigit():
            devices = int(text)
        elif "," in text:  # device indices, "0,1"
            devices = [d for d in text.split(",") if d.strip()]
        else:
            return None
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    if not isinstance(devices, int) or devices < 1 or not isinstance(nodes, int) or nodes < 1:
        return None
    return devices * nodes


def check_batches(num_examples: int | None, batch_size: int | None, world: int, what: str) -> None:
    """With several devices, each must get a full training batch, or no step trains (Lightning ends at once).

    One device trains on a short batch when the data is smaller than ``batch_size``; split over devices,
    the batches are dropped instead, and the fit would end having trained nothing, with exit code 0.
    """
    if world <= 1 or num_examples is None or batch_size is None:
        return
    per_device = math.ceil(num_examples / world)
    if per_device < batch_size:
        raise UserError(
            f"--data.batch_size {batch_size}: more than the {per_device} training examples each of {world} devices "
            f"gets ({num_examples} {what}; trainer.devices x num_nodes = {world}): no step would train; lower "
            f"data.batch_size to {max(per_device, 1)} or trainer.devices, or give more data"
        )


# ----------------------------------------------------------------------------
# Output paths


def check_output_file(path: str | Path, shown: str, example: str = "out.jsonl") -> None:
    """A file can be written at ``path`` (its missing folders created): not a folder, not under a file, writable.

    ``example`` is the file name the message suggests inside a folder given by mistake.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{shown} {path}: a folder; give a file path (e.g. {path / example})")
    _check_can_create_in(path.parent, shown, path)


def check_output_folder(path: str | Path, shown: str) -> None:
    """A folder can be made (or is) at ``path`` and files written in it: not a file, not under a file, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{shown} {path}: a file, not a folder")
    _check_can_create_in(path, shown, path)


def _check_can_create_in(folder: Path, shown: str, path: Path) -> None:
    """The nearest existing folder of ``folder`` is a folder and takes a file (tried with a nameless temp file)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{shown} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):  # O_TMPFILE where the system has it: nothing left behind
            pass
    except OSError as e:
        raise UserError(f"{shown} {path}: cannot write in {existing} ({e.strerror or e})") from None


def check_prediction_output(config: Mapping[str, Any]) -> None:
    """``predict``'s output can be written and is not the prompts file, before any model loads.

    The output (``--predictions.output``, default ``<trainer.default_root_dir>/predictions.jsonl``) is
    written at the end, with ``.rank<r>`` shards, a ``.tmp`` and a ``.lock`` beside it: a place that
    cannot take them would fail only after every prompt was generated.
    """
    output = (config.get("predictions") or {}).get("output")
    shown = "--predictions.output"
    if output is None:
        root = (config.get("trainer") or {}).get("default_root_dir") or "."
        output, shown = (
            Path(root) / "predictions.jsonl",
            "--predictions.output (default, from trainer.default_root_dir)",
        )
    check_output_file(output, shown, "predictions.jsonl")
    prompts = (config.get("data") or {}).get("prompts_file")
    if prompts is not None and Path(prompts).exists() and Path(output).exists():
        if Path(prompts).resolve() == Path(output).resolve():
            raise UserError(
                f"{shown} {output}: the prompts file (--data.prompts_file) itself; predictions would replace the "
                "prompts: choose another --predictions.output"
            )


# ----------------------------------------------------------------------------
# Config files


def config_file_error(args: Sequence[str]) -> UserError | None:
    """The first YAML config file among ``args`` that does not parse, as ``<file>:<line>: ...``; else ``None``.

    jsonargparse reports a malformed config without its file, and its line as one of a string.
    """
    import yaml

    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if not name.startswith("-"):
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        file = Path(value)
        if file.suffix.lower() not in (".yaml", ".yml") or not file.is_file():
            continue
        try:
            yaml.safe_load(file.read_text(encoding="utf-8", errors="replace"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
            column = f" at column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            return UserError(f"{where}: malformed YAML: {problem}{column} (the config file of {name})")
    return None
