"""The iterative-refine training objective (docs/method.md, section 8).

Replace a random fraction of each response with EOS, run the model, score
next-token cross-entropy against the clean response; then feed the model's
own (detached) greedy prediction back into the response and score again, for
``num_rounds`` rounds. The model learns to write a block of tokens from a
context full of EOS placeholders, which is what block generation feeds it.
``noise_schedule="packed"`` scores every block of every response in one forward
per round instead (:mod:`dllm.training.packed`); the LM-head helpers live in
:mod:`dllm.training.lm_head`.

Pure PyTorch: no Lightning here, so the objective can be unit-tested and used
from any training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dllm.training.drift import BaseReference, kl_to_base
from dllm.training.lm_head import (
    at_least_fp32,
    chunked_loss_and_argmax,
    decoder_hidden_states,
    position_ids_from_mask,
    response_targets,
)
from dllm.training.packed import Consistency, pack_blocks, packed_refine_loss

NoiseSchedule = Literal["iid", "block", "prefix", "packed"]


@dataclass
class RefineLossOutput:
    """What :func:`iterative_refine_loss` returns.

    Attributes:
        loss: scalar with grad, ``sum_r w_r * loss_r`` (+ ``ar_loss_weight * ar_loss``).
        round_losses: ``num_rounds`` detached scalars.
        noise_ratio: detached scalar, the fraction of response tokens replaced by EOS.
        ar_loss: detached clean-input next-token loss, when ``ar_loss_weight > 0`` (or ``drift_weight > 0``).
        drift: detached ``KL(base || model)`` per answer token on the clean stream, when ``drift_weight > 0``.
    """

    loss: torch.Tensor
    round_losses: list[torch.Tensor]
    noise_ratio: torch.Tensor
    ar_loss: torch.Tensor | None = None
    drift: torch.Tensor | None = None


def eos_noise_mask(
    response_mask: torch.Tensor,
    noise_min: float,
    noise_max: float,
    generator: torch.Generator | None = None,
    schedule: NoiseSchedule = "iid",
    block_size: int = 8,
) -> torch.Tensor:
    """Which response tokens become EOS (bool, same shape as ``response_mask``).

    ``"iid"`` (the original method's): per row ``t ~ U[noise_min, noise_max]``, each response
    token independently with probability ``t``.
    ``"block"`` (what inference sees): per row a clean prefix up to a random
    cut inside the response, then a run of ``block_size`` EOS; the rest stays
    clean. ``noise_min``/``noise_max`` then bound the cut as a fraction of the
    response length.
    ``"prefix"``: per row a clean prefix up to a cut drawn uniformly over the
    response, then each token independently with probability ``t``, as ``"iid"``
    (with ``loss_window`` in :func:`iterative_refine_loss`: the refine fine-tuning
    recipe of docs/quality.md).
    """
    response = response_mask.bool()
    rows, width = response.shape
    device = response.device
    t = noise_min + (noise_max - noise_min) * torch.rand(rows, 1, generator=generator, device=device)
    if schedule == "iid":
        return response & (torch.rand(rows, width, generator=generator, device=device) < t)
    if schedule not in ("block", "prefix"):
        raise ValueError(f"noise_schedule must be 'iid', 'block' or 'prefix', got {schedule!r}")
    # index of each token inside its row's response: 0, 1, ..., length - 1
    index = response.long().cumsum(-1) - 1
    length = response.sum(-1, keepdim=True)
    if schedule == "prefix":
        cut = (torch.rand(rows, 1, generator=generator, device=device) * length).floor().long()
        return response & (index >= cut) & (torch.rand(rows, width, generator=generator, device=device) < t)
    cut = (t * length).floor().long().clamp(max=(length - 1).clamp(min=0))
    return response & (index >= cut) & (index < cut + block_size)


def windowed_targets(response: torch.Tensor, noise: torch.Tensor, window: int) -> torch.Tensor:
    """Logit positions (as in :func:`response_targets`) whose target lies before ``first + window``.

    ``first`` is each row's first noised response token (rows without noise keep every target).
    """
    index = response.long().cumsum(-1) - 1  # index inside the response
    never = torch.full_like(index, torch.iinfo(index.dtype).max // 2)
    first = torch.where(noise, index, never).min(-1, keepdim=True).values
    target_index = torch.cat([index[:, 1:], index.new_full((index.size(0), 1), -1)], dim=1)
    return target_index < first + window


def response_loss_and_argmax(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    where: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the response targets, and the greedy predictions there.

    ``chunk_size=None`` calls the model as is and keeps its ``[B, T, V]``
    logits. An int runs the decoder for hidden states and projects only the
    response positions, ``chunk_size`` at a time (large vocabularies), through
    the model's own head path (:func:`dllm.training.lm_head.head_logits`). The chunked
    path calls the decoder and the head separately: fine under DDP and
    DeepSpeed, not under FSDP1, whose root unit owns ``lm_head``.
    """
    position_ids = position_ids_from_mask(attention_mask)
    count = max(targets.numel(), 1)
    if chunk_size is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        selected = at_least_fp32(logits[where])
        loss = F.cross_entropy(selected, targets, reduction="sum") / count
        return loss, selected.detach().argmax(-1)
    hidden = decoder_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    total, argmax = chunked_loss_and_argmax(model, hidden[where], targets, chunk_size)
    return total / count, argmax


def iterative_refine_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eos_token_id: int,
    num_rounds: int = 2,
    loss_weights: list[float] | None = None,
    noise_min: float = 0.1,
    noise_max: float = 0.9,
    generator: torch.Generator | None = None,
    noise_schedule: NoiseSchedule = "iid",
    block_size: int = 8,
    ar_loss_weight: float = 0.0,
    loss_chunk_size: int | None = None,
    loss_window: int | None = None,
    consistency: Consistency = "hard",
    drift_weight: float = 0.0,
    reference: BaseReference | None = None,
) -> RefineLossOutput:
    """The iterative-refine loss (docs/method.md, section 8).

    Args:
        model: any HF causal LM.
        input_ids: ``[B, T]`` prompt + response (+ padding).
        attention_mask: ``[B, T]``, 0 on padding.
        response_mask: ``[B, T]``, 1 on response tokens including the closing EOS.
        eos_token_id: the noise token (EOS doubles as the inference placeholder).
        num_rounds: forward passes; round ``r > 0`` reads round ``r - 1``'s argmax.
        loss_weights: one weight per round; ``None`` = all 1.0.
        noise_min: lower bound of the per-row noise ratio ``t``.
        noise_max: upper bound of the per-row noise ratio ``t``.
        generator: ``torch.Generator`` (on the ids' device) for the noise.
        noise_schedule: ``"iid"`` (the original method's), ``"block"`` (clean prefix, then
            a run of ``block_size`` EOS) or ``"prefix"``, see :func:`eos_noise_mask`; or ``"packed"``:
            every block of every response in one forward (:mod:`dllm.training.packed`), each block's tokens EOS
            with probability ``t ~ U[noise_min, noise_max]``.
        block_size: EOS run length for ``noise_schedule="block"``; ``N``, the draft tokens per block
            (the inference ``add_eos_length``), for ``"packed"``.
        ar_loss_weight: weight of an extra clean-input next-token loss (against
            collapse, as in CLLM); 0 skips that forward. ``"packed"`` computes it in the
            rounds' forward (no extra forward) and always reports it.
        loss_chunk_size: project the LM head this many positions at a time
            (saves memory with large vocabularies); ``None`` = all at once.
        loss_window: score the rounds only on each row's targets before its first
            noised token (clean context) and on ``loss_window`` targets from that
            token on; later targets, whose context holds more noise than a block
            of ``loss_window`` tokens, are skipped. Set it to the inference block
            (N + 1) with ``noise_schedule="prefix"``. ``None`` scores every
            response target. The ``ar_loss_weight`` term always scores all. Not with ``"packed"``.
        consistency: ``"packed"`` only: ``"hard"`` scores a noisy token against the clean token,
            ``"soft"`` against the clean stream's detached distribution for the same target
            (``KL(clean || noisy)``).
        drift_weight: weight of the drift term, ``KL(base || model)`` per answer token on the clean answer
            (:mod:`dllm.training.drift`): it keeps the tuned model's next-token distributions the base model's. 0 = off.
            The i.i.d. schedules run the clean forward for it (shared with ``ar_loss_weight``); ``"packed"``
            takes the clean stream of the rounds' forward. Either way one more no-grad forward of the base.
            Not with ``loss_chunk_size``.
        reference: the base model's logits (:class:`dllm.training.drift.BaseReference`), needed when
            ``drift_weight > 0``.
    """
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
    weights = [1.0] * num_rounds if loss_weights is None else list(loss_weights)
    if len(weights) != num_rounds:
        raise ValueError(f"loss_weights must have num_rounds={num_rounds} entries, got {weights}")
    if not 0 <= noise_min <= noise_max <= 1:
        raise ValueError(f"need 0 <= noise_min <= noise_max <= 1, got noise_min={noise_min}, noise_max={noise_max}")

    if loss_window is not None and loss_window < 1:
        raise ValueError(f"loss_window must be >= 1 or None, got {loss_window}")
    if noise_schedule not in ("iid", "block", "prefix", "packed"):
        raise ValueError(f"noise_schedule must be 'iid', 'block', 'prefix' or 'packed', got {noise_schedule!r}")
    if drift_weight < 0:
        raise ValueError(f"drift_weight must be >= 0, got {drift_weight}")
    if drift_weight > 0 and (reference is None or loss_chunk_size is not None):
        raise ValueError(
            "drift_weight > 0 needs a reference (dllm.training.drift.BaseReference) and loss_chunk_size=None"
        )
    base = None
    if drift_weight > 0:  # the base model's logits at the clean answer's scored positions, row-major
        response = response_mask.bool() & attention_mask.bool()
        base = reference(input_ids, attention_mask, position_ids_from_mask(attention_mask))
        base = base[response_targets(input_ids, response, attention_mask)[0]]
    if noise_schedule == "packed":
        if loss_window is not None:
            raise ValueError(f"loss_window must be None with noise_schedule='packed', got {loss_window}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        packed = pack_blocks(input_ids, attention_mask, response_mask, block_size=block_size,
                             eos_token_id=eos_token_id, noise_min=noise_min, noise_max=noise_max,
                             generator=generator)  # fmt: skip
        total, round_losses, ar_loss, drift = packed_refine_loss(
            model, packed, loss_weights=weights, consistency=consistency, loss_chunk_size=loss_chunk_size,
            base_clean_logits=base,
        )  # fmt: skip
        total = total + ar_loss_weight * ar_loss
        if drift is not None:
            total, drift = total + drift_weight * drift, drift.detach()
        return RefineLossOutput(loss=total, round_losses=round_losses, noise_ratio=packed.noise_ratio.detach(),
                                ar_loss=ar_loss.detach(), drift=drift)  # fmt: skip

    response = response_mask.bool() & attention_mask.bool()
    all_where, all_targets = response_targets(input_ids, response, attention_mask)
    noise = eos_noise_mask(response, noise_min, noise_max, generator, noise_schedule, block_size)
    noise_ratio = noise.sum() / response.sum().clamp(min=1)
    where, targets = all_where, all_targets
    if loss_window is not None:
        where = all_where & windowed_targets(response, noise, loss_window)
        targets = input_ids[:, 1:][where[:, :-1]]

    ids = input_ids.masked_fill(noise, eos_token_id)
    total, round_losses = 0.0, []
    for weight in weights:
        loss, argmax = response_loss_and_argmax(model, ids, attention_mask, where, targets, loss_chunk_size)
        total = total + weight * loss
        round_losses.append(loss.detach())
        # next round: clean prompt, response position p holds argmax of logits at p - 1
        ids = input_ids.clone()
        ids[:, 1:][where[:, :-1]] = argmax
    ar_loss = drift = None
    if drift_weight > 0:  # one clean forward with grad gives both the AR term and the drift term
        position_ids = position_ids_from_mask(attention_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        clean = at_least_fp32(logits[all_where])
        loss = F.cross_entropy(clean, all_targets, reduction="sum") / max(all_targets.numel(), 1)
        drift = kl_to_base(clean, base).sum() / max(all_targets.numel(), 1)
        total = total + ar_loss_weight * loss + drift_weight * drift
        ar_loss, drift = loss.detach(), drift.detach()
    elif ar_loss_weight > 0:
        loss, _ = response_loss_and_argmax(model, input_ids, attention_mask, all_where, all_targets, loss_chunk_size)
        total = total + ar_loss_weight * loss
        ar_loss = loss.detach()
    return RefineLossOutput(loss=total, round_losses=round_losses, noise_ratio=noise_ratio.detach(), ar_loss=ar_loss,
                            drift=drift)  # fmt: skip
