"""train.py and predict.py on the runs a user already has: nothing replaced by something worse, nothing left
half-made, one line per mistake, and progress and messages that read right in a log file.

Each command runs as a user runs it (a subprocess, output redirected), on one tiny run trained once per module.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import SMALL_MODEL as SMALL_MODEL_CONFIG

from dllm.cli import DLLMCLI

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = json.dumps(SMALL_MODEL_CONFIG)
STEPS = 4
# the shipped tiny config, shortened: a validation every 2 steps, a progress line every step
SMALL = ["--config", str(ROOT / "configs/tiny.yaml"), "--model.model_config", SMALL_MODEL, "--data.num_train", "32",
         "--data.num_val", "4", "--data.batch_size", "8", "--trainer.log_every_n_steps", "1",
         "--trainer.val_check_interval", "2", "--model.val_max_new_tokens", "8"]  # fmt: skip


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python <script> <args>`` with stdout and stderr redirected (not a terminal), as in a log file."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def train(root: Path, *extra: str, steps: int = STEPS) -> subprocess.CompletedProcess:
    return run("train.py", "fit", *SMALL, "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
               *extra, cwd=root.parent)  # fmt: skip


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a run folder: its modification time and bytes."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single line a command printed after Lightning's startup lines; fails when there is more."""
    lines = [x for x in result.stderr.splitlines() if not re.match(r"(Seed set to|GPU available|TPU available)", x)]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A run of STEPS steps that reached its max_steps, and what train.py printed."""
    root = tmp_path_factory.mktemp("finished") / "run"
    result = train(root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_progress_lines_show_validation_numbers_once(finished):
    """Each validation's numbers are printed in its own line, not again in every training line after it."""
    _, result = finished
    lines = result.stderr.splitlines()
    validations = [x for x in lines if x.startswith("validation at step")]
    steps = [x for x in lines if re.match(r"step \d+/\d+ ", x)]
    assert len(validations) == 2 and all("val/loss" in x and "val/exact_match" in x for x in validations)
    assert len(steps) == STEPS and all("train/loss" in x for x in steps)
    assert not [x for x in steps if "val/" in x], steps


def test_the_exported_weights_are_readable_like_the_other_files(finished):
    """model.safetensors gets the umask's mode like config.json (safetensors alone writes it 0600)."""
    root, _ = finished
    modes = {p.name: p.stat().st_mode & 0o777 for p in (root / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes  # the suite runs under umask 022


def test_a_fit_that_trains_no_step_keeps_the_export_and_says_so(finished, tmp_path):
    root = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished[0]), str(root)], check=True)
    before = snapshot(root)
    result = train(root, steps=0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(root) == before  # hf/, last.ckpt and the logs as they were; no empty version_1
    assert re.search(r"no HF export: this fit trained no step \(trainer.max_steps=0\); \S+/hf is left as it was",
                     result.stderr), result.stderr[-3000:]  # fmt: skip


def test_resuming_a_finished_run_says_how_to_extend_it_and_changes_nothing(finished, tmp_path):
    root = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished[0]), str(root)], check=True)
    before = snapshot(root)
    result = train(root, "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    line = one_line(result)
    assert f"already reached trainer.max_steps={STEPS}" in line and "--trainer.max_steps 8 --ckpt_path last" in line
    assert snapshot(root) == before  # not re-exported, no lightning_logs/version_1
    longer = train(root, "--ckpt_path", "last", "--trainer.enable_progress_bar", "false", steps=STEPS + 1)
    assert longer.returncode == 0, longer.stderr[-3000:]  # the advice works: one more step, then a new export
    assert snapshot(root)["hf/model.safetensors"] != before["hf/model.safetensors"]


IN_FOLDER = "a folder, not a checkpoint file; the checkpoint in it is {root}/checkpoints/last.ckpt"


@pytest.mark.parametrize(
    "script, ckpt, problem",
    [
        ("train.py", "checkpoints", IN_FOLDER),
        ("predict.py", "checkpoints", IN_FOLDER),
        ("train.py", "last", "not a readable checkpoint (5000 bytes: truncated, or not a torch file)"),
    ],
)
def test_a_bad_ckpt_path_is_one_line_naming_it(finished, tmp_path, script, ckpt, problem):
    root = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished[0]), str(root)], check=True)
    last = root / "checkpoints" / "last.ckpt"
    if ckpt == "last":
        last.write_bytes(last.read_bytes()[:5000])  # a copy cut short (a full disk, a killed rsync)
    before = snapshot(root)
    if script == "train.py":
        args = ("--ckpt_path", ckpt if ckpt == "last" else str(root / ckpt))
        result = train(root, *args, steps=2 * STEPS)
    else:
        result = run("predict.py", "--config", str(ROOT / "configs/predict-tiny.yaml"), "--ckpt_path",
                     str(root / ckpt), "--data.prompt", "1+2=", cwd=tmp_path)  # fmt: skip
    shown = f"last ({last})" if ckpt == "last" else str(root / ckpt)
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_line(result) == f"error: --ckpt_path {shown}: {problem.format(root=root)}"
    assert snapshot(root) == before  # no empty lightning_logs/version_1


class CrashAtStart(L.Callback):
    """A run that fails once it has started (out of memory, a bad batch, a killed worker)."""

    def on_train_start(self, trainer, pl_module):
        raise RuntimeError("crash")


def test_a_failed_run_leaves_no_empty_log_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        DLLMCLI(
            args=["fit", *SMALL, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2",
                  "--trainer.enable_progress_bar", "false"],
            trainer_defaults={"callbacks": [CrashAtStart()]},
        )  # fmt: skip
    assert not (root / "lightning_logs").exists(), sorted(str(p) for p in root.rglob("*"))


def test_predict_that_reuses_every_record_prints_its_summary_last(finished, tmp_path):
    root, _ = finished
    args = ["--config", str(ROOT / "configs/predict-tiny.yaml"), "--ckpt_path", str(root / "checkpoints/last.ckpt"),
            "--data.prompt", "1+2=", "--data.prompt+", "3+4=", "--predictions.output", str(tmp_path / "p.jsonl"),
            "--model.generation.max_new_tokens", "4"]  # fmt: skip
    first = run("predict.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run("predict.py", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing 2 predictions" in again.stderr and "predicted batch" not in again.stderr
    assert again.stderr.strip().splitlines()[-1] == f"wrote 2 predictions to {tmp_path / 'p.jsonl'}", again.stderr
