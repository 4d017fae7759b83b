"""The capability layout (issue 24) keeps the old public names: modules, class paths, commands."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from dllm._moved import MOVED

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_name_is_the_new_module(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


@pytest.mark.parametrize(
    "path",
    [
        "dllm.module.DLLMModule",
        "dllm.data.DLLMDataModule",
        "dllm.callbacks.SampleGeneration",
        "dllm.callbacks.HFExport",
        "dllm.callbacks.PredictionWriter",
        "dllm.generation.iterative_generate",
        "dllm.strategies.HFBlockFSDPStrategy",
    ],
)
def test_public_class_paths_still_resolve(path: str) -> None:
    module, _, name = path.rpartition(".")
    assert getattr(importlib.import_module(module), name)


def test_the_old_prompts_command_still_runs(tmp_path: Path) -> None:
    out = tmp_path / "prompts.jsonl"
    command = [sys.executable, "-m", "dllm.prompts", "--split", "test", "--num", "2", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert len(out.read_text().splitlines()) == 2
