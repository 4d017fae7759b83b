"""Stop strings inside the engine: a row retires at the token that completes one, where HF's ``generate`` stops.

``generate(stop_strings=..., tokenizer=...)`` checks after every token whether
the sequence (the prompt included) now ends with a stop string, allowing the
last token to run past the string's end ("st", "opera" completes "stop"), and
stops the row at that token. The engine commits several tokens per forward (a
jacobi commit, a refine block), so a stop string may be completed by any of
them, or span this commit, earlier ones and the prompt. After each step the
engine checks every row that committed tokens once at each new token, in one
call of transformers' own ``StopStringCriteria`` over windows that end at those
tokens (so the semantics are HF's, not a re-implementation). The criterion reads
only the last ``maximum_token_len`` tokens (the longest stop string's length in
characters, or bytes for byte-level vocabularies: every token holds at least
one), so a check costs the same whatever the length of the text. The row keeps
its tokens up to the first one that completed a stop string and drops the rest
of the commit: its tokens are HF's.

Callers with other stop semantics (lm-eval's ``hf`` model looks for the string
in the decoding of the last few *generated* tokens, ``dllm.evaluation.stops``)
give ``stop_criterion``: a callable that reads a row's generated tokens and
says where it stops, checked at the same point.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from transformers import StopStringCriteria

# (a row's generated tokens, how many of them were there before this step) -> how many to keep, or None to go on
StopCriterion = Callable[[Sequence[int], int], "int | None"]

# HF's criterion per tokenizer and stop strings: building one reads the whole vocabulary (0.3 s for SmolLM2's
# 49k tokens even with HF's own cache, which sorts the vocabulary to make its key), once per generation call
# or request otherwise
_CRITERIA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StopChecks:
    """Where the rows of one generation stop on a stop string or a caller's criterion.

    Build it with :meth:`build` (which checks the arguments); ``ends`` is called after every step.

    Args:
        criterion: HF's stop-string criterion, or ``None``.
        custom: the caller's :data:`StopCriterion`, or ``None``.
        prompts: each row's unpadded prompt ids (HF's criterion reads them too).
    """

    def __init__(self, criterion: StopStringCriteria | None, custom: StopCriterion | None, prompts: list[list[int]]):
        self.criterion, self.custom = criterion, custom
        self.window = criterion.maximum_token_len if criterion is not None else 0
        self.enders = _enders(criterion) if criterion is not None else None
        # ids past the vocabulary are clamped to an entry that matches nothing: the start of a short sequence
        self.filler = criterion.embedding_vec.size(0) - 1 if criterion is not None else 0
        self.contexts = [list(p[len(p) - self.window + 1 :]) if self.window > 1 else [] for p in prompts]

    @classmethod
    def build(
        cls,
        stop_strings: str | Sequence[str] | None,
        tokenizer,
        stop_criterion: StopCriterion | None,
        prompts: list[list[int]],
    ) -> StopChecks | None:
        """The checks for these arguments (``None`` when there is nothing to check); ``ValueError`` on bad ones."""
        strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        if strings is not None and (
            not isinstance(strings, Sequence) or not all(isinstance(s, str) and s for s in strings)
        ):
            raise ValueError(f"stop_strings must be a string or a list of non-empty strings, got {stop_strings!r}")
        if strings and tokenizer is None:
            raise ValueError(
                f"stop_strings={list(strings)!r} needs tokenizer= (the model's tokenizer reads the committed text), "
                "got tokenizer=None"
            )
        if stop_criterion is not None and not callable(stop_criterion):
            raise ValueError(f"stop_criterion must be callable (tokens, start) -> int | None, got {stop_criterion!r}")
        if not strings and stop_criterion is None:
            return None
        return cls(_criterion(tokenizer, tuple(strings)) if strings else None, stop_criterion, prompts)

    def ends(self, rows: Sequence[int], generated: Sequence[Sequence[int]], starts: Sequence[int]) -> list[int | None]:
        """Per row: how many of its ``generated`` tokens it keeps when one after ``starts[i]`` stopped it, else None.

        Args:
            rows: each row's index in the generation (its prompt).
            generated: each row's generated tokens, this step's included.
            starts: how many of them were there before this step.
        """
        ends: list[int | None] = [None] * len(rows)
        if self.criterion is not None:
            ends = self._string_ends(rows, generated, starts)
        if self.custom is not None:
            for i, (tokens, start) in enumerate(zip(generated, starts)):
                if len(tokens) > start:
                    seen = tokens[: ends[i] or len(tokens)]  # up to a stop string's end, if one came first
                    end = self.custom(seen, start)
                    if end is not None and not (isinstance(end, int) and start < end <= len(seen)):
                        raise ValueError(
                            f"stop_criterion returned {end!r}; it must be None or a count of tokens to keep in "
                            f"({start}, {len(seen)}] (a token of this step stopped the row)"
                        )
                    ends[i] = end if ends[i] is None or end is None else min(ends[i], end)
        return ends

    def _string_ends(self, rows, generated, starts) -> list[int | None]:
        """HF's criterion at each new token of each row, in one call: the first token that completed a string."""
        windows, owners = [], []
        for i, (row, tokens, start) in enumerate(zip(rows, generated, starts)):
            text = self.contexts[row] + list(tokens[max(0, start - self.window + 1) :])
            offset = len(text) - (len(tokens) - start)  # text[offset + j] is the j-th new token
            for j in range(len(tokens) - start):
                if self.enders is not None and tokens[start + j] not in self.enders:
                    continue  # a match must overlap the last token: this one holds no stop string's end
                window = text[max(0, offset + j + 1 - self.window) : offset + j + 1]
                windows.append([self.filler] * (self.window - len(window)) + window)
                owners.append((i, start + j + 1))
        ends: list[int | None] = [None] * len(rows)
        if not windows:
            return ends
        hits = self.criterion(torch.tensor(windows, dtype=torch.long), None).tolist()
        for (i, end), hit in zip(owners, hits):
            if hit and ends[i] is None:
                ends[i] = end
        return ends


def _criterion(tokenizer, strings: tuple[str, ...]) -> StopStringCriteria:
    """HF's criterion for these strings, built once per tokenizer (the last 8 sets of strings are kept)."""
    try:
        built = _CRITERIA.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        built = {}
    if strings not in built:
        try:
            criterion = StopStringCriteria(tokenizer, list(strings))
        except ValueError as error:  # no token of the vocabulary can end one of them
            raise ValueError(f"stop_strings={list(strings)!r}: {error}") from None
        if len(built) >= 8:
            del built[next(iter(built))]
        built[strings] = criterion
    return built[strings]


def _enders(criterion: StopStringCriteria) -> set[int] | None:
    """The ids of the tokens that can end a match: those that overlap the end of some stop string.

    HF's criterion starts every match at the last token's end overlap (``initial_match = end_lengths > 0``;
    its embedding holds each token's overlaps, -1 where none), so a window whose last token has none cannot
    match: most steps then need no criterion call. ``None`` (check every token) if this transformers lays
    the embedding out otherwise.
    """
    vec = getattr(criterion, "embedding_vec", None)
    positions, strings = getattr(criterion, "max_valid_positions", None), getattr(criterion, "num_stop_strings", None)
    if vec is None or positions is None or strings is None:
        return None
    overlaps = vec[:, positions * strings : -1]
    return set((overlaps > 0).any(-1).nonzero().flatten().tolist())
