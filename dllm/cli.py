"""``DLLMCLI``: the one LightningCLI behind ``train.py`` and ``predict.py``.

On top of Lightning's CLI it

- links the model's tokenizer into the DataModule (known only once the model is
  built) and adds the JSONL prediction writer (``--predictions.*``);
- derives every path of a run from ``--trainer.default_root_dir`` unless a path
  is set explicitly: checkpoints in ``<root>/checkpoints``, logs in ``<root>``,
  the HF export in ``<root>/hf``, predictions in ``<root>/predictions.jsonl``;
- checks the checkpoint and the data arguments before any model loads;
- keeps runs quiet (Lightning's tips, a torch deprecation inside Lightning) and
  prints progress as plain lines when stderr is not a terminal.

``main()`` is the entry point: a user mistake (``UserError``, a bad flag) prints
one ``error:`` line and exits with code 2; ``--debug`` (or ``DLLM_DEBUG=1``)
keeps the traceback and jsonargparse's full message.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from transformers.utils import logging as hf_logging

from dllm.callbacks import LineProgress, PredictionWriter
from dllm.data import DLLMDataModule
from dllm.errors import UserError
from dllm.module import DLLMModule, GenerationSettings
from dllm.records import check_arguments, check_records

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# --ckpt_path values Lightning resolves itself (not files)
SPECIAL_CHECKPOINTS = ("last", "best", "hpc")
# model options that say how to run the weights of a --ckpt_path: a value given on the command line wins
RUNTIME_MODEL_KEYS = ("dtype", "attn_implementation")

# Lightning 2.6 still builds torch's deprecated LeafSpec on every batch: noise, not ours to fix.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
# ``logger: true`` (the configs' choice: it logs to ``default_root_dir``) means CSV without tensorboard, as intended.
warnings.filterwarnings("ignore", message=r"Starting from v1.9.0, `tensorboardX` has been removed")


class _NoTips(logging.Filter):
    """Drop Lightning's advertising tips ("💡 Tip: ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoTips())


class DLLMCLI(LightningCLI):
    """``fit``/``validate``/``predict`` over ``DLLMModule`` and ``DLLMDataModule``."""

    def __init__(self, args=None, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)  # a run is reproducible unless asked otherwise
        super().__init__(DLLMModule, DLLMDataModule, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model", "data.tokenizer", apply_on="instantiate", compute_fn=_tokenizer_of)
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # Lightning warns whenever ``args`` and ``sys.argv`` are both given: predict.py and the tests do so by design.
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        if subcommand:  # before Lightning reads the checkpoint's hyperparameters, and before any model loads
            check_checkpoint(self.config[subcommand].get("ckpt_path"))
            _check_model_source(self.config[subcommand], subcommand)
            if subcommand in ("fit", "validate", "predict"):
                _check_generation(self.config[subcommand].model)
                _check_data(self.config[subcommand].data, subcommand)

    def _parse_ckpt_path(self) -> None:
        # Lightning puts the checkpoint's hyperparameters over the command line; how to run the weights
        # (--model.dtype, --model.attn_implementation) is the user's choice when given, not the checkpoint's.
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        given = {k: model.get(k) for k in RUNTIME_MODEL_KEYS if model.get(k) is not None} if model else {}
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:  # the file passed check_checkpoint
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise UserError(f"--ckpt_path {path}: not a readable checkpoint ({type(e).__name__})") from e
        for key, value in given.items():
            self.config[subcommand].model[key] = value

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        derive_run_paths(config.trainer)
        if self.subcommand == "predict":
            if not _has_class(config.trainer.get("callbacks"), ModelCheckpoint):
                # no checkpoint callback to restore from the ckpt (it would warn that its dirpath changed), and so
                # no use for Lightning's reminder to pass the callbacks that wrote the checkpoint
                config.trainer.enable_checkpointing = False
                warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used")
            # a rerun whose prompts were all predicted before has an empty loader, as intended
            warnings.filterwarnings("ignore", message=r"Total length of `DataLoader` across ranks is zero")
            config.predictions.checkpoint = config.get("ckpt_path")

    def instantiate_trainer(self, **kwargs: Any):
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and "callbacks" not in kwargs and not any(isinstance(c, ProgressBar) for c in callbacks):
            # a bar redraws one line with carriage returns: in a log file that is no progress at all
            kwargs["callbacks"] = [*callbacks, TQDMProgressBar() if sys.stderr.isatty() else LineProgress()]
        return super().instantiate_trainer(**kwargs)


def _tokenizer_of(model: DLLMModule):
    return model.tokenizer


# ----------------------------------------------------------------------------
# Run folders


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


def _has_class(value: Any, base: type) -> bool:
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


def check_checkpoint(path: str | os.PathLike | None) -> None:
    """``--ckpt_path`` exists and is a torch checkpoint (a zip with its directory intact), or raise ``UserError``.

    A truncated or empty file lacks the zip's closing directory, so this costs a few reads,
    not a load. Folders (sharded FSDP / DeepSpeed checkpoints), URLs and Lightning's
    ``last``/``best``/``hpc``/``registry`` names are left to Lightning.
    """
    if path is None or str(path) in SPECIAL_CHECKPOINTS or "://" in str(path) or str(path).startswith("registry"):
        return
    file = Path(path)
    if not file.exists():
        raise UserError(f"--ckpt_path {path}: no such file")
    if file.is_file() and not zipfile.is_zipfile(file):
        size = file.stat().st_size
        raise UserError(f"--ckpt_path {path}: not a readable checkpoint ({size} bytes: truncated, or not a torch file)")


def _check_model_source(config: Namespace, subcommand: str) -> None:
    """Predicting needs weights: a checkpoint or a pretrained model (a random ``model_config`` alone is a mistake)."""
    model = config.model
    if subcommand == "predict" and not config.get("ckpt_path") and not model.get("pretrained"):
        raise UserError("predict needs --ckpt_path (a checkpoint of train.py) or --model.pretrained (an HF model)")


def _check_generation(model: Namespace) -> None:
    """Build the generation settings once, so their own checks fail now (jsonargparse builds them later)."""
    generation = model.get("generation")
    if isinstance(generation, Namespace) and "class_path" not in generation:
        GenerationSettings(**generation.as_dict())


def _check_data(data: Namespace, stage: str) -> None:
    """The data arguments' own checks (files exist, sources do not conflict, records read), before the model loads."""
    check_arguments(data, stage)
    check_records(data, stage)


# ----------------------------------------------------------------------------
# Entry point


def one_line(error: BaseException) -> str:
    """A user-facing error in one line; jsonargparse's nested union reports are cut to their innermost cause."""
    text = str(error).strip()
    if not isinstance(error, ArgumentError):
        return " ".join(line.strip() for line in text.splitlines())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keys, cause, class_path = [], None, None
    noise = re.compile(
        r"(Does not validate against|Subtypes:|Errors:|Given value|Expected a <class 'NoneType'>|Subclass types expect"
        r"|- a (class path|dict)|Not a valid subclass|Expected a path but)"
    )
    for line in lines:
        key = re.match(r'(?:- )?Parser key "([^"]+)":\s*(.*)', line)
        if key:
            keys.append(key.group(1))
            class_path = None  # the key names the problem better than the class that holds it
            cause = key.group(2) or cause
            continue
        problem = re.match(r"- Problem with given class_path '([^']+)':", line)
        if problem:
            class_path = problem.group(1)
            continue
        if cause is None and not noise.search(line):
            cause = line.lstrip("- ")
    if not keys:
        return lines[0] if lines else text
    where = "--" + ".".join(keys)
    subject = f"{where} ({class_path})" if class_path and "class_path" not in where else where
    return f"{subject}: {cause or lines[0]}"


def main(subcommand: str | None = None, **kwargs: Any) -> None:
    """Run the CLI on ``sys.argv``; a user mistake prints one ``error:`` line and exits with code 2.

    Args:
        subcommand: put before the command-line arguments (``predict.py`` passes ``"predict"``).
        kwargs: passed to ``DLLMCLI``.
    """
    args = sys.argv[1:]
    debug = "--debug" in args or os.environ.get("DLLM_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if subcommand is not None:
        args = [subcommand, *args]
    if not sys.stderr.isatty():  # transformers' "Loading weights" bar: carriage returns in a log file
        hf_logging.disable_progress_bar()
    if not debug:  # raise parse errors to us instead of printing the usage and a many-line report
        no_exit = {"exit_on_error": False}
        kwargs.setdefault("parser_kwargs", {**no_exit, **{name: dict(no_exit) for name in SUBCOMMANDS}})
    try:
        DLLMCLI(args=args, **kwargs)
    except (UserError, ArgumentError, ValueError) as e:
        mistake = e if isinstance(e, ArgumentError) else _user_error(e)
        if debug or mistake is None:
            raise
        print(f"error: {one_line(mistake)}", file=sys.stderr)
        sys.exit(2)


def _user_error(error: BaseException) -> UserError | None:
    """The ``UserError`` behind an error (jsonargparse wraps one raised while it builds a class), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
