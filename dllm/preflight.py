"""Preflight: a run's parsed command line, checked and completed before any model loads (minutes for a large one).

``DLLMCLI`` calls these between parsing and building the model: the checkpoint is a readable file
(``check_checkpoint``), ``--ckpt_path last`` is resolved from the config (``last_checkpoint``), a finished run is
not resumed (``check_resume``, ``NothingToTrain``), predict has weights, the generation settings, the data arguments
and the run settings pass their own checks, and unset checkpoint and log paths follow
``--trainer.default_root_dir`` (``derive_run_paths``). Apart from ``dllm.cli`` because all of it works on the
config namespace alone, not on Lightning's CLI; ``dllm.checks`` holds the checks of plain settings that
``serve.py`` shares.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint

from dllm.checks import check_prediction_output, check_settings
from dllm.data.records import check_arguments, check_records
from dllm.errors import UserError
from dllm.generation import GenerationSettings

# --ckpt_path values Lightning resolves itself (not files)
SPECIAL_CHECKPOINTS = ("last", "best", "hpc")


class NothingToTrain(Exception):
    """``fit`` would resume from a checkpoint that already reached ``trainer.max_steps``.

    Raised before any model loads; ``main`` prints the message as one line and exits with code 0
    (the run is complete), without touching the checkpoint, the HF export or the logs.
    """


# ----------------------------------------------------------------------------
# Run paths, from the config's ``class_path`` entries


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _class_specs(value: Any) -> list[Namespace]:
    """The ``class_path``/``init_args`` entries of a config value (one, a list, or none)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in items if isinstance(v, Namespace) and isinstance(v.get("class_path"), str)]


def has_class(value: Any, base: type) -> bool:
    """Whether a config value (one ``class_path`` entry, a list, or none) names a subclass of ``base``."""
    return any(_is_subclass(spec.class_path, base) for spec in _class_specs(value))


def _is_subclass(class_path: str, base: type) -> bool:
    cls = _import(class_path)
    return isinstance(cls, type) and issubclass(cls, base)


def derive_run_paths(trainer: Namespace) -> None:
    """Fill unset checkpoint and logger paths from ``trainer.default_root_dir``, so one flag moves a run.

    ``ModelCheckpoint.dirpath`` -> ``<root>/checkpoints`` (Lightning would nest it in the
    logger's version folder); a logger's ``save_dir`` -> ``<root>``. ``HFExport`` and
    ``PredictionWriter`` derive theirs at run time.
    """
    root = Path(trainer.get("default_root_dir") or ".")
    for spec in _class_specs(trainer.get("callbacks")):
        init_args = spec.get("init_args")
        if init_args is not None and _is_subclass(spec.class_path, ModelCheckpoint) and not init_args.get("dirpath"):
            init_args.dirpath = str(root / "checkpoints")
    for spec in _class_specs(trainer.get("logger")):
        init_args = spec.get("init_args")
        if init_args is not None and "save_dir" in init_args and not init_args.get("save_dir"):
            init_args.save_dir = str(root)


# ----------------------------------------------------------------------------
# Early checks: before a model loads (minutes for a large one)


def check_checkpoint(path: str | os.PathLike | None, shown: str | None = None) -> None:
    """``--ckpt_path`` exists and is a torch checkpoint (a zip with its directory intact), or raise ``UserError``.

    A truncated or empty file lacks the zip's closing directory, so this costs a few reads,
    not a load. A folder must be a sharded checkpoint (FSDP's ``meta.pt``, DeepSpeed's
    ``latest`` or ``checkpoint/``). URLs and Lightning's ``last``/``best``/``hpc``/``registry``
    names are left to Lightning (``check_resume`` resolves ``last`` for ``fit``).

    Args:
        path: the checkpoint.
        shown: how the message names it (default ``--ckpt_path <path>``).
    """
    if path is None or str(path) in SPECIAL_CHECKPOINTS or "://" in str(path) or str(path).startswith("registry"):
        return
    shown = shown or f"--ckpt_path {path}"
    file = Path(path)
    if not file.exists():
        raise UserError(f"{shown}: no such file")
    if file.is_dir() and not is_sharded_checkpoint(file):
        inside = sorted(file.glob("last*.ckpt")) or sorted(file.glob("*.ckpt"))
        hint = f"; the checkpoint in it is {inside[-1]}" if len(inside) == 1 else ""
        hint = f"; it holds {len(inside)} checkpoints, e.g. {inside[-1]}" if len(inside) > 1 else hint
        raise UserError(f"{shown}: a folder, not a checkpoint file{hint}")
    if file.is_file() and not zipfile.is_zipfile(file):
        size = file.stat().st_size
        raise UserError(f"{shown}: not a readable checkpoint ({size} bytes: truncated, or not a torch file)")


def is_sharded_checkpoint(folder: Path) -> bool:
    """A checkpoint saved as a folder: sharded FSDP (``meta.pt``) or DeepSpeed (``latest``, ``checkpoint/``)."""
    return (folder / "meta.pt").is_file() or (folder / "latest").is_file() or (folder / "checkpoint").is_dir()


def last_checkpoint(trainer: Namespace) -> Path | None:
    """The file ``--ckpt_path last`` resumes: the newest ``last*.ckpt`` of the ``ModelCheckpoint`` folders.

    The same choice as Lightning's, made from the config before any model loads (the folders
    are filled in by ``derive_run_paths``). ``None`` when there is none: Lightning then warns
    and trains from scratch.
    """
    found = []
    for spec in _class_specs(trainer.get("callbacks")):
        init_args = spec.get("init_args")
        if init_args is None or not _is_subclass(spec.class_path, ModelCheckpoint) or not init_args.get("dirpath"):
            continue
        name = getattr(_import(spec.class_path), "CHECKPOINT_NAME_LAST", "last")
        pattern = re.compile(rf"^{re.escape(name)}(-(\d+))?$")
        folder = Path(init_args.dirpath)
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.suffix == ".ckpt" and pattern.match(p.stem)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def check_resume(config: Namespace) -> None:
    """``fit --ckpt_path``: the checkpoint is readable and has steps left to train, before any model loads.

    Raises:
        UserError: ``last`` resolves to a missing, truncated or unreadable file.
        NothingToTrain: the checkpoint already reached ``trainer.max_steps``.
    """
    arg = config.get("ckpt_path")
    if arg is None:
        return
    path, shown = Path(arg), f"--ckpt_path {arg}"
    if str(arg) == "last":
        path = last_checkpoint(config.trainer)
        if path is None:
            return
        shown = f"--ckpt_path last ({path})"
        check_checkpoint(path, shown)
    elif str(arg) in SPECIAL_CHECKPOINTS or "://" in str(arg) or str(arg).startswith("registry"):
        return
    if not path.is_file():  # a sharded folder: its step is not read here
        return
    try:  # mmap: the tensors stay on disk, only the small pickled state is read
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise UserError(f"{shown}: not a readable checkpoint ({type(e).__name__})") from e
    step, max_steps = checkpoint.get("global_step"), config.trainer.get("max_steps")
    if isinstance(step, int) and isinstance(max_steps, int) and 0 <= max_steps <= step:
        raise NothingToTrain(
            f"{path} already reached trainer.max_steps={max_steps} (step {step}): nothing to train, nothing changed; "
            f"to train further, raise it, e.g. --trainer.max_steps {max(2 * step, 1)} --ckpt_path {arg}"
        )


def check_model_source(config: Namespace, subcommand: str) -> None:
    """Predicting needs weights: a checkpoint or a pretrained model (a random ``model_config`` alone is a mistake)."""
    model = config.model
    if subcommand == "predict" and not config.get("ckpt_path") and not model.get("pretrained"):
        raise UserError("predict needs --ckpt_path (a checkpoint of train.py) or --model.pretrained (an HF model)")


def check_generation(model: Namespace) -> None:
    """Build the generation settings once, so their own checks fail now (jsonargparse builds them later)."""
    generation = model.get("generation")
    if isinstance(generation, Namespace) and "class_path" not in generation:
        GenerationSettings(**generation.as_dict())


def check_data(data: Namespace, stage: str) -> None:
    """The data arguments' own checks (files exist, sources do not conflict, records read), before the model loads."""
    check_arguments(data, stage)
    check_records(data, stage)


def check_early(config: Namespace, subcommand: str) -> None:
    """Settings torch, Lightning or transformers would reject only after the model loaded, and predict's output.

    ``predict --ckpt_path last`` (or ``best``, ``hpc``): Lightning resolves those names from a fit's
    checkpoint callback, which predict has not; without a model source the run would fail later
    asking for ``model.pretrained``, so the message names ``--ckpt_path`` and the file it likely meant.
    """
    check_settings(config, subcommand)
    if subcommand != "predict":
        return
    ckpt = config.get("ckpt_path")
    if str(ckpt) in SPECIAL_CHECKPOINTS and not config.model.get("pretrained") and not config.model.get("model_config"):
        guess = Path(config.trainer.get("default_root_dir") or ".") / "checkpoints" / "last.ckpt"
        hint = f", e.g. --ckpt_path {guess}" if guess.is_file() else ""
        raise UserError(f"--ckpt_path {ckpt}: predict needs a checkpoint file ('{ckpt}' names one only for fit){hint}")
    check_prediction_output(config)
