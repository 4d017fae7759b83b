"""``DLLMModule``: one LightningModule for both halves of the method.

``training_step`` runs the iterative-refine objective (``dllm.training.objective``);
``validation_step`` logs a seeded loss and generates for the validation
prompts; ``predict_step`` runs block generation (``dllm.generation.engine``) and
returns one record per prompt (``dllm.prediction_records``; docs/method.md, section 9). The model is an ordinary HF
causal LM, loaded from ``pretrained`` or built from ``model_config``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric, SumMetric
from transformers import AutoConfig, AutoModelForCausalLM

from dllm.data.tokenizer import BYTE_TOKENIZER, load_tokenizer
from dllm.errors import UserError
from dllm.generation.settings import GenerationSettings
from dllm.models import readable_like_the_rest
from dllm.prediction_records import generate_records, is_correct, stop_token_ids
from dllm.training.drift import BaseReference, drift_stats
from dllm.training.lora import LoraSettings, add_lora
from dllm.training.objective import iterative_refine_loss


def check_objective(hp) -> None:
    """The objective's settings, checked before the model loads (the objective would fail only at step 1)."""
    checks = {
        "num_rounds": (hp.num_rounds >= 1, ">= 1"),
        "loss_weights": (
            hp.loss_weights is None or len(hp.loss_weights) == hp.num_rounds,
            f"null or one weight per round (num_rounds={hp.num_rounds})",
        ),
        "noise_min": (0 <= hp.noise_min <= hp.noise_max, f"in [0, noise_max={hp.noise_max}]"),
        "noise_max": (hp.noise_max <= 1, "<= 1"),
        "noise_schedule": (
            hp.noise_schedule in ("iid", "block", "prefix", "packed"),
            "'iid', 'block', 'prefix' or 'packed'",
        ),
        "consistency": (hp.get("consistency", "hard") in ("hard", "soft"), "'hard' or 'soft'"),
        "noise_block_size": (hp.noise_block_size >= 1, ">= 1"),
        "ar_loss_weight": (hp.ar_loss_weight >= 0, ">= 0"),
        "drift_weight": (
            hp.get("drift_weight", 0.0) >= 0 and (hp.get("drift_weight", 0.0) == 0 or hp.loss_chunk_size is None),
            ">= 0 (0 = off), and 0 with loss_chunk_size",
        ),
        "loss_window": (
            hp.loss_window is None or (hp.loss_window >= 1 and hp.noise_schedule != "packed"),
            ">= 1 or null (null with noise_schedule 'packed')",
        ),
    }
    for name, (ok, expected) in checks.items():
        if not ok:
            raise UserError(f"model.{name} must be {expected}, got {hp[name]!r}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class DLLMModule(L.LightningModule):
    """Fine-tune a causal LM to write blocks of tokens per forward, and generate that way.

    Args:
        pretrained: HF model name or local path. ``None`` builds a random model from ``model_config``.
        model_config: config dict for a randomly initialised model (``model_type`` picks the
            architecture, e.g. ``{"model_type": "qwen2", "hidden_size": 128, ...}``);
            ``vocab_size`` defaults to the tokenizer's size.
        tokenizer: HF name or path, ``"byte"`` for the bundled byte-level tokenizer, or ``None``
            for the one that comes with ``pretrained`` (``"byte"`` without it).
        dtype: weights dtype when loading (``float32``, ``bfloat16``, ...); ``None`` keeps the
            checkpoint's. With ``trainer.precision=bf16-mixed`` keep float32 weights.
        trust_remote_code: allow model/tokenizer code from the checkpoint.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``, ...; ``None`` = HF default.
        gradient_checkpointing: recompute activations in backward to save memory.
        lora: train LoRA adapters (PEFT, ``pip install 'dllm[lora]'``) instead of every weight; the HF export
            merges them into an ordinary checkpoint. ``None`` = full fine-tune.
        num_rounds: refine rounds in the objective.
        loss_weights: one weight per round; ``None`` = all 1.0.
        noise_min: lowest per-row share of response tokens replaced by EOS.
        noise_max: highest per-row share of response tokens replaced by EOS.
        noise_schedule: ``"iid"`` (the original method's), ``"block"`` (clean prefix + a run of EOS) or
            ``"prefix"`` (clean prefix up to a random cut, then iid noise: with ``loss_window``, the fine-tuning
            recipe of docs/quality.md) or ``"packed"`` (every block of every response, each as a noisy copy
            beside the clean response, in one forward per round; docs/method.md, section 8).
        noise_block_size: EOS run length for ``noise_schedule="block"``; for ``"packed"``, N, the draft tokens
            per block: set it to the ``generation.add_eos_length`` the model will generate with.
        consistency: ``"packed"`` only: ``"hard"`` (a noisy token against the clean token) or ``"soft"`` (against
            the clean stream's detached distribution for the same target).
        ar_loss_weight: weight of an extra clean-input next-token loss (0 = off; ``"packed"`` takes it from the
            rounds' forward).
        drift_weight: weight of the drift term, ``KL(base || tuned)`` per answer token on the clean answer
            (``dllm.training.drift``): it keeps the tuned model's next-token distributions the base model's. 0 = off.
            The base is the model with its LoRA adapters off (one more no-grad forward), or without ``lora``
            a frozen copy of the loaded weights (their memory again). Not with ``loss_chunk_size``.
        val_drift: the drift meter: validation logs ``val/kl_to_base`` (``KL(base || tuned)`` per answer token)
            and ``val/argmax_agreement``, teacher-forced on the validation answers. ``None`` = when it needs no
            copy of the weights (LoRA, or ``drift_weight > 0``); ``true`` = also for a full fine-tune (a frozen
            copy); ``false`` = off.
        loss_chunk_size: project the LM head this many positions at a time (large vocabularies).
        loss_window: score the rounds on the clean prefix and this many targets from the first noised token
            (set it to the inference block, N + 1); ``None`` scores the whole response.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear warmup steps before the cosine decay.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        seed: seed of the training noise, drawn per (seed, micro-batch, rank): resumed runs match, and
            micro-batches of one gradient-accumulation window get different noise.
        generation: generation settings for validation and prediction. They are not saved as
            hyperparameters, so ``predict.py --ckpt_path`` honours the command line's.
        val_generate_batches: validation batches that also generate (exact match, tokens per
            forward); 0 = off, -1 = all.
        val_max_new_tokens: cap on generated tokens during validation.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        num_rounds: int = 2,
        loss_weights: list[float] | None = None,
        noise_min: float = 0.1,
        noise_max: float = 0.9,
        noise_schedule: Literal["iid", "block", "prefix", "packed"] = "iid",
        noise_block_size: int = 8,
        consistency: Literal["hard", "soft"] = "hard",
        ar_loss_weight: float = 0.0,
        drift_weight: float = 0.0,
        val_drift: bool | None = None,
        loss_chunk_size: int | None = None,
        loss_window: int | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
        generation: GenerationSettings | None = None,
        val_generate_batches: int = 1,
        val_max_new_tokens: int = 256,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["generation", "lora"])
        if isinstance(lora, dict):  # from a checkpoint's hyperparameters
            lora = LoraSettings(**lora)
        self.lora = lora
        # a plain dict: checkpoints load with torch's weights_only, which refuses pickled classes
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        self.generation = generation or GenerationSettings()
        if pretrained is None and model_config is None:
            raise UserError("set model.pretrained (an HF name or path) or model.model_config (a config dict)")
        check_objective(self.hparams)
        self.tokenizer = load_tokenizer(tokenizer or pretrained or BYTE_TOKENIZER, trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer)
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's mode as it finds
        # it at the start of fit: without this a loaded model would train with dropout off and gradient
        # checkpointing inactive (HF only checkpoints in train mode). Validation and predict still run in
        # eval mode: Lightning switches to it there and restores train mode afterwards.
        self.model = self._build_model().train()
        if lora is not None:
            self.model = add_lora(self.model, lora)
        if gradient_checkpointing:  # transformers 5 renamed it; the old name warns
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            (enable or self.model.gradient_checkpointing_enable)()
        # the base model for the drift term and meter: taken now, from the loaded weights (a resumed fit loads
        # its checkpoint after this, so a frozen copy is still the base)
        wanted = val_drift if val_drift is not None else (lora is not None or drift_weight > 0)
        self.reference = BaseReference.of(self.model) if wanted or drift_weight > 0 else None
        self.val_kl_to_base = MeanMetric()
        self.val_argmax_agreement = MeanMetric()
        self.val_exact_match = MeanMetric()
        self.val_tokens_per_forward = MeanMetric()
        self.val_generated_tokens = SumMetric()  # with the seconds below: val/tokens_per_s
        self.val_generation_seconds = SumMetric()

    def _build_model(self) -> torch.nn.Module:
        hp = self.hparams
        kwargs: dict[str, Any] = {"trust_remote_code": hp.trust_remote_code}
        if hp.attn_implementation:
            kwargs["attn_implementation"] = hp.attn_implementation
        if hp.dtype is not None:
            if hp.dtype not in DTYPES:
                raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {hp.dtype!r}")
            kwargs["dtype"] = DTYPES[hp.dtype]
        if hp.pretrained is not None:
            return AutoModelForCausalLM.from_pretrained(hp.pretrained, **kwargs)
        config_kwargs = dict(hp.model_config)
        model_type = config_kwargs.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"model.model_config needs a 'model_type' (e.g. 'qwen2'), got {hp.model_config}")
        config_kwargs.setdefault("vocab_size", len(self.tokenizer))
        config_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        config_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        config = AutoConfig.for_model(model_type, **config_kwargs)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        return model.to(kwargs["dtype"]) if "dtype" in kwargs else model

    # --- the objective ----------------------------------------------------------

    def _loss(self, batch: dict, generator: torch.Generator):
        hp = self.hparams
        return iterative_refine_loss(
            self.model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["response_mask"],
            eos_token_id=self.tokenizer.eos_token_id,
            num_rounds=hp.num_rounds,
            loss_weights=hp.loss_weights,
            noise_min=hp.noise_min,
            noise_max=hp.noise_max,
            generator=generator,
            noise_schedule=hp.noise_schedule,
            block_size=hp.noise_block_size,
            ar_loss_weight=hp.ar_loss_weight,
            loss_chunk_size=hp.loss_chunk_size,
            loss_window=hp.get("loss_window"),  # absent from checkpoints written before it existed
            consistency=hp.get("consistency", "hard"),
            drift_weight=hp.get("drift_weight", 0.0),
            reference=self.reference,
        )

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # The noise depends on (seed, micro-batch, rank) only. The micro-batch counter runs across epochs and
        # is restored on resume, so a resumed run draws the same noise; unlike the optimizer step it advances
        # inside a gradient-accumulation window, so micro-batches never share their noise.
        micro_batch = self.trainer.fit_loop.epoch_loop.total_batch_idx
        seed = self.hparams.seed + 1_000_003 * micro_batch + self.global_rank
        out = self._loss(batch, self._generator(seed))
        size = batch["input_ids"].size(0)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size, sync_dist=True)
        for r, loss in enumerate(out.round_losses):
            self.log(f"train/loss_round{r}", loss, batch_size=size, sync_dist=True)
        if out.ar_loss is not None:
            self.log("train/ar_loss", out.ar_loss, batch_size=size, sync_dist=True)
        if out.drift is not None:
            self.log("train/drift", out.drift, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/noise_ratio", out.noise_ratio, batch_size=size, sync_dist=True)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._loss(batch, self._generator(self.hparams.seed + batch_idx))
        size = batch["input_ids"].size(0)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=size, sync_dist=True)
        for r, loss in enumerate(out.round_losses):
            self.log(f"val/loss_round{r}", loss, batch_size=size, sync_dist=True)
        if self.reference is not None and self.hparams.get("val_drift") is not False:
            ids, mask, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
            stats = drift_stats(self.model, self.reference, ids, mask, response)
            if stats.count:  # token-weighted over batches and ranks, as bench/real.py
                self.val_kl_to_base.update(stats.kl_sum / stats.count, stats.count)
                self.val_argmax_agreement.update(stats.same_argmax / stats.count, stats.count)
                self.log("val/kl_to_base", self.val_kl_to_base, prog_bar=True, batch_size=size)
                self.log("val/argmax_agreement", self.val_argmax_agreement, prog_bar=True, batch_size=size)
        limit = self.hparams.val_generate_batches
        if limit < 0 or batch_idx < limit:
            settings = {"max_new_tokens": min(self.generation.max_new_tokens, self.hparams.val_max_new_tokens)}
            start = time.perf_counter()
            records = self.generate_records(batch, **settings)
            self.val_generation_seconds.update(time.perf_counter() - start)
            correct = [is_correct(rec, batch, i) for i, rec in enumerate(records)]
            self.val_exact_match.update(torch.tensor(correct, dtype=torch.float32, device=self.device))
            tokens = sum(r["new_tokens"] for r in records)
            forwards = sum(r["forwards"] for r in records)
            self.val_tokens_per_forward.update(torch.tensor(tokens / forwards, device=self.device), forwards)
            self.val_generated_tokens.update(tokens)
            self.log("val/exact_match", self.val_exact_match, prog_bar=True, batch_size=size)
            self.log("val/tokens_per_forward", self.val_tokens_per_forward, prog_bar=True, batch_size=size)

    def on_validation_epoch_end(self) -> None:
        if self.val_generation_seconds.update_called:  # tokens and seconds summed over ranks: a per-device rate
            seconds = float(self.val_generation_seconds.compute())
            self.log("val/tokens_per_s", float(self.val_generated_tokens.compute()) / max(seconds, 1e-9))
        self.val_generated_tokens.reset()
        self.val_generation_seconds.reset()

    # --- generation ----------------------------------------------------------------

    def generate_records(self, batch: dict, **overrides) -> list[dict]:
        """Generate for ``batch["prompt_ids"]`` and return one record per prompt (``dllm.prediction_records``)."""
        strategy = self._trainer.strategy if self._trainer else None
        return generate_records(
            self.model,
            self.tokenizer,
            self.generation,
            self.stop_ids,
            batch,
            device=self.device,
            strategy=strategy,
            **overrides,
        )

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return self.generate_records(batch)

    # --- optimisation ----------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- export --------------------------------------------------------------------------

    def save_hf(self, path: str, state_dict: dict | None = None) -> None:
        """Write the model and tokenizer in HF format (``from_pretrained`` loads them back)."""
        self.model.save_pretrained(path, state_dict=state_dict)
        readable_like_the_rest(path)
        self.tokenizer.save_pretrained(path)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine down to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
