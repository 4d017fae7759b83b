"""Bad input through the real command lines: one ``error:`` line naming the argument or file, exit code 2.

Every row of ``CASES`` is a mistake a newcomer made (issue 23): each used to end in a traceback, a
misleading message or exit code 0. All rows run in one Python process (``train.py``, ``predict.py`` and the
``python -m`` tools run as ``__main__`` in turn, as the shell would start them), so the table costs one
import of torch and Lightning instead of one per row; most rows fail before any model exists. The output
rows also show that nothing is written: no run folder, no ``.rank0``/``.tmp``/``.lock`` beside the output.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_MODEL

ROOT = Path(__file__).resolve().parents[1]
FIT = ["train.py", "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.model_config", json.dumps(SMALL_MODEL),
       "--data.num_train", "16", "--data.num_val", "4", "--data.batch_size", "8", "--trainer.max_steps", "1",
       "--trainer.default_root_dir", "runs/fit"]  # fmt: skip
# predict with a model that is never loaded: every row below fails before (a hub name, no network needed)
PREDICT = ["predict.py", "--config", str(ROOT / "configs/predict-tiny.yaml"), "--model.pretrained", "no/such-model",
           "--trainer.default_root_dir", "runs/predict"]  # fmt: skip
EVAL = ["-m dllm.evaluation", "--model", "dllm", "--tasks", "dllm_addition_small", "--device", "cpu", "--limit", "1"]

# name: (argv, the start of the one error line)
CASES = {
    "dtype": ([*FIT, "--model.dtype", "bogus"], "error: --model.dtype bogus: must be one of float32"),
    "attention": ([*FIT, "--model.attn_implementation", "bogus"],
                  "error: --model.attn_implementation bogus: unknown attention; choose eager"),
    "task": ([*FIT, "--data.task", "nosuch"], "error: --data.task nosuch: unknown task 'nosuch'; known tasks:"),
    "lr": ([*FIT, "--model.lr", "-1"], "error: --model.lr -1.0: must be > 0"),
    "batch size": ([*FIT, "--data.batch_size", "0"], "error: --data.batch_size 0: must be >= 1"),
    "max steps": ([*FIT, "--trainer.max_steps", "-5"], "error: --trainer.max_steps -5: must be >= 0, or -1"),
    "lora target": ([*FIT, "--model.lora", '{"target_modules": "nonexistent"}'],
                    "error: --model.lora.target_modules nonexistent: Target modules nonexistent not found"),
    "fake parquet": ([*FIT, "--data.task", "null", "--data.train_file", "fake.parquet"],
                     "error: fake.parquet: not a readable parquet file (Parquet magic bytes not found in footer)"),
    "val fraction": ([*FIT, "--data.task", "null", "--data.train_file", "train.jsonl", "--data.val_fraction", "1.5"],
                     "error: --data.val_fraction 1.5: must be in (0, 1)"),
    "bad yaml": ([*FIT, "--config", "bad.yaml"],
                 "error: bad.yaml:3: malformed YAML: mapping values are not allowed here at column 11"),
    "too few per device": ([*FIT, "--trainer.devices", "3"],
                           "error: --data.batch_size 8: more than the 6 training examples each of 3 devices gets"),
    "output under a file": ([*PREDICT, "--data.prompt", "1+1=", "--predictions.output", "a_file/out.jsonl"],
                            "error: --predictions.output a_file/out.jsonl: a_file is a file, not a folder"),
    "output in a read-only folder": ([*PREDICT, "--data.prompt", "1+1=", "--predictions.output", "READ_ONLY/out.jsonl"],
                                     "error: --predictions.output READ_ONLY/out.jsonl: cannot write in READ_ONLY"),
    "output is a folder": ([*PREDICT, "--data.prompt", "1+1=", "--predictions.output", "a_folder"],
                           "error: --predictions.output a_folder: a folder; give a file path"),
    "output is the input": ([*PREDICT, "--data.prompts_file", "prompts.jsonl", "--predictions.output", "prompts.jsonl"],
                            "error: --predictions.output prompts.jsonl: the prompts file (--data.prompts_file) itself"),
    "prompts file is a folder": ([*PREDICT, "--data.prompts_file", "a_folder"],
                                 "error: data.prompts_file: a_folder is a folder, not a file"),
    "predict ckpt last": ([*PREDICT[:3], "--ckpt_path", "last", "--data.prompt", "1+1="],
                          "error: --ckpt_path last: predict needs a checkpoint file"),
    "eval missing model": ([*EVAL, "--model_args", "pretrained=/nonexistent"],
                           "error: --model_args pretrained=/nonexistent: no such folder"),
    "eval unknown task": ([*EVAL[:4], "dllm_nosuchtask", *EVAL[5:], "--model_args", "pretrained=no/such-model"],
                          "error: --tasks dllm_nosuchtask: no such task"),
    "eval negative block": ([*EVAL, "--model_args", "pretrained=no/such-model,add_eos_length=-1"],
                            "error: --model_args add_eos_length=-1: must be >= 0"),
    "prompts out folder": (["-m dllm.prompts", "--num", "2", "--out", "a_folder"], "error: --out a_folder: a folder"),
    "tasks out folder": (["-m dllm.tasks", "--task", "addition", "--split", "train", "--num", "2", "--out", "a_folder"],
                         "error: --out a_folder: a folder"),
    "models out file": (["-m dllm.models", "smollm2", "--out", "a_file"], "error: --out a_file: a file, not a folder"),
}  # fmt: skip

# Runs each case as the shell would (a script or ``-m`` module as ``__main__``), capturing its stderr and exit code.
RUNNER = r"""
import contextlib, io, json, runpy, sys, traceback
cases_file, results_file = sys.argv[1:3]
cases, results = json.load(open(cases_file)), {}
for name, argv in cases.items():
    err, code = io.StringIO(), 0
    sys.argv = [argv[0].removeprefix("-m "), *argv[1:]]
    with contextlib.redirect_stderr(err):
        try:
            if argv[0].startswith("-m "):
                runpy.run_module(argv[0][3:], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = {"code": code, "stderr": err.getvalue()}
json.dump(results, open(results_file, "w"))
"""


def read_only_folder(work: Path) -> Path:
    """A folder no file can be created in: a mode-555 folder, or (root ignores modes) ``/sys``."""
    folder = work / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root
        folder.chmod(0o755)
        folder.rmdir()
        if not Path("/sys").is_dir():
            pytest.skip("no folder is read-only for this user")
        return Path("/sys")
    return folder


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case run once in a work folder holding the inputs; returns (results, files before, files after)."""
    pytest.importorskip("lm_eval")
    work = tmp_path_factory.mktemp("work")
    for name in ("train.py", "predict.py"):
        (work / name).symlink_to(ROOT / name)
    (work / "a_file").write_text("x\n")
    (work / "a_folder").mkdir()
    (work / "fake.parquet").write_text("not parquet\n")
    (work / "bad.yaml").write_text("trainer:\n  max_steps: 3\n   devices: 1\n")  # line 3: an indented key
    (work / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "response": "x"}) + "\n" for i in range(3))
    )
    (work / "prompts.jsonl").write_text(json.dumps({"id": "a", "prompt": "1+1="}) + "\n")
    read_only = read_only_folder(work)
    cases = {name: [a.replace("READ_ONLY", str(read_only)) for a in argv] for name, (argv, _) in CASES.items()}
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    files = tmp_path_factory.mktemp("io")
    (files / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", RUNNER, files / "cases.json", files / "results.json"], cwd=work, env=env,
                   check=True, timeout=600)  # fmt: skip
    after = sorted(p.relative_to(work) for p in work.rglob("*"))
    return json.loads((files / "results.json").read_text()), before, after, str(read_only)


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_is_one_error_line_naming_it_and_exit_code_2(outcomes, name):
    results, _, _, read_only = outcomes
    expected = CASES[name][1].replace("READ_ONLY", read_only)
    result = results[name]
    assert result["code"] == 2 and "Traceback" not in result["stderr"], result["stderr"][-3000:]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), result["stderr"][-3000:]


def test_no_mistake_leaves_a_file_behind(outcomes):
    """No run folder, no predictions shard, temp file or lock: the outputs were checked before any work."""
    _, before, after, _ = outcomes
    assert after == before


def test_the_dtype_names_checked_early_are_the_ones_the_module_loads():
    from dllm.checks import DTYPE_NAMES
    from dllm.module import DTYPES

    assert set(DTYPE_NAMES) == set(DTYPES)
