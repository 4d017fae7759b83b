"""What the model's own jacobi drafts confirm per forward when every forward drafts ``k``: the draft policy's
measure of a length for them.

Apart from ``dllm.generation.drafting`` because it is one computation with its own reasoning: a Markov chain on
the number of guesses a draft holds, from a row's survival curve. The policy calls it for the rows that verify
the model's own drafts; text candidates are read off their curve directly.
"""

from __future__ import annotations

import numpy as np

FAINT = 1e-3  # a guess position that no row reaches with this chance is left out of the chain


def steady(curves: np.ndarray, ks: np.ndarray, steps: int = 8) -> np.ndarray:
    """Expected confirmed tokens per forward of the model's own drafts when every forward drafts ``k``.

    A jacobi forward of ``k`` draft tokens that confirms ``a`` leaves ``k - a``
    guesses for the next one (the rest of its draft is placeholders, never
    confirmed). So drafting ``k`` forward after forward is a Markov chain on
    the number of guesses ``g``: ``g`` guesses confirm ``a`` with the chances of
    the row's survival curve, and leave ``k - a``. This returns the mean ``a``
    over ``steps`` forwards from ``g = k`` (the second half: past the start,
    and averaging out a chain that alternates). Reading the curve at ``k``
    instead (every draft token a guess) priced a long draft as if the next
    forward's guesses came for free and a short one as if it did not starve
    the next: on the recipe model of ``bench/quality.py`` the policy settled
    on 5-6 tokens where 15 were 40% faster. The curve at the mean number of
    guesses (``a = E(k - a)``) is not enough either: the curve is concave, so
    it overrated long drafts (6.2 tokens per forward at 15 where 5.4 came).

    Args:
        curves: ``[rows, max_draft + 1]``, expected confirmed tokens of ``g`` guesses (``E(g)``, increasing).
        ks: ``[rows, candidates]`` draft lengths (at most ``max_draft``).

    Returns:
        ``[rows, candidates]``: the mean confirmed tokens per forward.
    """
    rows = curves.shape[0]
    chances = np.clip(np.diff(curves, axis=1), 0.0, 1.0)  # [rows, j]: chance that the first j + 1 all confirm
    # guesses past the last position that any row reaches with chance FAINT add nothing: the chain
    # tracks at most `cut` of them (the longest draft may be 127; its matrices would be 128 x 128)
    cut = int(np.flatnonzero(chances.max(0) >= FAINT)[-1]) + 1 if (chances >= FAINT).any() else 0
    survive = np.ones((rows, cut + 2))
    survive[:, 1 : cut + 1] = chances[:, :cut]
    survive[:, cut + 1] = 0.0
    # [rows, g, a]: chance that g guesses confirm exactly a (a < g: broken at a + 1; a = g: all)
    index = np.arange(cut + 1)
    exact = survive[:, None, : cut + 1] - survive[:, None, 1:]
    exact = np.where(index[None, None, :] < index[None, :, None], exact, 0.0)
    exact[:, index, index] = survive[:, : cut + 1]
    mean = exact @ index  # [rows, g]: expected confirmed tokens of g guesses
    confirms = ks[:, :, None] - index[None, None, :]  # [rows, candidates, g']: the a that leaves g' < cut
    leaves = (confirms >= 0) & (confirms <= cut)
    confirms = np.clip(confirms, 0, cut)
    capped, capping = np.clip(ks - cut, 0, cut)[..., None], (ks >= cut)  # a <= k - cut leaves g' = cut
    state = (index[None, None, :] == np.minimum(ks, cut)[:, :, None]).astype(np.float64)  # [rows, candidates, g]
    confirmed = np.zeros(ks.shape)
    for step in range(steps):
        if step >= steps // 2:
            confirmed += (state * mean[:, None, :]).sum(-1)
        spread = state @ exact  # [rows, candidates, a]
        state = np.where(leaves, np.take_along_axis(spread, confirms, axis=2), 0.0)
        state[:, :, cut] = np.where(capping, np.take_along_axis(np.cumsum(spread, axis=2), capped, 2)[..., 0], 0.0)
    return confirmed / (steps - steps // 2)
