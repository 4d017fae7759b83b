"""``DLLMCLI``: the one LightningCLI behind ``train.py`` and ``predict.py``.

On top of Lightning's CLI it

- links the model's tokenizer into the DataModule (known only once the model is
  built) and adds the JSONL prediction writer (``--predictions.*``);
- derives every path of a run from ``--trainer.default_root_dir`` unless a path
  is set explicitly: checkpoints in ``<root>/checkpoints``, logs in ``<root>``,
  the HF export in ``<root>/hf``, predictions in ``<root>/predictions.jsonl``;
- checks the checkpoint, the data arguments, the settings and predict's output
  (``dllm.preflight``, ``dllm.checks``) before any model loads, and stops
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

import logging
import os
import re
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from transformers.utils import logging as hf_logging

from dllm import interrupts
from dllm.callbacks import LineProgress, PredictionWriter
from dllm.checks import config_file_error
from dllm.data import DLLMDataModule
from dllm.errors import UserError
from dllm.module import DLLMModule
from dllm.preflight import (
    NothingToTrain,
    check_checkpoint,
    check_data,
    check_early,
    check_generation,
    check_model_source,
    check_resume,
    derive_run_paths,
    has_class,
    last_checkpoint,
)
from dllm.resume import ResumePoint, unset_settings, weights_mismatch

SUBCOMMANDS = ("fit", "validate", "test", "predict")
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
            check_model_source(self.config[subcommand], subcommand)
            if subcommand in ("fit", "validate", "predict"):
                check_generation(self.config[subcommand].model)
                check_data(self.config[subcommand].data, subcommand)
                check_early(self.config[subcommand], subcommand)
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
            if not has_class(config.trainer.get("callbacks"), ModelCheckpoint):
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
