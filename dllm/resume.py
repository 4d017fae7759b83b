"""``ResumePoint``: a fit always leaves a ``last.ckpt`` that ``--ckpt_path last`` resumes.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when it saves another
checkpoint: with ``save_top_k: 0`` (only ``last.ckpt``) that is at the end of fit, and with a monitored
``save_top_k`` only when the metric improved, so a run killed after hours could leave nothing. The CLI
adds this callback to every fit; it

- saves ``last.ckpt`` of each ``ModelCheckpoint`` with ``save_last`` after every validation (where
  that callback did not just save it), so SIGKILL loses at most the steps since the last validation;
- on SIGTERM or SIGINT (``dllm.interrupts``) lets the current optimizer step finish, saves
  ``last.ckpt``, and stops with exit code 143 / 130;
- on a resume, puts the optimizer settings of this run (``model.lr``, ``model.betas``,
  ``model.weight_decay``) over the ones restored from the checkpoint's optimizer state, which
  Lightning would otherwise keep silently: what the config and command line say is what trains.

The save after a validation runs right after each ``ModelCheckpoint``'s own ``on_validation_end``
(wrapped at setup), so that callback still decides its top-k first: saving before it would mark the step
as saved and skip its best-checkpoint save. (A ``Checkpoint`` subclass would run last too, but then
Lightning adds no default ``ModelCheckpoint`` and refuses ``enable_checkpointing: false``.)
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dllm import interrupts


class ResumePoint(Callback):
    """Save ``last.ckpt`` at each validation and on SIGTERM/SIGINT; apply this run's optimizer settings on resume."""

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trainer = trainer
            interrupts.state.on_signal = self._stop_after_step
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.save_last:
                    _save_last_after_validation(callback)

    def _stop_after_step(self, signum: int) -> bool:
        """The first signal: ask Lightning to stop after this step (its SIGTERM flag), which raises
        ``SIGTERMException`` at the step's end on every rank; ``on_exception`` then saves."""
        self._trainer._signal_connector.received_sigterm = True
        return True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:
            _apply_optimizer_settings(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        interrupts.state.on_signal = None
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            if isinstance(exception, interrupts.Stopped):
                interrupts.state.notes.append(
                    "stopped at once (a second signal); --ckpt_path last resumes the last save"
                )
            return
        if trainer.sanity_checking or trainer.global_step == 0 or trainer.fast_dev_run:
            interrupts.state.notes.append("no step was trained, nothing saved")
            return
        paths = save_last(trainer)
        if paths:
            where = ", ".join(paths)
            interrupts.state.notes.append(f"saved step {trainer.global_step} to {where}; --ckpt_path last resumes it")
        else:
            interrupts.state.notes.append("no ModelCheckpoint with save_last, nothing saved")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        interrupts.state.on_signal = None


def _save_last_after_validation(callback: ModelCheckpoint) -> None:
    """Make ``callback`` write ``last.ckpt`` at the end of every validation of a fit, after its own saving."""
    if getattr(callback, "_saves_last_after_validation", False):
        return
    own = callback.on_validation_end

    def on_validation_end(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        own(trainer, pl_module)
        if not trainer.sanity_checking and trainer.state.fn == "fit" and not trainer.fast_dev_run:
            save_last(trainer, [callback])

    callback.on_validation_end = on_validation_end
    callback._saves_last_after_validation = True


def save_last(trainer: L.Trainer, callbacks: list | None = None) -> list[str]:
    """Write ``last.ckpt`` of each ``ModelCheckpoint`` with ``save_last`` not yet saved at this step; their paths.

    Uses the callback's own ``_save_last_checkpoint`` (its file name, version counter and bookkeeping),
    so Lightning's ``--ckpt_path last`` finds the file. Every rank calls it (saving is collective).

    Args:
        trainer: the fitting trainer.
        callbacks: the ``ModelCheckpoint`` callbacks to save (default: all of the trainer's).
    """
    paths = []
    for callback in trainer.checkpoint_callbacks if callbacks is None else callbacks:
        if not isinstance(callback, ModelCheckpoint) or not callback.save_last:
            continue
        if callback._last_global_step_saved != trainer.global_step:  # else it saved last.ckpt itself at this step
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
        if callback.last_model_path:
            paths.append(str(callback.last_model_path))
    return paths


def _apply_optimizer_settings(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Put this run's lr, betas and weight decay over the ones restored from the checkpoint.

    ``configure_optimizers`` is called again for a fresh optimizer and schedule (no state): their group
    settings and the schedule's base rates replace the restored ones; the moments and the step stay.
    """
    fresh = pl_module.configure_optimizers()
    optimizer = fresh["optimizer"] if isinstance(fresh, dict) else fresh
    schedule = fresh.get("lr_scheduler") if isinstance(fresh, dict) else None
    schedule = schedule.get("scheduler") if isinstance(schedule, dict) else schedule
    if len(trainer.optimizers) != 1:
        return
    restored = trainer.optimizers[0]
    if len(restored.param_groups) != len(optimizer.param_groups):
        return
    changes = {}
    for old, new in zip(restored.param_groups, optimizer.param_groups):
        for key in ("betas", "weight_decay"):
            if key in new and old.get(key) != new[key]:
                changes.setdefault(key, (old.get(key), new[key]))
                old[key] = new[key]
        base = new.get("initial_lr", new["lr"])
        if old.get("initial_lr", old["lr"]) != base:
            changes.setdefault("lr", (old.get("initial_lr", old["lr"]), base))
            old["initial_lr"] = base
    configs = trainer.lr_scheduler_configs
    if schedule is not None and len(configs) == 1 and hasattr(configs[0].scheduler, "base_lrs"):
        restored_schedule = configs[0].scheduler
        restored_schedule.base_lrs = list(schedule.base_lrs)
        lambdas = getattr(restored_schedule, "lr_lambdas", None)
        if lambdas is not None:  # LambdaLR: the rate at the restored step from the new base rate
            step = restored_schedule.last_epoch
            for group, base, factor in zip(restored.param_groups, restored_schedule.base_lrs, lambdas):
                group["lr"] = base * factor(step)
    elif "lr" in changes:
        for group, new in zip(restored.param_groups, optimizer.param_groups):
            group["lr"] = new["lr"]
    if changes:
        said = ", ".join(f"model.{k} {new!r} (the checkpoint's: {old!r})" for k, (old, new) in changes.items())
        rank_zero_info(f"resumed from {trainer.ckpt_path} with this run's {said}")


# ----------------------------------------------------------------------------
# What a checkpoint gives a fit's settings


def unset_settings(path: Path, model: Any) -> dict[str, Any]:
    """The checkpoint's saved model settings for the keys ``model`` (the fit's config) leaves at their defaults.

    Lightning puts every saved hyperparameter of a checkpoint *file* over the config and the command line
    (``--model.lr 0.5`` silently trained with the saved rate) and none for ``last``. The CLI reads both
    the same way with this: a value the config or the command line sets (one that differs from
    ``DLLMModule``'s default) wins; the rest come from the checkpoint, so a bare
    ``fit --ckpt_path <file>`` still rebuilds the model it was trained with. A sharded folder or a URL
    gives nothing here.
    """
    if not path.is_file():
        return {}
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # only the small pickle is read
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    defaults = module_defaults()
    return {k: v for k, v in hparams.items() if k in defaults and plain(model.get(k)) == plain(defaults[k])}


def module_defaults() -> dict[str, Any]:
    """``DLLMModule``'s argument defaults: a fit setting equal to its default is one the run leaves unset."""
    from dllm.module import DLLMModule

    parameters = inspect.signature(DLLMModule.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def plain(value: Any) -> Any:
    """A config value in comparable form: namespaces as dicts, tuples as lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def weights_mismatch(error: BaseException) -> str | None:
    """The first problem of torch's ``load_state_dict`` report (a size mismatch, missing or unexpected keys)."""
    text = str(error)
    if "Error(s) in loading state_dict" not in text:
        return None
    size = re.search(r"size mismatch for ([^:]+): copying a param with shape (\S+) from checkpoint, "
                     r"the shape in current model is (\S+?)\.?$", text, re.M)  # fmt: skip
    if size:
        return f"{size.group(1)} is {size.group(2)} in the checkpoint, {size.group(3)} in this model"
    keys = re.search(r"(Missing|Unexpected) key\(s\) in state_dict: \"([^\"]+)\"", text)
    if keys:
        where = "missing from the checkpoint" if keys.group(1) == "Missing" else "not in this model"
        return f"{keys.group(2)} is {where}"
    return text.splitlines()[0]
