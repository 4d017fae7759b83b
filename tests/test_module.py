"""The LightningModule's own rules: training noise per micro-batch, generation settings checked up front."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dllm.data import DLLMDataModule
from dllm.errors import UserError
from dllm.module import DLLMModule, GenerationSettings

SMALL_MODEL = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


class NoiseRecorder(L.Callback):
    """Records, per micro-batch, the noise ratio the objective drew and the loss."""

    def __init__(self):
        self.micro_batches: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ratio = float(trainer.callback_metrics["train/noise_ratio"])
        self.micro_batches.append((trainer.fit_loop.epoch_loop.total_batch_idx, ratio, float(outputs["loss"])))


class StopAfter(L.Callback):
    """Simulate a killed run after ``steps`` optimizer steps."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def _fit(root, max_steps, callbacks, ckpt_path=None):
    L.seed_everything(0)
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", warmup_steps=1)
    data = DLLMDataModule(task="addition", num_train=64, num_val=8, batch_size=4, tokenizer=module.tokenizer)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)


class SeedRecordingModule(DLLMModule):
    """Records the seed of every noise generator the training step asks for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seeds: list[int] = []

    def _generator(self, seed: int) -> torch.Generator:
        if self.training:
            self.seeds.append(seed)
        return super()._generator(seed)


def test_gradient_accumulation_micro_batches_get_different_noise(tmp_path):
    L.seed_everything(0)
    module = SeedRecordingModule(model_config=SMALL_MODEL, tokenizer="byte", warmup_steps=1)
    data = DLLMDataModule(task="addition", num_train=64, num_val=8, batch_size=4, tokenizer=module.tokenizer)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, accumulate_grad_batches=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    assert len(module.seeds) == 8  # 2 optimizer steps x 4 micro-batches
    assert len(set(module.seeds)) == 8, module.seeds  # a shared seed would draw the same t and masks


def test_resume_with_gradient_accumulation_draws_the_same_noise(tmp_path):
    full = NoiseRecorder()
    _fit(tmp_path / "full", 4, [full])
    first = NoiseRecorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="stop", every_n_train_steps=2, save_top_k=-1)
    _fit(tmp_path / "first", 4, [first, checkpoint, StopAfter(2)])
    resumed = NoiseRecorder()
    torch.manual_seed(123)  # the global RNG state must not matter
    _fit(tmp_path / "resumed", 4, [resumed], ckpt_path=tmp_path / "stop.ckpt")
    assert [m[0] for m in first.micro_batches + resumed.micro_batches] == list(range(16))
    for (index, ratio, loss), (_, ratio_full, loss_full) in zip(
        first.micro_batches + resumed.micro_batches, full.micro_batches
    ):
        assert ratio == ratio_full, index
        assert loss == pytest.approx(loss_full, rel=1e-6), index


@pytest.mark.parametrize(
    "field,value",
    [
        ("mode", "beam"),
        ("add_eos_length", -1),
        ("refine_iter", 0),
        ("max_new_tokens", 0),
        ("max_length", 1),
        ("temperature", -0.5),
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
    ],
)
def test_generation_settings_are_checked_when_built(field, value):
    """Bad settings fail when the config is read, before any model loads, naming the flag."""
    with pytest.raises(UserError, match=rf"model\.generation\.{field}"):
        GenerationSettings(**{field: value})
