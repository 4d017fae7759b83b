"""Where a jacobi draft's tokens come from: the model's own guesses, the text so far, or recycled guesses.

An untrained model's guesses after EOS placeholders are rarely right, so
jacobi decoding alone confirms almost nothing. But the text a model writes is
full of n-grams it has already seen: in the prompt (an edit, a rewrite, an
answer from a passage copies it), earlier in its answer, and in its own earlier
guesses. Each source here offers, per row and per forward, one candidate
continuation of the committed text; the jacobi loop verifies whichever the
policy (``dllm.generation.drafting``) picks, and a drafted token is committed only where
the forward confirms it, so no source can change the output, only how many
tokens a forward commits.

- ``"model"``: the model's unconfirmed predictions of the last forward (kept
  by the loop itself; it costs nothing to offer).
- ``"ngram"``: prompt lookup. The continuation of the most recent earlier
  occurrence of the last 3 (else 2, else 1) committed tokens, in the prompt
  and the generated text (Hugging Face's ``prompt_lookup_num_tokens`` takes
  the first occurrence in the prompt and generated text, of the last 2 or 1
  tokens). A dict per n-gram size maps each n-gram to where it last ended,
  updated with each committed token: O(1) per token and per lookup.
- ``"pool"``: recycling, as lookahead decoding and Jacobi Forcing do. After
  each forward, the first rejected draft token ``d`` keys two n-grams: what the
  forward predicted after ``d`` and the rest of the rejected draft. When the
  committed text later ends with ``d``, the newest n-gram under ``d`` is the
  candidate; one that is rejected at its first token is stale and is dropped.

Costs (per row and forward, Python on lists of ints): ngram a few dict
look-ups plus one insertion per n-gram size and committed token; pool a dict
look-up and at most two insertions; both keep the row's text (prompt and
generated) as a list. The verification cost is the same for every source: the
draft's columns in the forward.
"""

from __future__ import annotations

from collections.abc import Sequence

SOURCES = ("model", "ngram", "pool")  # index = source id; "model" must stay first (the loop's own drafts)
NGRAM, POOL = 1, 2  # indices in SOURCES
NGRAM_SIZES = (3, 2, 1)  # longest match first
POOL_PER_KEY = 4  # n-grams kept per key token, newest first


def parse_sources(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """The enabled sources, in :data:`SOURCES` order, from ``"all"``, ``"none"``, a comma list or a sequence.

    ``"none"`` (or an empty list) keeps only ``"model"``: a jacobi draft always
    has the model's own guesses to fall back on.

    Raises:
        ValueError: an unknown source name (the message names the argument).
    """
    if value is None or value == "all":
        return SOURCES
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in names if n and n != "none"]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"draft_sources: unknown source {unknown[0]!r}; choose from {', '.join(SOURCES)}, all, none")
    return tuple(s for s in SOURCES if s == "model" or s in names)


class NgramIndex:
    """One row's text and, per n-gram size, where each n-gram last ended (with a token after it)."""

    def __init__(self, tokens: Sequence[int], sizes: Sequence[int] = NGRAM_SIZES):
        self.tokens: list[int] = []
        self.sizes = tuple(sizes)
        self.tables: list[dict[tuple[int, ...], int]] = [{} for _ in self.sizes]
        self.extend(tokens)

    def extend(self, new: Sequence[int]) -> None:
        """Append committed tokens; every n-gram that now has a next token is indexed."""
        tokens, old = self.tokens, len(self.tokens)
        tokens.extend(new)
        for end in range(max(old, 1), len(tokens)):  # the n-grams ending just before tokens[end]
            for n, table in zip(self.sizes, self.tables):
                if end >= n:
                    table[tuple(tokens[end - n : end])] = end

    def lookup(self, length: int) -> list[int] | None:
        """Up to ``length`` tokens that followed the latest earlier occurrence of the text's last n-gram.

        A continuation that runs into the end of the text repeats it (a
        periodic pattern, as copying the tail onto itself would give).
        """
        tokens = self.tokens
        end = len(tokens)
        for n, table in zip(self.sizes, self.tables):
            if end < n:
                continue
            start = table.get(tuple(tokens[end - n :]))
            if start is not None:
                out = tokens[start : start + length]
                period = end - start
                while len(out) < length:
                    out.append(out[len(out) - period])
                return out
        return None


class Pool:
    """One row's recycled n-grams: key token -> continuations, newest first."""

    def __init__(self):
        self.table: dict[int, list[tuple[int, ...]]] = {}

    def add(self, key: int, gram: Sequence[int]) -> None:
        """Keep ``gram`` as a continuation after ``key`` (the newest; an older equal one moves up)."""
        if not gram:
            return
        gram = tuple(gram)
        entries = self.table.setdefault(key, [])
        if gram in entries:
            entries.remove(gram)
        entries.insert(0, gram)
        del entries[POOL_PER_KEY:]

    def lookup(self, key: int) -> tuple[int, ...] | None:
        """The newest continuation after ``key``, or ``None``."""
        entries = self.table.get(key)
        return entries[0] if entries else None

    def drop(self, key: int, gram: tuple[int, ...]) -> None:
        """Forget a stale continuation."""
        entries = self.table.get(key)
        if entries and gram in entries:
            entries.remove(gram)


class DraftSources:
    """The text-derived sources of every row of one generation (the model's own drafts live in the loop).

    Args:
        names: enabled sources (from :func:`parse_sources`).
        texts: each row's unpadded prompt ids.
        max_draft: the longest draft (``add_eos_length``).
    """

    def __init__(self, names: Sequence[str], texts: list[list[int]], max_draft: int):
        self.max_draft = max_draft
        self.ngram = [NgramIndex(t) for t in texts] if "ngram" in names and max_draft else None
        self.pool = [Pool() for _ in texts] if "pool" in names and max_draft else None
        self._last = [t[-1] for t in texts]  # each row's last committed token (the pool's key)

    @property
    def active(self) -> bool:
        """Whether any source beyond the model's own is on."""
        return self.ngram is not None or self.pool is not None

    def last(self, row: int) -> int:
        """Row ``row``'s last committed token (the pool's key)."""
        return self._last[row]

    def offers(self, rows: list[int]) -> list[list[tuple[int, ...] | list[int] | None]]:
        """Per active row, per source (``SOURCES`` order), the candidate or ``None`` (the model's slot is ``None``)."""
        out = []
        for row in rows:
            ngram = self.ngram[row].lookup(self.max_draft) if self.ngram is not None else None
            pool = self.pool[row].lookup(self._last[row]) if self.pool is not None else None
            out.append([None, ngram, pool])
        return out

    def observe(self, rows: list[int], drafts, tokens, confirmed: list[int], new: list[list[int]], stale) -> None:
        """Learn from one forward.

        Args:
            rows: original indices of the active rows.
            drafts: per row, the draft verified (list of ints).
            tokens: per row, the forward's picked tokens (one more than the draft).
            confirmed: per row, how many draft tokens the forward confirmed.
            new: per row, the tokens just committed.
            stale: per row, the pool candidate verified this forward (``(key, gram)``) or ``None``.
        """
        for i, row in enumerate(rows):
            draft, a = drafts[i], confirmed[i]
            if self.pool is not None:
                pool = self.pool[row]
                if stale[i] is not None and a == 0:
                    pool.drop(*stale[i])  # rejected at its first token: stale
                if a < len(draft):
                    key = draft[a]  # the first rejected draft token
                    pool.add(key, draft[a + 1 :])  # the rest of the rejected draft
                    pool.add(key, tokens[i][a + 1 :])  # what the model predicted after it (newest)
            if self.ngram is not None:
                self.ngram[row].extend(new[i])
            if new[i]:
                self._last[row] = new[i][-1]
