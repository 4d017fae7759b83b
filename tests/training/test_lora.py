"""LoRA adapters: only the adapters train, checkpoints reload, and the HF export is a plain merged model."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import SMALL_MODEL
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from dllm.callbacks import HFExport
from dllm.data import DLLMDataModule
from dllm.errors import UserError
from dllm.module import DLLMModule
from dllm.training.lora import LoraSettings, merge_lora

LORA = LoraSettings(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


def peft_merged(model: torch.nn.Module) -> torch.nn.Module:
    """The reference: PEFT's own merge of the adapters into a copy, each LoRA layer replaced by its base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model).eval()
    for name, layer in [(n, m) for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    return merged


def _fit(tmp_path, module: DLLMModule, steps: int, callbacks: list) -> None:
    data = DLLMDataModule(task="addition", num_train=16, num_val=4, batch_size=8, tokenizer=module.tokenizer)
    L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks,
    ).fit(module, data)  # fmt: skip


def test_only_the_adapters_train():
    torch.manual_seed(0)
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", lora=LORA)
    trainable = [name for name, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 3 * SMALL_MODEL["num_hidden_layers"]  # A and B on 3 modules per layer
    assert type(module.model).__name__ == "LlamaForCausalLM"  # injected in place: still the HF class


def test_lora_export_is_a_plain_model_with_the_merged_logits(tmp_path):
    torch.manual_seed(0)
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", dtype="float64", lora=LORA, warmup_steps=1)
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    export, ckpt_dir = tmp_path / "hf", tmp_path / "ckpt"
    _fit(tmp_path, module, 2, [HFExport(str(export)), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
    # The frozen weights did not move; the adapters did.
    state = {k: v.clone() for k, v in module.model.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in base.items() if ".lora_" not in k)
    assert any(not torch.equal(state[k], v) for k, v in base.items() if ".lora_B." in k)

    assert "peft" not in (export / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float64).eval()
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        expected = peft_merged(module.model)(ids).logits
        unmerged = module.model.eval()(ids).logits
        got = plain(ids).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert torch.allclose(got, unmerged, rtol=0, atol=1e-10)
    # and the adapters mattered: the base weights alone give other logits
    module.model.load_state_dict({**state, **{k: torch.zeros_like(v) for k, v in state.items() if ".lora_B." in k}})
    with torch.no_grad():
        assert not torch.allclose(module.model(ids).logits, got, atol=1e-6)

    # A Lightning checkpoint of a LoRA run reloads (weights_only load: the settings are a plain dict).
    reloaded = DLLMModule.load_from_checkpoint(ckpt_dir / "last.ckpt", map_location="cpu")
    assert reloaded.lora == LORA
    assert all(torch.equal(reloaded.model.state_dict()[k], v) for k, v in state.items())


def test_lora_without_peft_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(UserError, match=r"model.lora needs PEFT: pip install 'dllm\[lora\]'"):
        DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", lora=LORA)


def test_bad_lora_settings_name_the_argument():
    with pytest.raises(UserError, match="model.lora.r must be >= 1"):
        LoraSettings(r=0)


GPT2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 64}  # c_attn 16x48, c_proj 16x16


@pytest.mark.parametrize(
    "config, targets",
    [
        (SMALL_MODEL, "all-linear"),  # nn.Linear
        (GPT2, "all-linear"),  # Conv1D (fan_in_fan_out), the default settings: crashed in the export
        (GPT2, ["attn.c_proj"]),  # a square Conv1D only: merged silently wrong
        ({**SMALL_MODEL, "tie_word_embeddings": False}, ["embed_tokens", "q_proj", "lm_head"]),  # embedding adapters
        ({**GPT2, "tie_word_embeddings": False}, ["wte", "c_fc"]),  # were dropped from the export
    ],
    ids=["llama-linear", "gpt2-all-linear", "gpt2-square-conv1d", "llama-embeddings", "gpt2-wte"],
)
def test_the_export_gives_the_logits_of_the_trained_peft_model(tmp_path, config, targets):
    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8.0, target_modules=targets)
    module = DLLMModule(model_config=config, tokenizer="byte", dtype="float64", lora=lora)
    model = module.model.eval()
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert any("embedding" in n for n in adapters) == ("wte" in targets or "embed_tokens" in targets)
    with torch.no_grad():  # trained adapters: neither factor zero
        for p in adapters.values():
            p.normal_(0, 0.3)
    module.save_hf(str(tmp_path), state_dict=merge_lora(model.state_dict(), model))  # what HFExport writes
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not any("lora" in n or "base_layer" in n for n in plain.state_dict())
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        trained, got = model(ids).logits, plain(ids).logits
        assert torch.allclose(got, trained, rtol=0, atol=1e-10)
        assert torch.allclose(got, peft_merged(model)(ids).logits, rtol=0, atol=1e-10)
        for p in adapters.values():  # the adapters mattered: without them the logits differ
            p.zero_()
        assert not torch.allclose(model(ids).logits, got, atol=1e-3)


@pytest.mark.parametrize(
    "config, target, shared_with",
    [
        (GPT2, "wte", "LM head"),  # GPT-2 ties its embeddings by default
        ({**SMALL_MODEL, "tie_word_embeddings": True}, "embed_tokens", "LM head"),
        ({**SMALL_MODEL, "tie_word_embeddings": True}, "lm_head", "input embedding"),
    ],
)
def test_an_adapter_on_a_tied_embedding_is_refused_at_setup(config, target, shared_with):
    # A merged update would change the input embedding and the LM head, the trained model only one of them.
    message = f"model.lora.target_modules: .*{target} shares its weight with the {shared_with}"
    with pytest.raises(UserError, match=message):
        DLLMModule(model_config=config, tokenizer="byte", lora=LoraSettings(target_modules=[target]))


def test_a_gpt2_fit_with_the_default_lora_settings_exports_the_trained_model(tmp_path):
    # The real command line: GPT-2's layers are Conv1D, which all-linear adapts; the export crashed at fit end.
    root = Path(__file__).resolve().parents[2]
    config = json.dumps({**GPT2, "n_positions": 256})
    result = subprocess.run(
        [sys.executable, str(root / "train.py"), "fit", "--config", str(root / "configs/tiny.yaml"),
         "--model.model_config", config, "--model.lora", "{}", "--data.num_train", "16", "--data.num_val", "4",
         "--data.batch_size", "8", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
         "--model.val_max_new_tokens", "4", "--trainer.default_root_dir", str(tmp_path / "run")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trained = DLLMModule.load_from_checkpoint(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu")
    assert trained.lora == LoraSettings() and any("c_proj.lora_A" in n for n, _ in trained.model.named_parameters())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run/hf").eval()
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, trained.model.eval()(ids).logits, rtol=0, atol=1e-5)  # float32
