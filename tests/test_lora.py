"""LoRA adapters: only the adapters train, checkpoints reload, and the HF export is a plain merged model."""

import copy
import sys

import lightning as L
import pytest
import torch
from conftest import SMALL_MODEL
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from dllm.callbacks import HFExport
from dllm.data import DLLMDataModule
from dllm.errors import UserError
from dllm.lora import LoraSettings
from dllm.module import DLLMModule

LORA = LoraSettings(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


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
    # The reference: PEFT's own merge of the trained adapters into a copy.
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(module.model).eval()
    for name, layer in [(n, m) for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        expected = merged(ids).logits
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
