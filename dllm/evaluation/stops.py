"""Where lm-eval's ``hf`` model stops a generation: the criterion the engine checks, and the count for ``hf``.

lm-eval's ``hf`` model hands ``model.generate`` one ``MultiTokenEOSCriteria`` per stop string: after
every new token it decodes the last ``len(encode(stop)) + 2`` *generated* tokens and stops once the stop
string is in them; ``generate`` itself stops a row at an EOS id. The text is then decoded and cut
before the first occurrence of each stop string (``postprocess_generated_text``).

These are not HF's own ``stop_strings`` rules (those read the prompt too, and need the string to end at
the last token), so ``--model dllm`` gives the engine :class:`LmEvalStops` as its ``stop_criterion``:
``iterative_generate`` checks it after every step at each newly committed token and ends the row at the
first one where ``hf`` would have stopped (at batch size 1), dropping the rest of that forward's tokens.
The text is decoded from the kept tokens and cut by lm-eval's own function, so greedy jacobi returns
exactly ``hf``'s strings, whether a stop string falls inside a block or spans two. (In a batch, ``hf``
stops only when every row has met a stop string, so its rows run on past theirs; the cut text is the
same unless one stop string overlaps the end of another.)
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


class LmEvalStops:
    """``MultiTokenEOSCriteria``'s rule as an engine ``stop_criterion`` (``(tokens, start) -> int | None``).

    Args:
        stops: the request's stop strings (lm-eval adds the EOS token's text).
        tokenizer: the model's tokenizer; the stop strings are looked for in its decoding.
    """

    def __init__(self, stops: Sequence[str], tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        # as MultiTokenEOSCriteria: look back two tokens more than the stop string's own encoding; an empty stop
        # string is in every text, so it stops after the first token as hf's criterion does
        self.lookbacks = [(stop, len(tokenizer.encode(stop, add_special_tokens=False)) + 2) for stop in stops]

    def __call__(self, tokens: Sequence[int], start: int) -> int | None:
        """How many of ``tokens`` ``hf`` keeps when one after the first ``start`` met a stop string, else None.

        Only the new tokens are checked, each on the decoding of the few tokens that end at it: the earlier
        ones were checked when they were committed.
        """
        for end in range(start + 1, len(tokens) + 1):
            for stop, lookback in self.lookbacks:
                if stop in self.tokenizer.decode(tokens[max(0, end - lookback) : end]):
                    return end
        return None


def stop_point(
    tokens: Sequence[int], stops: Sequence[str], eos_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> int | None:
    """How many of ``tokens`` lm-eval's ``hf`` model generates before it stops (``dllm.evaluation.meter``
    counts ``hf``'s own tokens with it).

    Args:
        tokens: the generated tokens (without the prompt).
        stops: the request's stop strings (lm-eval adds the EOS token's text).
        eos_ids: the ids ``generate`` stops at (the model's generation config and the tokenizer's EOS).
        tokenizer: the model's tokenizer; the stop strings are looked for in its decoding.

    Returns:
        The number of tokens up to and including the one that triggered a stop; ``None`` if none did.
    """
    eos = set(eos_ids)
    criterion = LmEvalStops(stops, tokenizer)
    for end in range(1, len(tokens) + 1):
        if tokens[end - 1] in eos or criterion(tokens[:end], end - 1) is not None:
            return end
    return None
