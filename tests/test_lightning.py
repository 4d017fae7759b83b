"""The Lightning package end to end on CPU: fit, resume, predict, export, configs, bad files."""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import SMALL_MODEL
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from dllm.callbacks import HFExport
from dllm.cli import DLLMCLI
from dllm.data import DLLMDataModule
from dllm.generation import GenerationSettings
from dllm.module import DLLMModule
from dllm.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
SMALL_ARGS = [
    "--model.model_config", json.dumps(SMALL_MODEL),
    "--data.num_train", "64", "--data.num_val", "8", "--data.batch_size", "8",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Relative paths in the shipped configs (runs/tiny/...) land in the test's folder."""
    monkeypatch.chdir(tmp_path)


def run_cli(args: list[str], tmp_path: Path) -> DLLMCLI:
    return DLLMCLI(args=args + ["--trainer.default_root_dir", str(tmp_path)], run=True)


def fit_small(tmp_path: Path, steps: int = 2) -> Path:
    """Fit a few steps through the CLI with the tiny config; returns the last checkpoint."""
    ckpt_dir = tmp_path / "ckpt"
    run_cli(
        ["fit", "--config", str(ROOT / "configs/tiny.yaml"), *SMALL_ARGS,
         "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
         "--trainer.logger", "false", "--trainer.callbacks", json.dumps(
             [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
               "init_args": {"dirpath": str(ckpt_dir), "save_last": True, "save_top_k": 0}}])],
        tmp_path,
    )  # fmt: skip
    return ckpt_dir / "last.ckpt"


def test_fit_fast_dev_run(tmp_path):
    cli = run_cli(
        ["fit", "--config", str(ROOT / "configs/tiny.yaml"), *SMALL_ARGS, "--trainer.fast_dev_run", "2"], tmp_path
    )
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"train/loss_round0", "train/loss_round1", "train/noise_ratio", "val/loss"} <= set(metrics)
    assert 0 <= metrics["val/exact_match"] <= 1 and metrics["val/tokens_per_forward"] >= 1
    assert metrics["val/tokens_per_s"] > 0


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def _trainer(tmp_path, max_steps, callbacks):
    return L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks,
    )  # fmt: skip


class StopAt(L.Callback):
    """Simulate a killed run: stop after ``step`` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("stop_at", [3, 8])  # mid-epoch and at the epoch boundary (8 batches per epoch)
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, stop_at):
    def parts():
        L.seed_everything(0)
        module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", warmup_steps=2)
        data = DLLMDataModule(task="addition", num_train=64, num_val=8, batch_size=8, tokenizer=module.tokenizer)
        return module, data

    full = LossRecorder()
    module, data = parts()
    _trainer(tmp_path / "a", 12, [full]).fit(module, data)

    first = LossRecorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="stop", every_n_train_steps=stop_at, save_top_k=-1)
    module, data = parts()
    _trainer(tmp_path / "b", 12, [first, checkpoint, StopAt(stop_at)]).fit(module, data)

    resumed = LossRecorder()
    module, data = parts()
    torch.manual_seed(123)  # a different global RNG state must not matter
    _trainer(tmp_path / "c", 12, [resumed]).fit(module, data, ckpt_path=tmp_path / "stop.ckpt")

    assert sorted(first.losses) == list(range(1, stop_at + 1))
    assert sorted(resumed.losses) == list(range(stop_at + 1, 13))
    for step, loss in {**first.losses, **resumed.losses}.items():
        assert loss == pytest.approx(full.losses[step], rel=1e-6), step


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fit_small(tmp_path_factory.mktemp("fit"))


def write_prompts(path: Path, n: int) -> list[str]:
    records = [{"id": f"p{i}", "prompt": f"{i}+{2 * i}="} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [r["id"] for r in records]


def predict(tmp_path, checkpoint, prompts: Path, output: Path, *extra: str) -> list[dict]:
    run_cli(
        ["predict", "--config", str(ROOT / "configs/predict-tiny.yaml"), "--ckpt_path", str(checkpoint),
         "--data.prompts_file", str(prompts), "--predictions.output", str(output), "--predictions.echo", "false",
         "--data.val_batch_size", "3", "--model.generation.max_new_tokens", "12", *extra],
        tmp_path,
    )  # fmt: skip
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_predict_writes_every_prompt_once_in_input_order(tmp_path, checkpoint):
    ids = write_prompts(tmp_path / "prompts.jsonl", 7)
    records = predict(tmp_path, checkpoint, tmp_path / "prompts.jsonl", tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == ids
    for r in records:
        assert {"id", "prompt", "response", "new_tokens", "finish_reason", "forwards", "settings"} <= set(r)
        assert 1 <= r["new_tokens"] <= 12 and r["finish_reason"] in ("eos", "length") and r["forwards"] >= 1
    assert not list(tmp_path.glob("out.jsonl.rank*"))  # shards merged and removed


def test_predict_with_ckpt_path_honours_command_line_generation_settings(tmp_path, checkpoint):
    """Jacobi sampling from the command line really runs: it draws exactly what one-token sampling draws
    (same seed, same prompt ids), while refine with the same N writes other text in N + 1 tokens per forward."""
    write_prompts(tmp_path / "prompts.jsonl", 4)
    common = ["--model.generation.max_new_tokens", "9", "--model.generation.temperature", "0.5"]
    jacobi = predict(
        tmp_path, checkpoint, tmp_path / "prompts.jsonl", tmp_path / "jacobi.jsonl", *common,
        "--model.generation.mode", "jacobi", "--model.generation.add_eos_length", "6",
    )  # fmt: skip
    settings = jacobi[0]["settings"]
    assert (settings["mode"], settings["add_eos_length"], settings["max_new_tokens"]) == ("jacobi", 6, 9)
    assert settings["temperature"] == 0.5
    assert all(r["new_tokens"] <= 9 for r in jacobi)
    one_by_one = predict(
        tmp_path, checkpoint, tmp_path / "prompts.jsonl", tmp_path / "plain.jsonl", *common,
        "--model.generation.mode", "refine", "--model.generation.add_eos_length", "0",
        "--model.generation.refine_iter", "1",
    )  # fmt: skip
    assert [r["response"] for r in jacobi] == [r["response"] for r in one_by_one]
    assert all(r["forwards"] == r["new_tokens"] for r in one_by_one)
    refine = predict(
        tmp_path, checkpoint, tmp_path / "prompts.jsonl", tmp_path / "refine.jsonl", *common,
        "--model.generation.mode", "refine", "--model.generation.add_eos_length", "6",
        "--model.generation.refine_iter", "1",
    )  # fmt: skip
    assert all(r["forwards"] == -(-r["new_tokens"] // 7) for r in refine)  # ceil(new_tokens / (N + 1))
    assert [r["response"] for r in refine] != [r["response"] for r in jacobi]


def test_hf_export_round_trips(tmp_path):
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte")
    data = DLLMDataModule(task="addition", num_train=16, num_val=4, batch_size=8, tokenizer=module.tokenizer)
    export = tmp_path / "hf"
    _trainer(tmp_path, 1, [HFExport(str(export))]).fit(module, data)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, module.model.eval()(ids).logits, atol=1e-6)
    messages = [{"role": "user", "content": "1+1="}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "Q: 1+1=\nA: "


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config, capsys):
    subcommand = "predict" if config.name.startswith("predict") else "fit"
    with pytest.raises(SystemExit) as exit_info:
        DLLMCLI(args=[subcommand, "--config", str(config), "--print_config"], run=True)
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


def test_generation_settings_reach_generate(tmp_path):
    """The mode reaches the engine: jacobi writes HF greedy's text; refine (N=2, R=1) its own, 3 tokens a forward."""
    torch.manual_seed(0)
    settings = GenerationSettings(mode="jacobi", add_eos_length=2, max_new_tokens=8)
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", generation=settings).double().eval()
    data = DLLMDataModule(prompts_file=str(ROOT / "examples/prompts.txt"), tokenizer=module.tokenizer)
    data.setup("predict")
    batch = data._collate()(data.predict_set.items)
    jacobi = module.generate_records(batch)
    assert len(jacobi) == len(data.predict_set) and all(r["new_tokens"] <= 8 for r in jacobi)
    greedy = module.model.generate(
        input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], do_sample=False, max_new_tokens=8,
        eos_token_id=module.stop_ids, pad_token_id=module.tokenizer.pad_token_id,
    )[:, batch["prompt_ids"].size(1) :]  # fmt: skip
    for record, row in zip(jacobi, greedy.tolist()):
        stop = next((i for i, t in enumerate(row) if t in module.stop_ids), len(row))
        assert record["response"] == module.tokenizer.decode(row[:stop])
    refine = module.generate_records(batch, mode="refine", refine_iter=1)
    assert all(r["forwards"] == -(-r["new_tokens"] // 3) for r in refine)  # ceil(new_tokens / (N + 1))
    assert [r["response"] for r in refine] != [r["response"] for r in jacobi]


def test_readme_demo_command_runs(tmp_path):
    """`make demo` (shortened) on a copy of the repo's entry points, with this environment's venv."""
    for name in ("Makefile", "train.py", "predict.py", "pyproject.toml", "constraints-cpu.txt"):
        shutil.copy2(ROOT / name, tmp_path / name)
    for folder in ("configs", "examples"):
        shutil.copytree(ROOT / folder, tmp_path / folder, copy_function=shutil.copy2)
    venv = Path(sys.prefix)
    # never let make (re)run setup here: `pip install -e .` from this copy would repoint the shared venv's dllm
    cmd = [
        "make",
        "demo",
        f"VENV={venv}",
        f"PY={sys.executable}",
        "STEPS=10",
        "-o",
        "setup",
        "-o",
        f"{venv}/.installed",
    ]
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    result = subprocess.run(cmd + ["--no-print-directory"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "runs/tiny/predictions.jsonl").read_text().splitlines()]
    prompts = [x for x in (ROOT / "examples/prompts.txt").read_text().splitlines() if x.strip()]
    assert [r["prompt"] for r in records] == prompts
    assert "tokens/forward" in result.stdout
    assert (tmp_path / "runs/tiny/hf/config.json").exists()
    assert "step 10/10" in result.stderr  # progress as plain lines when output is not a terminal
    output = result.stdout + result.stderr
    noise = ["not recommended", "No seed found", "Tip:", "dirpath has changed", "LeafSpec", "0.00it/s", "tensorboardX",
             "Be aware that", "Writing model shards", "Traceback"]  # fmt: skip
    assert not [n for n in noise if n in output], output[-3000:]


def test_readme_python_example_runs_and_asks_the_demo_task(tmp_path):
    """The README's Python API example runs as written (on a tiny export where `make demo` puts its model),
    and asks problems of the demo's task, the only ones the demo model can answer."""
    (code,) = re.findall(r"## Python API\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    prompts = ast.literal_eval(re.search(r"for p in (\[[^\]]*\])", code).group(1))
    task = TASKS[yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())["data"]["task"]]
    operands = [re.fullmatch(r"(\d+)\+(\d+)=", p) for p in prompts]
    assert prompts and all(operands), prompts
    assert all(task.min_digits <= len(x) <= task.max_digits for m in operands for x in m.groups()), prompts
    DLLMModule(model_config=SMALL_MODEL, tokenizer="byte").save_hf(str(tmp_path / "runs/tiny/hf"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(ast.literal_eval(result.stdout.splitlines()[-1])) == len(prompts)  # one response per prompt
