"""The LightningModule's own rules: training noise per micro-batch, generation settings checked up front."""

import lightning as L
import pytest
import torch
from conftest import SMALL_MODEL
from lightning.pytorch.callbacks import ModelCheckpoint

from dllm.data import DLLMDataModule
from dllm.errors import UserError
from dllm.generation import GenerationSettings
from dllm.module import DLLMModule


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


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_rounds", 0),
        ("loss_weights", [1.0]),
        ("noise_min", 0.95),
        ("noise_max", 1.5),
        ("noise_schedule", "random"),
        ("noise_block_size", 0),
        ("ar_loss_weight", -1.0),
        ("loss_window", 0),
    ],
)
def test_objective_settings_are_checked_before_the_model_loads(field, value, monkeypatch):
    """Bad objective settings name the flag before any model is built (the loss would fail only at step 1)."""
    monkeypatch.setattr(DLLMModule, "_build_model", lambda self: pytest.fail("the model was built"))
    with pytest.raises(UserError, match=rf"model\.{field} must be"):
        DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", **{field: value})


def _prompt_batches(module, tmp_path, order: list[int], texts: list[str]) -> dict:
    """A collated batch of the prompts ``texts[i]`` (id ``q<i>``) for ``i`` in ``order``."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"id": "q{i}", "prompt": "{texts[i]}"}}\n' for i in order))
    data = DLLMDataModule(prompts_file=str(path), tokenizer=module.tokenizer)
    data.setup("predict")
    return data._collate()(data.predict_set.items)


@pytest.mark.parametrize("mode", ["refine", "jacobi"])
def test_a_prompts_sample_does_not_depend_on_its_batch(tmp_path, mode):
    """Sampling noise is keyed on (seed, prompt id, position): batch size and position do not matter."""
    torch.manual_seed(0)
    settings = GenerationSettings(mode=mode, add_eos_length=3, max_new_tokens=12, temperature=1.5, seed=7)
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", generation=settings).eval()
    texts = ["1+2=", "33+4=", "5+66=", "7+8="]
    responses = {}
    for order in ([0, 1, 2, 3], [3, 1], [2], [1, 0, 2]):
        for record in module.generate_records(_prompt_batches(module, tmp_path, order, texts)):
            responses.setdefault(record["id"], set()).add(record["response"])
    assert all(len(seen) == 1 for seen in responses.values()), responses
    other_seed = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", generation=settings).eval()
    other_seed.load_state_dict(module.state_dict())
    other_seed.generation.seed = 8
    resampled = other_seed.generate_records(_prompt_batches(module, tmp_path, [0, 1, 2, 3], texts))
    assert [r["response"] for r in resampled] != [responses[f"q{i}"].pop() for i in range(4)]


def test_trace_prints_each_round_of_the_first_prompt(tmp_path, caplog):
    torch.manual_seed(0)
    settings = GenerationSettings(mode="refine", add_eos_length=3, refine_iter=2, max_new_tokens=8, trace=True)
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", generation=settings).eval()
    with caplog.at_level("INFO"):
        records = module.generate_records(_prompt_batches(module, tmp_path, [0, 1], ["1+2=", "3+4="]))
    traced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[trace")]
    assert traced and all(message.startswith("[trace q0] refine block") for message in traced)
    assert "round 0" in traced[0] and "top-3:" in traced[0]
    assert len(traced[0].splitlines()) == 1 + 4  # a header, then one line per block position (N + 1 = 4)
    assert "trace" not in records[0]["settings"]  # printing a trace does not change what is generated


def _strategy(base: type, world_size: int, zero_stage_3: bool = False, global_rank: int = 0):
    """An instance of ``base`` on ``world_size`` ranks, without a cluster (``__init__`` skipped)."""
    attributes = {"world_size": world_size, "global_rank": global_rank, "zero_stage_3": zero_stage_3}
    cls = type("Fake" + base.__name__, (base,), attributes)
    return cls.__new__(cls)


def test_forwards_are_collective_only_for_sharded_strategies():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from dllm.distributed import forwards_are_collective

    assert forwards_are_collective(_strategy(FSDPStrategy, 2))
    assert forwards_are_collective(_strategy(DeepSpeedStrategy, 4, zero_stage_3=True))
    assert not forwards_are_collective(_strategy(DeepSpeedStrategy, 4, zero_stage_3=False))
    assert not forwards_are_collective(_strategy(DDPStrategy, 2))
    assert not forwards_are_collective(_strategy(FSDPStrategy, 1))
    assert not forwards_are_collective(None)


def test_predict_batches_are_even_across_ranks_when_forwards_are_collective(tmp_path):
    """Under FSDP every rank must run the same number of batches: 7 prompts on 2 ranks are padded to 4 + 4."""
    from lightning.pytorch.strategies import FSDPStrategy

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"id": "q{i}", "prompt": "{i}+{i}="}}\n' for i in range(7)))
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte")
    seen = []
    for rank in (0, 1):
        data = DLLMDataModule(prompts_file=str(path), val_batch_size=2, tokenizer=module.tokenizer)
        data.setup("predict")
        data.trainer = type("Trainer", (), {"strategy": _strategy(FSDPStrategy, 2, global_rank=rank)})()
        batches = [batch["id"] for batch in data.predict_dataloader()]
        assert len(batches) == 2  # ceil(ceil(7 / 2) / 2) on each rank
        seen += [i for ids in batches for i in ids]
    assert sorted(set(seen)) == [f"q{i}" for i in range(7)] and len(seen) == 8  # one prompt repeated
