"""What ``iterative_generate`` takes and gives: the checks of its arguments, and the records it returns and traces.

``dllm.generation.engine`` runs a generation; this module holds its contract with
the caller, apart from the decoding: :func:`check_inputs` (every bad argument
fails at once, with the value it got, before any forward), :class:`GenerateOutput`
(what ``return_dict=True`` returns) and :class:`TraceStep` (what a ``trace`` hook
receives per forward). Both records are exported by ``dllm.generation``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerateOutput:
    """What ``iterative_generate(..., return_dict=True)`` returns.

    Attributes:
        sequences: ``[B, W + T]``: the prompt as given, then the generated
            tokens, right-padded with ``pad_token_id``.
        new_tokens: ``[B]`` number of generated tokens per row (stop token
            included; with stop strings, up to the token that completed one).
        finish_reason: per row, ``"eos"`` (a stop id was generated, or a stop
            string of ``stop_strings`` / ``stop_criterion`` ended the row: the
            SPEC allows only these two values, and both mean "stopped on its own
            text, not by the budget") or ``"length"`` (``max_new_tokens`` or
            ``max_length`` reached).
        num_forwards: model calls made for the batch (without ``sync_forwards``).
        forwards: ``[B]`` model calls each row took part in.
        tokens_per_forward: generated tokens per forward, per sequence:
            ``new_tokens.sum() / forwards.sum()``. For a single row this is
            total generated tokens / model calls.
        sync_forwards: dummy forwards made while other ranks were still
            generating (``sync_ranks=True``).
    """

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    finish_reason: list[str]
    num_forwards: int
    forwards: torch.Tensor
    tokens_per_forward: float
    sync_forwards: int = 0


@dataclass
class TraceStep:
    """One forward of the first row, as passed to ``iterative_generate(trace=...)``.

    Attributes:
        mode: ``"refine"`` or ``"jacobi"``.
        block: refine: the block index; jacobi: the forward index.
        round: refine: the round within the block (0 = the draft from
            placeholders); jacobi: always 0.
        draft: the tokens fed after the committed text: refine: placeholders,
            then the previous round's block; jacobi: the draft being verified.
        tokens: the decoded tokens: refine: the block; jacobi: the prediction
            after the last committed token and after each draft token.
        changed: per token: refine: differs from the previous round's block
            (all True in round 0); jacobi: differs from the draft's guess for
            that position (the last prediction had no guess: True).
        top_ids: the 3 most likely ids per position.
        top_probs: their probabilities (``softmax(logits / temperature)``, before
            top-k/top-p).
        accepted: jacobi: draft tokens committed by this forward (the confirmed
            prefix; a calibration step commits only what every row confirmed);
            refine: ``None``.
    """

    mode: str
    block: int
    round: int
    draft: list[int]
    tokens: list[int]
    changed: list[bool]
    top_ids: list[list[int]]
    top_probs: list[list[float]]
    accepted: int | None = None


def check_inputs(
    input_ids,
    attention_mask,
    eos_ids,
    add_eos_length,
    refine_iter,
    max_new_tokens,
    max_length,
    mode,
    temperature,
    top_k,
    top_p,
    sample_keys,
    sample_offsets,
) -> torch.Tensor:
    """Raise ``ValueError`` on the first bad argument of ``iterative_generate``; return the attention mask."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D integer tensor [batch, length], got {shape}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match "
            f"input_ids shape {tuple(input_ids.shape)}"
        )
    if not eos_ids:
        raise ValueError(f"eos_token_id is required (an int or a non-empty list of ints), got {eos_ids!r}")
    if add_eos_length < 0:
        raise ValueError(f"add_eos_length must be >= 0, got {add_eos_length}")
    if refine_iter < 1:
        raise ValueError(f"refine_iter must be >= 1, got {refine_iter}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if mode not in ("refine", "jacobi"):
        raise ValueError(f"mode must be 'refine' or 'jacobi', got {mode!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
    if sample_keys is not None and len(sample_keys) != input_ids.size(0):
        raise ValueError(f"sample_keys must hold one int per row ({input_ids.size(0)}), got {len(sample_keys)}")
    if sample_offsets is not None and (
        len(sample_offsets) != input_ids.size(0) or any(offset < 0 for offset in sample_offsets)
    ):
        raise ValueError(
            f"sample_offsets must hold one int >= 0 per row ({input_ids.size(0)}), got {list(sample_offsets)}"
        )
    lengths = attention_mask.sum(-1)
    for row, length in enumerate(lengths.tolist()):
        if length == 0:
            raise ValueError(f"input_ids row {row} is empty (attention_mask is all padding)")
        if length >= max_length:
            raise ValueError(f"input_ids row {row} has {length} prompt tokens, not below max_length={max_length}")
    if input_ids.size(1) and bool((attention_mask[:, -1] == 0).any()):
        row = int((attention_mask[:, -1] == 0).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} is right-padded; iterative_generate needs left padding "
            "(tokenizer.padding_side = 'left')"
        )
    return attention_mask
