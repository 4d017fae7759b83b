"""Where lm-eval's ``hf`` model stops a generation, computed on tokens generated another way.

lm-eval's ``hf`` model hands ``model.generate`` one ``MultiTokenEOSCriteria`` per stop string: after
every new token it decodes the last ``len(encode(stop)) + 2`` generated tokens and stops once the stop
string is in them; ``generate`` itself stops a row at an EOS id. The text is then decoded and cut
before the first occurrence of each stop string (``postprocess_generated_text``).

The dllm engine commits several tokens per forward and has no stop-string hook: it generates until an
EOS id or its token budget. ``stop_point`` finds the token after which ``hf`` would have stopped (at
batch size 1); the text is decoded from the tokens up to there and cut by lm-eval's own function. Greedy
jacobi decoding therefore returns exactly ``hf``'s strings, whether a stop string falls inside a block
or spans two. (In a batch, ``hf`` stops only when every row has met a stop string, so its rows run on
past theirs; the cut text is the same unless one stop string overlaps the end of another.)
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def stop_point(
    tokens: Sequence[int], stops: Sequence[str], eos_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> int | None:
    """How many of ``tokens`` lm-eval's ``hf`` model generates before it stops.

    Args:
        tokens: the generated tokens (without the prompt).
        stops: the request's stop strings (lm-eval adds the EOS token's text).
        eos_ids: the ids ``generate`` stops at (the model's generation config and the tokenizer's EOS).
        tokenizer: the model's tokenizer; the stop strings are looked for in its decoding.

    Returns:
        The number of tokens up to and including the one that triggered a stop; ``None`` if none did.
    """
    eos = set(eos_ids)
    # as MultiTokenEOSCriteria: look back two tokens more than the stop string's own encoding; an empty stop
    # string is in every text, so it stops after the first token as hf's criterion does
    lookbacks = [(stop, len(tokenizer.encode(stop, add_special_tokens=False)) + 2) for stop in stops]
    for end in range(1, len(tokens) + 1):
        if tokens[end - 1] in eos:
            return end
        for stop, lookback in lookbacks:
            if stop in tokenizer.decode(tokens[max(0, end - lookback) : end]):
                return end
    return None
