"""``DLLMCLI``: the one LightningCLI behind ``train.py`` and ``predict.py``.

On top of Lightning's CLI it

- links the model's tokenizer into the DataModule (known only once the model is
  built) and adds the JSONL prediction writer (``--predictions.*``);
- derives every path of a run from ``--trainer.default_root_dir`` unless a path
  is set explicitly: checkpoints in ``<root>/checkpoints``, logs in ``<root>``,
  the HF export in ``<root>/hf``, predictions in ``<root>/predictions.jsonl``;
- checks the checkpoint, the data arguments, the settings and predict's output
  (``dllm.checks``) before any model loads, and stops
  a resume that has nothing left to train (``NothingToTrain``);
- removes a log folder a run created but logged nothing into (a run that failed or
  trained nothing leaves no empty ``lightning_logs/version_N``);
- keeps runs quiet (Lightning's tips, a torch deprecation inside Lightning) and
  prints progress as plain lines when stderr is not a terminal.

``main()`` is the entry point: a user mistake (``UserError``, a bad flag) prints
one ``error:`` line and exits with code 2; a resume of a finished run prints one line
and exits with code 0; ``--debug`` (or ``DLLM_DEBUG=1``) keeps the traceback and
jsonargparse's full message. SIGTERM and SIGINT stop a run as ``dllm.interrupts`` describes (one line,
exit code 143 / 130); every fit gets ``dllm.resume.ResumePoint`` (``last.ckpt`` at each validation and on
those signals, this run's optimizer settings on a resume).
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from transformers.utils import logging as hf_logging

from dllm import interrupts
from dllm.callbacks import LineProgress, PredictionWriter
from dllm.checks import check_prediction_output, check_settings, config_file_error
from dllm.data import DLLMDataModule
from dllm.data.records import check_arguments, check_records
from dllm.errors import UserError
from dllm.module import DLLMModule, GenerationSettings
from dllm.resume import ResumePoint, unset_settings, weights_mismatch

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# --ckpt_path values Lightning resolves itself (not files)
SPECIAL_CHECKPOINTS = ("last", "best", "hpc")
# model options that say how to run the weights of a --ckpt_path: a value given on the command line wins
RUNTIME_MODEL_KEYS = ("dtype", "attn_implementation")
# what a log folder holds before anything is logged (LightningCLI's config, the logger's hyperparameters)
UNLOGGED_FILES = {"config.yaml", "hparams.yaml"}

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


class NothingToTrain(Exception):
    """``fit`` would resume from a checkpoint that already reached ``trainer.max_steps``.

    Raised before any model loads; ``main`` prints the message as one line and exits with code 0
    (the run is complete), without touching the checkpoint, the HF export or the logs.
    """


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
                _check_early(self.config[subcommand], subcommand)
            if subcommand == "fit":
                derive_run_paths(self.config.fit.trainer)  # where ``last`` is
                check_resume(self.config.fit)

    def _parse_ckpt_path(self) -> None:
        # Lightning puts the checkpoint's hyperparameters over the command line; how to run the weights
        # (--model.dtype, --model.attn_implementation) is the user's choice when given, not the checkpoint's.
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        given = {k: model.get(k) for k in RUNTIME_MODEL_KEYS if model.get(k) is not None} if model else {}
        try:
            if subcommand == "fit":
                self._fill_from_checkpoint()
                return
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
        if self.subcommand == "fit" and not any(isinstance(c, ResumePoint) for c in callbacks):
            # every fit leaves a resumable last.ckpt at each validation and on SIGTERM/SIGINT
            kwargs["callbacks"] = [*kwargs.get("callbacks", callbacks), ResumePoint()]
        return super().instantiate_trainer(**kwargs)

    def _fill_from_checkpoint(self) -> None:
        """``fit --ckpt_path`` (a file or ``last``): the checkpoint fills the model settings this run leaves unset."""
        arg = self.config.fit.get("ckpt_path")
        path = last_checkpoint(self.config.fit.trainer) if str(arg) == "last" else Path(arg) if arg else None
        unset = unset_settings(path, self.config.fit.model) if path is not None else {}
        if unset:
            self.config = self.parser.parse_object({"fit": {"model": unset}}, self.config)

    def _run_subcommand(self, subcommand: str) -> None:
        new_folders = [f for f in _log_folders(self.trainer) if not f.exists()]
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as e:  # a checkpoint of another model: one line, not torch's report of every tensor
            mismatch = weights_mismatch(e)
            if mismatch is None:
                raise
            arg = self.config[subcommand].get("ckpt_path")
            raise UserError(
                f"--ckpt_path {arg}: its weights do not fit this model ({mismatch}); give the model settings it "
                "was trained with (e.g. the same --config), or another checkpoint"
            ) from e
        finally:  # also when the run failed: an empty version_N only hides the previous run's logs
            for folder in new_folders:
                remove_if_unlogged(folder)


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


def _log_folders(trainer) -> list[Path]:
    """The local folders the trainer's loggers write to (on rank 0; the other ranks write none)."""
    if not trainer.is_global_zero:
        return []
    folders = []
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)  # CSV and TensorBoard loggers; remote loggers have none
        if isinstance(log_dir, str) and "://" not in log_dir:
            folders.append(Path(log_dir))
    return folders


def remove_if_unlogged(folder: Path) -> None:
    """Remove ``folder`` (and its parent if that is left empty) when it holds only ``UNLOGGED_FILES``."""
    if not folder.is_dir() or not all(f.is_file() and f.name in UNLOGGED_FILES for f in folder.iterdir()):
        return
    shutil.rmtree(folder)
    if not any(folder.parent.iterdir()):
        folder.parent.rmdir()


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


def _check_early(config: Namespace, subcommand: str) -> None:
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
    previous = interrupts.install()  # SIGTERM/SIGINT: stop soon, keep what is finished, exit 143/130
    try:
        DLLMCLI(args=args, **kwargs)
    except (interrupts.Stopped, SIGTERMException) as e:
        interrupts.exit_stopped(e, rank_zero_only.rank == 0)
    except NothingToTrain as e:
        if rank_zero_only.rank == 0:  # under torchrun every rank got here
            print(str(e), file=sys.stderr)
    except (UserError, ArgumentError, ValueError) as e:
        mistake = e if isinstance(e, ArgumentError) else _user_error(e)
        if isinstance(e, ArgumentError) and str(e).startswith("Problems parsing config"):
            mistake = config_file_error(args) or mistake  # jsonargparse names neither the file nor its line
        if debug or mistake is None:
            raise
        if rank_zero_only.rank == 0:  # every rank of a multi-device run gets the same mistake: say it once
            print(f"error: {one_line(mistake)}", file=sys.stderr)
        sys.exit(2)
    finally:
        interrupts.restore(previous)


def _user_error(error: BaseException) -> UserError | None:
    """The ``UserError`` behind an error (jsonargparse wraps one raised while it builds a class), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
