"""How far the tuned model's answers move from the base model's: the drift term and the drift meter.

Self-distillation fine-tunes a model on its own answers so that what it writes stays its own (docs/real.md),
but the draft rounds pull the same weights elsewhere, and a small model's greedy path turns at the first
argmax that changes. Training on the base model's *tokens* (the AR term) pins only the argmax of the answers
it saw; two tools here look at the whole next-token distribution instead:

- **the drift term** (``drift_weight`` in :func:`dllm.training.objective.iterative_refine_loss`): ``KL(base || tuned)``
  per answer token, on the clean answer stream of the same forward, added to the loss. Its gradient with
  respect to the tuned logits is ``p_tuned - p_base``: the soft-target cross-entropy against the base
  model's distribution, so it pulls every token's probability back, not only the argmax's;
- **the drift meter** (:func:`drift_stats`): the same KL, and the share of positions whose argmax is the base
  model's, teacher-forced on held-out answers: what ``bench/real.py`` reports, during validation.

The direction is ``KL(base || tuned) = sum_v p_base(v) (log p_base(v) - log p_tuned(v))``, the quantity
the README and ``bench/real.py`` quote: an expectation under the base model, so it is large when the tuned
model drops a token the base model would write (mass-covering), which is the drift a user notices.

The base model (:class:`BaseReference`): with LoRA adapters, the same weights with the adapters switched off
(PEFT's own ``enable_adapters``), one extra no-grad forward and no second copy; for a full fine-tune, a frozen
copy of the weights taken before training (the model's size again in memory; it is not sharded by FSDP or
DeepSpeed, and never saved in checkpoints).

Pure PyTorch (PEFT only when adapters are present): no Lightning here.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dllm.training.lm_head import at_least_fp32, position_ids_from_mask, response_targets


def adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's PEFT adapter layers (``BaseTunerLayer``); empty without PEFT or adapters."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` as its base inside the block: every PEFT adapter switched off, then back on.

    PEFT's ``enable_adapters`` also flips the adapters' ``requires_grad`` (off, then on for the active
    adapter), so the flags are restored exactly as they were: frozen weights stay frozen.
    """
    layers = adapter_layers(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


class BaseReference:
    """The base model's logits for the drift term and meter.

    Args:
        model: the model being tuned.
        frozen: a frozen copy of the base weights, or ``None`` when ``model`` has adapters (then the base is
            ``model`` with them switched off). :meth:`of` chooses.
    """

    def __init__(self, model: torch.nn.Module, frozen: torch.nn.Module | None = None):
        if frozen is None and not adapter_layers(model):
            raise ValueError("BaseReference without a frozen copy needs a model with PEFT adapters")
        self.model = model
        self.frozen = frozen

    @classmethod
    def of(cls, model: torch.nn.Module) -> BaseReference:
        """The cheapest reference: adapters off when ``model`` has them, else a frozen copy of it as it is now."""
        if adapter_layers(model):
            return cls(model)
        frozen = copy.deepcopy(model).eval()
        frozen.requires_grad_(False)
        return cls(model, frozen)

    @property
    def shares_weights(self) -> bool:
        """True when the base is the tuned model with its adapters off (no second copy)."""
        return self.frozen is None

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """``[B, T, V]`` base logits of a plain causal forward (no gradient)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.frozen is None:
            with adapters_disabled(self.model):
                return self.model(**inputs).logits
        if next(self.frozen.parameters()).device != input_ids.device:  # follows the trained model's device
            self.frozen.to(input_ids.device)
        return self.frozen(**inputs).logits


def kl_to_base(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """``[n]`` ``KL(softmax(base) || softmax(logits))`` per row, in at least float32; no gradient to the base."""
    logq = F.log_softmax(at_least_fp32(logits), -1)
    logp = F.log_softmax(at_least_fp32(base_logits.detach()), -1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


@dataclass
class DriftStats:
    """Sums over the scored answer positions of one batch (divide by ``count`` for per-token means)."""

    kl_sum: torch.Tensor
    same_argmax: torch.Tensor
    count: int


@torch.no_grad()
def drift_stats(
    model,
    reference: BaseReference,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
) -> DriftStats:
    """The drift meter on one batch: teacher-forced on ``input_ids`` (prompt + answer), at the positions that
    predict an answer token (the answer's closing EOS included): ``KL(base || model)`` summed, and how many of
    those positions have the base model's argmax. Token-weighted, as ``bench/real.py`` computes it.
    """
    response = response_mask.bool() & attention_mask.bool()
    where = response_targets(input_ids, response, attention_mask)[0]  # the positions the objective scores
    position_ids = position_ids_from_mask(attention_mask)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    tuned = model(**inputs).logits[where]
    base = reference(input_ids, attention_mask, position_ids)[where]
    same = (tuned.argmax(-1) == base.argmax(-1)).sum()
    return DriftStats(kl_sum=kl_to_base(tuned, base).sum(), same_argmax=same, count=int(where.sum()))
