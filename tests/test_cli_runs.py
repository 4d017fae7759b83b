"""train.py and predict.py on the runs a user already has: nothing replaced by something worse, nothing left
half-made, one line per mistake, and progress and messages that read right in a log file.

Each command runs as a user runs it (a subprocess, output redirected), on one tiny run trained once per module.
"""

import json
import re
import signal
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


# ----------------------------------------------------------------------------
# Stopping and resuming: SIGTERM, SIGINT, SIGKILL


def start(script: str, *args: str, cwd: Path, stderr) -> subprocess.Popen:
    """``python <script> <args>`` running in the background, stdout a pipe (read it line by line), stderr a file."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)  # fmt: skip


def wait_for(lines, pattern: str) -> str:
    """Read ``lines`` (a pipe or a file being written) until one matches ``pattern``; fails at its end."""
    for line in lines:
        if re.match(pattern, line):
            return line
    raise AssertionError(f"no line matched {pattern!r}")


def follow(path: Path, timeout: float = 240):
    """The lines of a file another process is writing, as they come."""
    import time

    deadline = time.monotonic() + timeout
    with path.open(encoding="utf-8") as f:
        while time.monotonic() < deadline:
            line = f.readline()
            if line:
                yield line
            else:
                time.sleep(0.05)


def predict_args(root: Path, prompts: Path, output: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/predict-tiny.yaml"), "--ckpt_path", str(root / "checkpoints/last.ckpt"),
            "--data.prompts_file", str(prompts), "--predictions.output", str(output), "--data.val_batch_size", "1",
            *extra]  # fmt: skip


def many_prompts(path: Path, n: int = 300) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i}+{i}="}) + "\n" for i in range(n)))
    return path


def stop_predict(args: list[str], cwd: Path, signum: int) -> tuple[subprocess.CompletedProcess, float]:
    """Start predict, send ``signum`` once it has written its first record; its result and seconds to exit."""
    import time

    log = cwd / f"predict-{signum}.log"
    with log.open("w") as stderr:
        proc = start("predict.py", *args, "--predictions.echo", "true", cwd=cwd, stderr=stderr)
        wait_for(proc.stdout, r"\[q\d+\] ")  # a record is in the shard
        sent = time.monotonic()
        proc.send_signal(signum)
        stdout, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, log.read_text()), elapsed


def test_predict_stops_on_sigterm_keeps_finished_records_and_a_rerun_resumes_them(finished, tmp_path):
    root, _ = finished
    output = tmp_path / "p.jsonl"
    args = predict_args(
        root, many_prompts(tmp_path / "prompts.jsonl"), output, "--model.generation.max_new_tokens", "32"
    )
    stopped, seconds = stop_predict(args, tmp_path, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert seconds < 20
    shard = tmp_path / "p.jsonl.rank0"
    kept = [json.loads(line) for line in shard.read_text().splitlines()]
    assert 0 < len(kept) < 300 and not output.exists()
    last = stopped.stderr.strip().splitlines()[-1]
    assert (
        last == f"stopped by SIGTERM: {len(kept)} finished predictions kept in {shard}; the same command resumes them"
    )
    again = run("predict.py", *args, "--predictions.echo", "false", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"reusing {len(kept)} predictions" in again.stderr
    records = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert len(records) == 300 and all(records[r["id"]] == r for r in kept)


def test_an_interrupted_overwrite_is_named_and_finished_by_the_next_overwrite(finished, tmp_path):
    """Stopped (SIGINT) while replacing an output: the leftover shard is named, and overwrite resumes it."""
    root, _ = finished
    output = tmp_path / "p.jsonl"
    prompts = many_prompts(tmp_path / "prompts.jsonl")
    short = run("predict.py", *predict_args(root, prompts, output, "--model.generation.max_new_tokens", "2",
                                            "--predictions.echo", "false"), cwd=tmp_path)  # fmt: skip
    assert short.returncode == 0, short.stderr[-3000:]
    args = predict_args(root, prompts, output, "--model.generation.max_new_tokens", "32")
    stopped, _ = stop_predict([*args, "--predictions.overwrite", "true"], tmp_path, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("stopped by SIGINT: ")
    shard = tmp_path / "p.jsonl.rank0"
    kept = len(shard.read_text().splitlines())
    (tmp_path / "p.jsonl.tmp").write_text('{"id": "q0"')  # as a kill during the merge leaves it
    plain = run("predict.py", *args, "--predictions.echo", "false", cwd=tmp_path)
    assert plain.returncode == 2, plain.stderr[-3000:]
    removed, error = plain.stderr.strip().splitlines()[-2:]
    assert removed.startswith(f"removed {tmp_path / 'p.jsonl.tmp'}, left by a run killed while it merged")
    assert error.startswith(f"error: {output} already holds 300 predictions that this run may not reuse: ")
    assert error.endswith(f"; {shard} holds {kept} predictions of this run, left by an interrupted "
                          "--predictions.overwrite run: pass --predictions.overwrite true to finish it "
                          "(they are reused), or choose another --predictions.output")  # fmt: skip
    again = run("predict.py", *args, "--predictions.echo", "false", "--predictions.overwrite", "true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"reusing {kept} predictions" in again.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 300 and {r["settings"]["max_new_tokens"] for r in records} == {32}
    assert not shard.exists() and not (tmp_path / "p.jsonl.tmp").exists()


def test_a_reused_record_is_scored_against_todays_reference(finished, tmp_path):
    root, _ = finished
    prompts, output = tmp_path / "prompts.jsonl", tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i}+1=", "response": "zzz"}) + "\n"
                               for i in range(3)))  # fmt: skip
    args = predict_args(root, prompts, output, "--model.generation.max_new_tokens", "4", "--predictions.echo", "false")
    first = run("predict.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((tmp_path / "p.metrics.json").read_text())["exact_match"] == 0
    responses = [json.loads(line)["response"] for line in output.read_text().splitlines()]
    # the references corrected: now each is the response the model gave
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i}+1=", "response": r}) + "\n"
                               for i, r in enumerate(responses)))  # fmt: skip
    again = run("predict.py", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing 3 predictions" in again.stderr and "exact match 100.0%" in again.stderr
    assert json.loads((tmp_path / "p.metrics.json").read_text())["exact_match"] == 1
    assert [json.loads(line)["reference"] for line in output.read_text().splitlines()] == responses


def checkpoint_at(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def test_a_fit_killed_after_a_validation_resumes_from_it(tmp_path):
    """SIGKILL (no handler runs): ``last.ckpt`` of the last validation is there, and ``--ckpt_path last`` resumes it."""
    root = tmp_path / "run"
    with (tmp_path / "fit.log").open("w") as stderr:
        proc = start("train.py", "fit", *SMALL, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "400",
                     cwd=tmp_path, stderr=stderr)  # fmt: skip
        wait_for(follow(tmp_path / "fit.log"), r"step 3/400 ")  # the validation at step 2 is over
        proc.kill()
        proc.wait(timeout=60)
    assert checkpoint_at(root / "checkpoints/last.ckpt")["global_step"] == 2
    resumed = train(root, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr
    assert checkpoint_at(root / "checkpoints/last.ckpt")["global_step"] == STEPS


def test_a_fit_stopped_by_sigterm_saves_and_exits_non_zero(tmp_path):
    root = tmp_path / "run"
    with (tmp_path / "fit.log").open("w") as stderr:
        proc = start("train.py", "fit", *SMALL, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "400",
                     "--trainer.val_check_interval", "100", cwd=tmp_path, stderr=stderr)  # fmt: skip
        wait_for(follow(tmp_path / "fit.log"), r"step 3/400 ")  # no validation yet: nothing saved so far
        proc.terminate()
        assert proc.wait(timeout=60) == 143
    last = (tmp_path / "fit.log").read_text().strip().splitlines()[-1]
    step = checkpoint_at(root / "checkpoints/last.ckpt")["global_step"]
    assert 3 <= step < 400
    assert last == f"stopped by SIGTERM: saved step {step} to {root}/checkpoints/last.ckpt; --ckpt_path last resumes it"


@pytest.mark.parametrize("ckpt", ["file", "last"])
def test_a_resume_trains_with_the_lr_of_the_command_line(finished, tmp_path, ckpt):
    """``--model.lr`` takes effect on a resume from a file and from ``last`` alike (the optimizer state kept it)."""
    root = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished[0]), str(root)], check=True)
    path = root / "checkpoints/last.ckpt"
    result = train(root, "--ckpt_path", str(path) if ckpt == "file" else "last", "--model.lr", "0.05",
                   steps=STEPS + 1)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with this run's model.lr 0.05 (the checkpoint's: 0.005)" in result.stderr
    saved = checkpoint_at(path)
    assert saved["global_step"] == STEPS + 1 and saved["hyper_parameters"]["lr"] == 0.05
    assert {g["initial_lr"] for g in saved["optimizer_states"][0]["param_groups"]} == {0.05}
    assert saved["lr_schedulers"][0]["base_lrs"] == [0.05, 0.05]


def test_a_checkpoint_of_another_architecture_is_one_line(finished, tmp_path):
    root, _ = finished
    wider = json.dumps({**SMALL_MODEL_CONFIG, "hidden_size": 48})
    path = root / "checkpoints/last.ckpt"
    result = run("train.py", "fit", *SMALL, "--model.model_config", wider, "--ckpt_path", str(path),
                 "--trainer.default_root_dir", str(tmp_path / "other"), "--trainer.max_steps", "8",
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --ckpt_path {path}: its weights do not fit this model (model.")
    assert "in the checkpoint" in last and "Traceback" not in result.stderr
