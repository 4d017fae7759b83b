"""The drift term and meter (dllm.training.drift): KL(base || tuned) on the clean answer, pinned to naive
computations."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import EOS, SMALL_MODEL, build_model
from test_objective_packed import ROWS, make_batch

from dllm.data import DLLMDataModule
from dllm.errors import UserError
from dllm.module import DLLMModule
from dllm.training.drift import BaseReference, adapter_layers, adapters_disabled, drift_stats
from dllm.training.lora import LoraSettings, add_lora
from dllm.training.objective import iterative_refine_loss

LORA = LoraSettings(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
SCHEDULES = ["iid", "packed"]


def lora_model(perturb: float = 0.0, seed: int = 0) -> torch.nn.Module:
    """A tiny float64 llama with LoRA adapters; ``perturb`` > 0 draws non-zero ``B`` (PEFT initialises it to 0)."""
    model = add_lora(build_model("llama", seed), LORA)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name and perturb:
                p.copy_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def loss(model, reference, schedule: str, drift_weight: float = 1.0, left: bool = False):
    ids, attn, resp = make_batch(ROWS, left=left)
    return iterative_refine_loss(
        model, ids, attn, resp, eos_token_id=EOS, num_rounds=1, noise_schedule=schedule, block_size=3,
        noise_min=0.2, noise_max=0.9, generator=torch.Generator().manual_seed(3), drift_weight=drift_weight,
        reference=reference,
    )  # fmt: skip


def naive_drift(base, model, ids, attn, resp) -> tuple[float, int, int]:
    """Row by row without padding: sum over answer-predicting positions of KL(base || model), argmax matches, count."""
    kl, same, count = 0.0, 0, 0
    for b in range(ids.size(0)):
        row, answer = ids[b][attn[b].bool()], resp[b][attn[b].bool()].bool()
        # the first answer-predicting position; a row with no prompt has nothing before its first token
        start = max(int(answer.nonzero()[0]), 1)
        with torch.no_grad():
            logp = base(row[None]).logits[0, start - 1 : -1].double().log_softmax(-1)
            logq = model(row[None]).logits[0, start - 1 : -1].double().log_softmax(-1)
        kl += float((logp.exp() * (logp - logq)).sum())
        same += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        count += row.numel() - start
    return kl, same, count


def test_the_reference_with_adapters_off_is_the_base_model_exactly():
    base = build_model("llama")
    model = lora_model(perturb=0.3)
    ids, attn, resp = make_batch(ROWS, left=True)
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    tuned_before = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits
    reference = BaseReference.of(model)
    assert reference.shares_weights  # no second copy with adapters
    expected = base(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits
    assert torch.equal(reference(ids, attn, position_ids), expected)
    assert not torch.allclose(tuned_before, expected)  # the adapters do change the model
    # afterwards the adapters are back on and only they train
    assert torch.equal(model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits, tuned_before)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def test_adapters_come_back_on_after_an_error():
    model = lora_model(perturb=0.3)
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(model):
        raise RuntimeError("boom")
    layers = adapter_layers(model)
    assert layers and all(not layer.disable_adapters for layer in layers)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_term_is_zero_at_step_zero_with_zero_initialised_adapters(schedule):
    model = lora_model(perturb=0.0)
    out = loss(model, BaseReference.of(model), schedule)
    assert out.drift == 0
    without = loss(model, None, schedule, drift_weight=0.0)
    assert torch.equal(out.loss, without.loss) and without.drift is None
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss - without.loss, params, allow_unused=True, retain_graph=True)
    refine = torch.autograd.grad(without.loss, params, allow_unused=True)
    largest = max(float(g.abs().max()) for g in refine if g is not None)
    # the term adds no gradient: p_tuned - p_base = 0, up to float64 rounding
    assert all(g is None or float(g.abs().max()) < 1e-12 * largest for g in grads)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full-fine-tune"])
def test_the_terms_gradient_pulls_a_perturbed_model_back_to_the_base(schedule, full):
    base = build_model("llama")
    if full:  # a frozen copy of the base, then every weight moves
        model = copy.deepcopy(base)
        reference = BaseReference.of(model)
        assert not reference.shares_weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    else:
        model = lora_model(perturb=0.3)
        reference = BaseReference.of(model)
    ids, attn, resp = make_batch(ROWS)
    params = [p for p in model.parameters() if p.requires_grad]
    drift = loss(model, reference, schedule, drift_weight=1.0)
    plain = loss(model, reference, schedule, drift_weight=0.0)
    grads = torch.autograd.grad(drift.loss - plain.loss, params)  # the drift term's own gradient
    before, _, count = naive_drift(base, model, ids, attn, resp)
    assert before / count == pytest.approx(float(drift.drift), rel=1e-9)  # it is the KL it claims to be
    # a small step against the gradient lowers the KL by what the gradient predicts (first order): the
    # gradient is the KL's, and it points back to the base
    norm2 = sum(float((g * g).sum()) for g in grads)
    lr = 0.02 * float(drift.drift) / norm2  # predicted: 2% less KL
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)
    after, _, _ = naive_drift(base, model, ids, attn, resp)
    assert (before - after) / count == pytest.approx(lr * norm2, rel=0.1), (before, after)


def test_packed_and_iid_score_the_same_drift():
    """The packed layout's clean stream is a plain forward: its drift is the i.i.d. schedule's clean forward's."""
    model = lora_model(perturb=0.3)
    reference = BaseReference.of(model)
    for left in (False, True):
        packed, iid = loss(model, reference, "packed", left=left), loss(model, reference, "iid", left=left)
        assert packed.drift > 0 and float(packed.drift) == pytest.approx(float(iid.drift), rel=1e-10)


def test_the_meter_equals_an_independent_teacher_forced_computation():
    base = build_model("llama")
    model = lora_model(perturb=0.3)
    ids, attn, resp = make_batch(ROWS, left=True)
    stats = drift_stats(model, BaseReference.of(model), ids, attn, resp)
    kl, same, count = naive_drift(base, model, ids, attn, resp)
    assert stats.count == count and int(stats.same_argmax) == same
    assert float(stats.kl_sum) == pytest.approx(kl, rel=1e-10)
    assert 0 < same < count  # the perturbation moved some argmax, not all


def test_validation_logs_the_meter_token_weighted_over_batches(tmp_path):
    torch.manual_seed(0)
    module = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", dtype="float64", lora=LORA,
                        val_generate_batches=0)  # fmt: skip
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    data = DLLMDataModule(task="addition", num_train=8, num_val=5, val_batch_size=2, tokenizer=module.tokenizer)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    logged = trainer.validate(module, data, verbose=False)[0]
    base = copy.deepcopy(module.model)
    with adapters_disabled(base):
        kl = same = count = 0
        for batch in data.val_dataloader():  # three batches of 2, 2, 1: a token-weighted mean, not a mean of means
            k, s, c = naive_drift(base, module.model, batch["input_ids"], batch["attention_mask"],
                                  batch["response_mask"])  # fmt: skip
            kl, same, count = kl + k, same + s, count + c
    assert logged["val/kl_to_base"] == pytest.approx(kl / count, rel=1e-6)
    assert logged["val/argmax_agreement"] == pytest.approx(same / count, rel=1e-6)


def test_the_meter_is_off_for_a_full_fine_tune_unless_asked():
    assert DLLMModule(model_config=SMALL_MODEL, tokenizer="byte").reference is None
    asked = DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", val_drift=True).reference
    assert asked is not None and not asked.shares_weights
    assert DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", lora=LORA).reference.shares_weights
    assert DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", lora=LORA, val_drift=False).reference is None


def test_the_setting_parses_from_yaml_and_a_bad_value_is_one_clear_error(tmp_path):
    from dllm.cli import DLLMCLI

    config = tmp_path / "drift.yaml"
    config.write_text(
        "model:\n  model_config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,"
        " num_attention_heads: 4, num_key_value_heads: 2}\n  tokenizer: byte\n  drift_weight: 0.5\n"
        "data:\n  task: addition\n"
    )
    cli = DLLMCLI(args=["--config", str(config)], run=False)
    assert cli.model.hparams.drift_weight == 0.5 and cli.model.reference is not None
    with pytest.raises(UserError, match=r"^model.drift_weight must be >= 0 \(0 = off\).*got -1.0$"):
        DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", drift_weight=-1.0)
    with pytest.raises(UserError, match="model.drift_weight must be"):
        DLLMModule(model_config=SMALL_MODEL, tokenizer="byte", drift_weight=0.1, loss_chunk_size=16)


def test_kl_is_zero_only_for_equal_distributions():
    logits = torch.randn(5, 7, dtype=torch.float64)
    from dllm.training.drift import kl_to_base

    assert torch.all(kl_to_base(logits, logits) == 0)
    assert torch.all(kl_to_base(logits + 3.0, logits) < 1e-12)  # a shift of the logits is the same distribution
    other = logits.flip(-1)
    expected = (F.softmax(other, -1) * (F.log_softmax(other, -1) - F.log_softmax(logits, -1))).sum(-1)
    assert torch.allclose(kl_to_base(logits, other), expected)
