"""Exact sampling keyed on (seed, row key, position), at about the cost of greedy decoding.

Why: lossless jacobi decoding under sampling needs the token at a position to be
a deterministic function of the text before it, so that a draft drawn from a
guessed prefix equals the real draw once the prefix is right. And a prompt's
sample must not depend on its batch, its row, the world size or a resumed run.

How: every (seed, row key, generated position, attempt) gives one uniform ``u``
from a counter-based hash (splitmix64); nothing is stored between positions. The
token is the inverse CDF, in vocabulary order, of the tempered and top-k
filtered distribution at ``u``. Top-p without a sort: a draw is kept when the
probability mass strictly above it is below ``top_p`` (it is in the nucleus),
otherwise it is redrawn with the next attempt; the kept draw is distributed
exactly as the renormalised nucleus. After a few rejections (a tiny ``top_p``)
the nucleus is computed by sorting and drawn from directly, which is just as
exact. The cost is a few passes over the vocabulary per position and O(1)
random numbers, not a vocabulary-sized draw.

The row key is the caller's (``sample_keys``, e.g. a hash of the record id) or
a hash of the row's unpadded prompt ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_MASK = (1 << 64) - 1
_CHUNK = 1024  # vocabulary chunk of the two-level inverse CDF
_ATTEMPTS = 4  # top-p draws before the exact (sorted) nucleus
_BLOCK = 4  # rows of logits processed together


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a ``uint64`` array (wrapping arithmetic): a well-mixed 64-bit hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniforms(seed: int, keys: Sequence[int], positions: Sequence[int], attempt: int = 0) -> np.ndarray:
    """One uniform in ``[0, 1)`` per ``(seed, keys[i], positions[i], attempt)``, float64.

    Args:
        seed: the base seed of the call.
        keys: the row key of each draw (any int, taken modulo 2**64).
        positions: the generated position (0 = first generated token) of each draw.
        attempt: the redraw counter (top-p rejection).

    Returns:
        ``[len(keys)]`` float64 numbers with 53 random bits each.
    """
    k = np.array([key & _MASK for key in keys], dtype=np.uint64)
    p = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = splitmix64(splitmix64(np.full_like(k, seed & _MASK)) ^ k)
        h = splitmix64(h ^ (p * np.uint64(64) + np.uint64(attempt)))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def prompt_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """A 64-bit key per row from its unpadded prompt ids (same prompt, same key, in any batch)."""
    ids = input_ids.detach().cpu().numpy().astype(np.uint64)
    mask = attention_mask.detach().cpu().numpy().astype(bool)
    keys = []
    for row, keep in zip(ids, mask):
        tokens = row[keep]
        with np.errstate(over="ignore"):
            weights = np.cumprod(np.full(len(tokens), 0x100000001B3, dtype=np.uint64))
            h = splitmix64(np.array([(tokens + np.uint64(1)) @ weights], dtype=np.uint64) ^ np.uint64(len(tokens)))
        keys.append(int(h[0]))
    return keys


def draw_seed(generator: torch.Generator | None) -> int:
    """The call's base seed: one draw from ``generator`` (torch's global generator when ``None``)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask logits outside the top-k, then outside the nucleus top-p, with ``-inf`` (the reference).

    A token stays in the nucleus when the probability of the tokens strictly more
    likely than it is below ``top_p``; so the most likely token always stays, and
    tied tokens stay or go together. The sampler draws from exactly this set.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs = logits.softmax(-1)
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        # mass strictly above each sorted value: the mass before the first of its ties
        first = torch.searchsorted(-sorted_probs.contiguous(), -sorted_probs.contiguous(), side="left")
        above = before.gather(-1, first)
        kept = above < top_p
        threshold = torch.where(kept, sorted_probs, torch.full_like(sorted_probs, float("inf"))).amin(-1, True)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
    """Greedy or exact keyed sampling of ``[b, n, V]`` logits.

    Args:
        temperature: 0 for greedy (argmax), else the sampling temperature.
        top_k: keep the k most likely tokens (ties at the k-th value stay).
        top_p: keep the nucleus of mass ``top_p`` (see :func:`filter_logits`).
        seed: the call's base seed (see :func:`draw_seed`).
    """

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, seed: int = 0):
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.top_p = top_p if top_p is not None and top_p < 1.0 else None
        self._work: torch.Tensor | None = None

    @property
    def greedy(self) -> bool:
        """Whether decoding is argmax."""
        return self.temperature == 0

    def pick(self, logits: torch.Tensor, keys: Sequence[int], starts: Sequence[int]) -> torch.Tensor:
        """Tokens ``[b, n]`` for logits ``[b, n, V]`` at generated positions ``starts[i] + j``.

        Args:
            logits: the model's logits (not modified).
            keys: the row key of each of the ``b`` rows.
            starts: the generated position of each row's first logit.
        """
        if self.greedy:
            return logits.argmax(-1)
        b, n, vocab = logits.shape
        flat_keys = [key for key in keys for _ in range(n)]
        positions = [start + j for start in starts for j in range(n)]
        tokens = self._sample(logits.reshape(b * n, vocab), flat_keys, positions)
        return tokens.view(b, n)

    def _sample(self, logits: torch.Tensor, keys: list[int], positions: list[int]) -> torch.Tensor:
        """Inverse-CDF draws for ``[M, V]`` logits, a few rows at a time (so they stay in the CPU cache)."""
        x = logits if logits.dtype == torch.float64 else logits.float()
        rows, vocab = x.shape
        if self._work is None or self._work.shape[2] != vocab or self._work.dtype != x.dtype:
            self._work = x.new_empty(2, _BLOCK, vocab)  # weights and scratch, reused across calls
        u = torch.from_numpy(uniforms(self.seed, keys, positions))
        tokens = torch.empty(rows, dtype=torch.long, device=x.device)
        for start in range(0, rows, _BLOCK):
            stop = min(start + _BLOCK, rows)
            tokens[start:stop] = self._sample_block(
                x[start:stop], u[start:stop], keys[start:stop], positions[start:stop]
            )
        return tokens

    def _sample_block(self, x: torch.Tensor, u: torch.Tensor, keys: list[int], positions: list[int]) -> torch.Tensor:
        """Draws for up to ``_BLOCK`` rows; top-p by rejection (see the module docstring)."""
        b = x.size(0)
        weights, scratch = self._work[0, :b], self._work[1, :b]
        # 1. unnormalised tempered weights 2 ** ((x - max) * log2(e) / T) (the largest is 1; exp2 is the
        # fastest exponential on CPU), zero outside the top-k
        scale = math.log2(math.e) / self.temperature
        torch.add(x, x.amax(-1, keepdim=True), alpha=-1.0, out=weights).mul_(scale).exp2_()
        if self.top_k is not None and self.top_k < x.size(-1):
            kth = torch.topk(x, self.top_k, dim=-1).values[:, -1:]
            weights.masked_fill_(x < kth, 0.0)
        cdf = _ChunkedCdf(weights)
        tokens = cdf.invert(u)
        if self.top_p is None:
            return tokens
        # 2. top-p: keep a draw when the mass strictly above it is below top_p, else redraw
        todo = torch.arange(b, device=x.device)
        for attempt in range(1, _ATTEMPTS + 1):
            w = weights if len(todo) == b else weights[todo]
            drawn = w.gather(1, tokens[todo, None])
            over = torch.sub(w, drawn, out=scratch[: len(todo)]).clamp_(min=0.0)  # w - drawn where w > drawn
            above = over.sum(-1)
            above += drawn[:, 0] * over.sign_().sum(-1)  # + drawn x (how many are above it)
            todo = todo[above >= self.top_p * cdf.total[todo]]
            if len(todo) == 0:
                return tokens
            if attempt < _ATTEMPTS:
                redo = todo.tolist()
                u_redo = uniforms(self.seed, [keys[i] for i in redo], [positions[i] for i in redo], attempt)
                tokens[todo] = cdf.invert(torch.from_numpy(u_redo), todo)
        # 3. the exact nucleus for the rows left (a tiny top_p), then one more draw from it
        redo = todo.tolist()
        w = weights[todo]
        nucleus = w.masked_fill(torch.isinf(filter_logits(w.log(), top_p=self.top_p)), 0.0)
        u_redo = uniforms(self.seed, [keys[i] for i in redo], [positions[i] for i in redo], _ATTEMPTS)
        tokens[todo] = _ChunkedCdf(nucleus).invert(torch.from_numpy(u_redo))
        return tokens


class _ChunkedCdf:
    """Inverse CDF over ``[M, V]`` non-negative weights in vocabulary order, without a full cumsum.

    Chunk sums locate the chunk that holds ``u * total``; a cumsum inside that
    one chunk (float64) finds the token. A token of weight 0 is never returned.
    """

    def __init__(self, weights: torch.Tensor):
        self.weights = weights
        m, vocab = weights.shape
        full = vocab // _CHUNK * _CHUNK
        sums = [weights[:, :full].reshape(m, -1, _CHUNK).sum(-1)] if full else []
        if full < vocab:
            sums.append(weights[:, full:].sum(-1, keepdim=True))
        self.chunk_cdf = torch.cat(sums, dim=1).double().cumsum(-1)  # [M, chunks]
        self.total = self.chunk_cdf[:, -1]

    def invert(self, u: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[len(u)]`` for uniforms ``u`` of ``rows`` (default: all rows)."""
        device = self.weights.device
        u = u.to(device)
        rows = torch.arange(len(u), device=device) if rows is None else rows.to(device)
        chunk_cdf = self.chunk_cdf[rows]
        target = u * chunk_cdf[:, -1]
        chunk = torch.searchsorted(chunk_cdf, target[:, None], right=True).clamp(max=chunk_cdf.size(1) - 1)
        before = torch.where(chunk > 0, chunk_cdf.gather(1, (chunk - 1).clamp(min=0)), 0.0)
        vocab = self.weights.size(1)
        index = chunk * _CHUNK + torch.arange(_CHUNK, device=device)  # [n, CHUNK]
        piece = self.weights[rows[:, None], index.clamp(max=vocab - 1)].double()
        piece = piece.masked_fill(index >= vocab, 0.0)
        inside = piece.cumsum(-1)
        j = torch.searchsorted(inside, target[:, None] - before, right=True)
        # rounding can put the target past the chunk's end: take its last token of positive weight
        last = _CHUNK - 1 - (piece > 0).flip(-1).long().argmax(-1, keepdim=True)
        return (chunk * _CHUNK + torch.minimum(j, last)).squeeze(1)


def top_candidates(logits: torch.Tensor, temperature: float, k: int = 3) -> tuple[list, list]:
    """The ``k`` most likely ids and their probabilities per position of ``[n, V]`` logits.

    Probabilities are ``softmax(logits / temperature)`` (plain softmax when
    greedy), before top-k/top-p.
    """
    scaled = logits.double() / temperature if temperature > 0 else logits.double()
    probs, ids = scaled.softmax(-1).topk(min(k, logits.size(-1)), dim=-1)
    return ids.tolist(), probs.tolist()
