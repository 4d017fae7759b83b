"""Logits of selected positions through the model's own head, a chunk at a time.

The objective scores a few positions of long rows over a large vocabulary; the
``[B, T, V]`` logits of a plain forward can be the largest tensor of a step. So
the objective may run the decoder for hidden states and project only the scored
positions, ``chunk_size`` rows at a time, recomputing each chunk in backward.

Architectures do not agree on what follows the LM head: Granite divides the
logits by ``logits_scaling``, Cohere multiplies them by ``logit_scale``, Gemma
2/3 soft-cap them with a tanh, Falcon-H1 multiplies by the decoder's
``lm_head_multiplier``, and remote-code models may do anything. Rather than
copy each rule, :func:`head_logits` runs the model's own ``forward`` with its
decoder stood in by the given hidden states: whatever the forward does after
the decoder, the chunked logits get too.

Also which positions are scored (:func:`response_targets`) and their position ids, shared by the
objective and the drift meter (:mod:`dllm.training.drift`), which the objective imports.

Pure PyTorch: no Lightning here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in fp32 (or fp64 for fp64 models), never in bf16."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class _DecoderOutput(dict):
    """A decoder's output holding only ``last_hidden_state`` (also item 0); any other field reads as ``None``."""

    def __getattr__(self, name: str):
        return self.get(name)

    def __getitem__(self, key):
        return self["last_hidden_state"] if key == 0 else dict.__getitem__(self, key)


class _GivenHiddenStates(torch.nn.Module):
    """Stands in for a model's decoder: returns fixed hidden states, forwards attribute reads to the decoder."""

    def __init__(self, decoder: torch.nn.Module, hidden: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "_decoder", decoder)  # not a submodule: parameters stay the decoder's
        object.__setattr__(self, "_hidden", hidden)

    def forward(self, *args, **kwargs) -> _DecoderOutput:
        return _DecoderOutput(last_hidden_state=self._hidden)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_decoder"), name)


def causal_lm(model):
    """The HF causal LM itself, under a PEFT wrapper if there is one."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def decoder_hidden_states(model, **inputs) -> torch.Tensor:
    """The decoder's last hidden states (``[B, T, d]``), without the LM head."""
    return causal_lm(model).base_model(**inputs).last_hidden_state


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """``model``'s logits for decoder outputs ``hidden`` (``[n, d]`` -> ``[n, V]``), as its forward computes them.

    The model's decoder (``model.base_model``) is swapped for the given hidden
    states for the length of one ``forward`` call, so every scaling or cap the
    architecture applies after its decoder applies here too.
    """
    model = causal_lm(model)
    prefix = model.base_model_prefix
    decoder = getattr(model, prefix)
    setattr(model, prefix, _GivenHiddenStates(decoder, hidden[None]))
    try:
        logits = model(inputs_embeds=hidden[None], use_cache=False).logits[0]
    finally:
        setattr(model, prefix, decoder)
    return logits


def chunked_loss_and_argmax(
    model, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int, soft_targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and argmax of ``model``'s logits over the rows of ``hidden``, ``chunk_size`` rows at a time.

    Each chunk's logits are recomputed in backward (activation checkpointing),
    so at most ``chunk_size x V`` fp32 logits exist at once.

    Args:
        model: the causal LM whose head projects ``hidden``.
        hidden: ``[n, d]`` decoder outputs at the scored positions.
        targets: ``[n]`` token ids: cross-entropy against them.
        chunk_size: rows per chunk.
        soft_targets: ``[n, d]`` decoder outputs (detached) whose distributions replace the hard
            targets: the loss is then ``KL(p_soft || p)`` (see :func:`soft_loss`).
    """

    def chunk_loss(h: torch.Tensor, y: torch.Tensor, *soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = at_least_fp32(head_logits(model, h))
        if soft:
            with torch.no_grad():
                teacher = at_least_fp32(head_logits(model, soft[0]))
            loss = soft_loss(logits, teacher)
        else:
            loss = F.cross_entropy(logits, y, reduction="sum")
        return loss, logits.detach().argmax(-1)

    total, argmax = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32)), []
    for start in range(0, hidden.size(0), chunk_size):
        args = [hidden[start : start + chunk_size], targets[start : start + chunk_size]]
        if soft_targets is not None:
            args.append(soft_targets[start : start + chunk_size])
        if torch.is_grad_enabled():
            loss, pred = checkpoint(chunk_loss, *args, use_reentrant=False)
        else:
            loss, pred = chunk_loss(*args)
        total = total + loss
        argmax.append(pred)
    return total, torch.cat(argmax) if argmax else targets.clone()


def soft_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Summed ``KL(softmax(teacher) || softmax(logits))`` over rows; the teacher gets no gradient.

    Its gradient is the soft-target cross-entropy's; the KL is 0 when the two agree.
    """
    teacher = F.log_softmax(teacher_logits.detach(), -1)
    return F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="sum")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum - 1`` of the attention mask: padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_targets(
    input_ids: torch.Tensor, response_mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the loss counts and what it predicts.

    Returns ``(where, targets)``: ``where[b, p]`` is True when the logits at
    position ``p`` predict a response token (``response_mask[b, p + 1] == 1``)
    and ``p`` is a token of the row (``attention_mask[b, p] == 1``: a left-padded
    row with no prompt has only padding before its first token, which predicts nothing);
    ``targets`` are those clean tokens, in row-major order.
    """
    where = response_mask[:, 1:].bool()
    if attention_mask is not None:
        where = where & attention_mask[:, :-1].bool()
    where = torch.cat([where, where.new_zeros(where.size(0), 1)], dim=1)
    return where, input_ids[:, 1:][where[:, :-1]]
