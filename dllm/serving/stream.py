"""Committed tokens to streamed text: incremental, UTF-8 safe detokenization, and stop strings that never leak.

A forward commits a few tokens; the client should see their text at once. Two
things can make the text of the tokens so far differ from what may be sent:

- a multi-byte character split across tokens (byte-level BPE, byte fallback,
  the byte tokenizer): its first bytes decode to nothing or to U+FFFD. The
  detokenizer keeps decoding from the last point where the text was complete
  (the prefix / read offsets of Hugging Face's ``TextStreamer`` and TGI) and
  sends nothing until the new text is complete again. Decoding with the
  earlier tokens as context also keeps the space that SentencePiece puts in
  front of a word, which decoding the new tokens alone would drop;
- a stop string: once its first characters appear, the rest may follow. The
  longest tail of the text that is a prefix of some stop string is held back;
  when a stop string appears, the text before it is sent and generation stops.

The concatenation of the deltas is the response text in both streamed and
whole responses (one code path), so a stream equals its non-streamed answer.
"""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
    """Incremental ``tokenizer.decode`` of a growing token list.

    Args:
        tokenizer: a Hugging Face tokenizer.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # tokens before this were sent; decoding starts here for context
        self.read = 0  # tokens before this were sent

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, tokens: Sequence[int]) -> str:
        """Add tokens; the text that became complete (maybe empty)."""
        self.ids.extend(tokens)
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd") and text.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """The text not sent yet (an incomplete character at the very end is decoded as it is)."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :] if text.startswith(before) else text


class StopStrings:
    """Holds back text that may be the start of a stop string; finds the first complete one.

    Args:
        stops: the stop strings (none: everything passes through).
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """``(text to send, stopped)``; after a stop nothing more may be pushed."""
        text = self.held + text
        found = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            self.held = ""
            return text[: min(found)[0]], True
        keep = 0
        for stop in self.stops:  # the longest tail that a stop string starts with
            for n in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of a response that did not stop on a string."""
        text, self.held = self.held, ""
        return text


class TextStream:
    """One response's tokens to text deltas: the detokenizer, then the stop strings.

    Args:
        tokenizer: decodes the tokens.
        stop_ids: token ids that end a response (not part of its text).
        stops: stop strings.
    """

    def __init__(self, tokenizer, stop_ids: Sequence[int], stops: Sequence[str] = ()):
        self.detokenizer = Detokenizer(tokenizer)
        self.stop_strings = StopStrings(stops)
        self.stop_ids = set(stop_ids)
        self.text = ""  # everything sent so far
        self.stopped = False  # a stop string appeared
        self.used = 0  # tokens of the last push that the response used: up to the one that completed a stop string

    def push(self, tokens: Sequence[int], last: bool = False) -> str:
        """The delta for one forward's committed ``tokens`` (``last``: the response ends with them).

        A forward commits several tokens; with stop strings they are read one at a time, so
        :attr:`used` says which of them completed a stop string: the tokens after it were committed
        but never answered, and ``usage.completion_tokens`` does not count them.
        """
        if self.stopped:
            self.used = 0
            return ""
        self.used = len(tokens)
        if not self.stop_strings.stops or len(tokens) < 2:
            return self._push(tokens, last)
        deltas = []
        for i, token in enumerate(tokens):
            deltas.append(self._push([token], last and i == len(tokens) - 1))
            if self.stopped:
                self.used = i + 1
                break
        return "".join(deltas)

    def _push(self, tokens: Sequence[int], last: bool) -> str:
        tokens = [t for t in tokens if t not in self.stop_ids]
        text = self.detokenizer.push(tokens)
        if last:
            text += self.detokenizer.flush()
        delta, self.stopped = self.stop_strings.push(text)
        if last and not self.stopped:
            delta += self.stop_strings.flush()
        self.text += delta
        return delta
