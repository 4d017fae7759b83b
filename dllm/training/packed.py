"""The packed objective: every block of every answer scored in one forward (docs/method.md, section 8).

Each row becomes ``[prompt, clean response, a noisy copy of every block]``. A
block is ``N`` draft tokens after an *anchor*: anchors sit every ``N + 1``
tokens from a random offset per row (the first may be the prompt's last token),
so over the steps every response position is drafted. A noisy token is EOS with
probability ``t ~ U[noise_min, noise_max]`` (one ``t`` per block), else its
clean twin; it has the twin's position id, and attends to the clean stream up
to its anchor and to its own block causally. The clean stream is plainly causal
and never sees a noisy token, so its logits are those of a plain forward: they
give the next-token (AR) term for free, and each noisy token sees exactly what
block generation shows the model: the committed text, then the block so far.

Round ``r > 0`` replaces the noisy tokens by round ``r - 1``'s argmax of the
logits that predict them (the anchor's for a block's first token): the refine
step of block generation. The clean stream is the same in every round.

Pure PyTorch: no Lightning here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dllm.attention import attention_layout
from dllm.training.lm_head import at_least_fp32, chunked_loss_and_argmax, decoder_hidden_states, soft_loss

Consistency = Literal["hard", "soft"]

CLEAN, PADDING = -1, -2  # ``block`` of a clean-stream token, of padding; noisy tokens hold their block's index


@dataclass
class PackedBatch:
    """Rows in the packed layout, right-padded to one width ``L``.

    Attributes:
        input_ids: ``[B, L]`` clean tokens (prompt + response), then the noisy tokens of round 0.
        position_ids: ``[B, L]`` a clean token's position; a noisy token's twin's; 0 on padding.
        block: ``[B, L]`` ``CLEAN``, ``PADDING``, or the index (in its row) of a noisy token's block.
        limit: ``[B, L]`` the last clean position a token attends to (its own for clean tokens, its
            anchor's for noisy ones).
        targets: ``[B, L]`` the clean token each position predicts (-1: none).
        twin: ``[B, L]`` a noisy token's clean twin's column (itself elsewhere).
        feeder: ``[B, L]`` the column whose argmax a noisy token reads in the next round.
        noise_ratio: the share of noisy tokens that are EOS in round 0.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    block: torch.Tensor
    limit: torch.Tensor
    targets: torch.Tensor
    twin: torch.Tensor
    feeder: torch.Tensor
    noise_ratio: torch.Tensor

    @property
    def noisy(self) -> torch.Tensor:
        return self.block >= 0

    @property
    def clean_scored(self) -> torch.Tensor:
        """Clean-stream positions whose target is a response token: the AR term."""
        return (self.block == CLEAN) & (self.targets >= 0)


def pack_blocks(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    block_size: int,
    eos_token_id: int,
    noise_min: float,
    noise_max: float,
    generator: torch.Generator | None = None,
) -> PackedBatch:
    """Lay rows out as clean stream + a noisy copy of every block (see the module docstring).

    Args:
        input_ids: ``[B, T]`` prompt + response, padded on either side.
        attention_mask: ``[B, T]``, 0 on padding.
        response_mask: ``[B, T]``, 1 on the response (its real tokens must end the row).
        block_size: ``N``, draft tokens per block (a block yields ``N + 1`` tokens at inference).
        eos_token_id: the noise token.
        noise_min: lower bound of each block's EOS probability ``t``.
        noise_max: upper bound of ``t``.
        generator: for the offsets and the noise (on the ids' device).

    A draft whose target would lie past the response (the closing EOS's twin)
    is left out; a response of one token has no block.
    """
    rows, width = input_ids.shape
    device = input_ids.device
    offsets = torch.randint(block_size + 1, (rows,), generator=generator, device=device) - 1
    t = noise_min + (noise_max - noise_min) * torch.rand(rows, width + 1, generator=generator, device=device)
    draw = torch.rand(rows, width, generator=generator, device=device)
    real = attention_mask.bool()
    packed = []
    for b in range(rows):
        ids = input_ids[b][real[b]]
        response = response_mask[b][real[b]].bool()
        c, n = ids.numel(), int(response.sum())
        p = c - n
        if not response[p:].all():
            raise ValueError(f"response_mask row {b}: the response must be the last real tokens of the row")
        clean_pos = torch.arange(c, device=device)
        # response index j of every candidate draft; its place in the block counts from the anchor
        j = torch.arange(n, device=device)
        rel = j - offsets[b]
        k = torch.div(rel - 1, block_size + 1, rounding_mode="floor")  # block index in the row
        anchor = p + offsets[b] + k * (block_size + 1)  # the anchor's position
        # Each block needs its own anchor to be a token of the row: without a prompt, the offset -1 puts only
        # the first anchor before the row (testing the first block's anchor for every block dropped them all).
        drafted = (rel > 0) & (rel % (block_size + 1) != 0) & (j <= n - 2) & (anchor >= 0)
        j, k, anchor = j[drafted], k[drafted], anchor[drafted]
        noised = draw[b, j] < t[b, k]
        noisy_ids = torch.where(noised, torch.full_like(j, eos_token_id), ids[p + j])
        d = j.numel()
        noisy_cols = c + torch.arange(d, device=device)
        first = (p + j - 1) == anchor
        feeder = torch.where(first, anchor, noisy_cols - 1)
        targets = torch.full((c,), -1, dtype=torch.long, device=device)
        targets[max(p - 1, 0) : c - 1] = ids[max(p, 1) :]
        packed.append(
            {
                "input_ids": torch.cat([ids, noisy_ids]),
                "position_ids": torch.cat([clean_pos, p + j]),
                "block": torch.cat([torch.full((c,), CLEAN, device=device), k]),
                "limit": torch.cat([clean_pos, anchor]),
                "targets": torch.cat([targets, ids[p + j + 1]]),
                "twin": torch.cat([clean_pos, p + j]),
                "feeder": torch.cat([clean_pos, feeder]),
                "noised": noised,
            }
        )
    length = max(row["input_ids"].numel() for row in packed)
    fill = {"input_ids": eos_token_id, "position_ids": 0, "block": PADDING, "limit": -1, "targets": -1}
    out = {}
    for name in ("input_ids", "position_ids", "block", "limit", "targets", "twin", "feeder"):
        out[name] = torch.stack([_pad(row[name], length, fill.get(name)) for row in packed])
    noised = torch.cat([row["noised"] for row in packed])
    noise_ratio = noised.float().mean() if noised.numel() else torch.zeros((), device=device)
    return PackedBatch(**out, noise_ratio=noise_ratio)


def _pad(row: torch.Tensor, length: int, value: int | None) -> torch.Tensor:
    """Right-pad ``row`` to ``length`` with ``value`` (``None``: each padding column's own index)."""
    extra = torch.arange(row.numel(), length, device=row.device)
    return torch.cat([row, extra if value is None else torch.full_like(extra, value)])


def packed_attention_allowed(packed: PackedBatch, window: int | None = None) -> torch.Tensor:
    """``[B, L, L]`` bool: may query column ``q`` attend to key column ``k``.

    Clean tokens see the clean stream up to themselves; noisy tokens see it up
    to their anchor, and their own block up to themselves. Nothing sees padding;
    a padding query sees only itself (an empty softmax row would be NaN in some
    kernels; padding outputs are never read). ``window``: also keep only keys
    less than ``window`` positions back (sliding-window layers).
    """
    pos, block, limit = packed.position_ids, packed.block, packed.limit
    q_block, k_block = block[:, :, None], block[:, None, :]
    k_pos = pos[:, None, :]
    sees_clean = (k_block == CLEAN) & (k_pos <= limit[:, :, None])
    sees_own_block = (k_block == q_block) & (q_block >= 0) & (k_pos <= pos[:, :, None])
    allowed = (sees_clean | sees_own_block) & (q_block != PADDING)
    if window is not None:
        allowed = allowed & (pos[:, :, None] - k_pos < window)
    eye = torch.eye(block.size(1), dtype=torch.bool, device=block.device)[None]
    return allowed | (eye & (q_block == PADDING))


def packed_attention_mask(model, packed: PackedBatch):
    """The 4-D mask(s) the model's attention takes: ``[B, 1, L, L]``, bool for sdpa, additive for eager.

    Sliding-window models get the window in positions (a dict per layer kind
    for hybrids), as block generation does.
    """
    kind, window, hybrid = attention_layout(model)
    implementation = getattr(model.config, "_attn_implementation", None)
    if kind not in ("plain", "window") or implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"noise_schedule='packed' needs 4-D attention masks: attn_implementation 'sdpa' or 'eager' and "
            f"full or sliding-window attention layers, got {implementation!r} on {type(model).__name__}"
        )
    masks = {"full_attention": packed_attention_allowed(packed)}
    if window is not None:
        masks["sliding_attention"] = packed_attention_allowed(packed, window)
        if not hybrid:
            masks = {"sliding_attention": masks["sliding_attention"]}
    if implementation == "eager":
        zero = torch.zeros((), dtype=model.dtype, device=packed.block.device)
        masks = {name: torch.where(m, zero, torch.finfo(model.dtype).min) for name, m in masks.items()}
    masks = {name: m[:, None] for name, m in masks.items()}
    return masks if hybrid else next(iter(masks.values()))


def packed_refine_loss(
    model,
    packed: PackedBatch,
    *,
    loss_weights: list[float],
    consistency: Consistency = "hard",
    loss_chunk_size: int | None = None,
    base_clean_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """The rounds' draft losses and the clean stream's next-token loss, one forward per round.

    ``base_clean_logits``: the base model's logits at the clean stream's scored positions (row-major, as
    ``clean_scored``; a plain forward of the rows gives them, since the clean stream's logits are a plain
    forward's), for the drift term (:mod:`dllm.training.drift`); not with ``loss_chunk_size``.

    Returns:
        ``(sum_r w_r * draft_r, [draft_r detached], ar_loss)``: ``draft_r`` is the mean over all
        noisy tokens of the batch of the cross-entropy against the clean target (``consistency="hard"``)
        or of ``KL(clean || noisy)``, the clean stream's detached distribution for the same target
        (``"soft"``); ``ar_loss`` (with grad) is the mean next-token cross-entropy of the clean stream
        over the response targets, from round 0's forward; then ``drift`` (with grad), the mean
        ``KL(base || model)`` over the same positions, or ``None`` without ``base_clean_logits``.
    """
    if consistency not in ("hard", "soft"):
        raise ValueError(f"consistency must be 'hard' or 'soft', got {consistency!r}")
    if base_clean_logits is not None and loss_chunk_size is not None:
        raise ValueError("the drift term (base_clean_logits) needs loss_chunk_size=None")
    mask = packed_attention_mask(model, packed)
    noisy, clean = packed.noisy, packed.clean_scored
    rows, cols = noisy.nonzero(as_tuple=True)
    twin_cols, feeder_cols = packed.twin[noisy], packed.feeder[noisy]
    noisy_targets, clean_targets = packed.targets[noisy], packed.targets[clean]
    n_noisy, n_clean = max(noisy_targets.numel(), 1), max(clean_targets.numel(), 1)
    argmax = torch.zeros_like(packed.input_ids)  # per column, where scored: what the next round reads
    ids, total, round_losses, ar_loss, drift = packed.input_ids, 0.0, [], None, None
    for weight in loss_weights:
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": packed.position_ids}
        if loss_chunk_size is None:
            logits = model(**inputs).logits
            noisy_logits = at_least_fp32(logits[noisy])
            if consistency == "soft":
                draft = soft_loss(noisy_logits, at_least_fp32(logits[rows, twin_cols]))
            else:
                draft = F.cross_entropy(noisy_logits, noisy_targets, reduction="sum")
            argmax[noisy] = noisy_logits.detach().argmax(-1)
            if ar_loss is None:
                clean_logits = at_least_fp32(logits[clean])
                ar_loss = F.cross_entropy(clean_logits, clean_targets, reduction="sum") / n_clean
                argmax[clean] = clean_logits.detach().argmax(-1)
                if base_clean_logits is not None:  # the drift term: KL(base || model) on the clean stream
                    drift = soft_loss(clean_logits, base_clean_logits) / n_clean
        else:
            hidden = decoder_hidden_states(model, **inputs)
            soft = hidden[rows, twin_cols].detach() if consistency == "soft" else None
            draft, argmax[noisy] = chunked_loss_and_argmax(model, hidden[noisy], noisy_targets, loss_chunk_size, soft)
            if ar_loss is None:
                ar_sum, argmax[clean] = chunked_loss_and_argmax(model, hidden[clean], clean_targets, loss_chunk_size)
                ar_loss = ar_sum / n_clean
        draft = draft / n_noisy
        total = total + weight * draft
        round_losses.append(draft.detach())
        ids = ids.clone()
        ids[noisy] = argmax[rows, feeder_cols]
    return total, round_losses, ar_loss, drift
