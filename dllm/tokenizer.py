"""Tokenizers: any HF tokenizer by name or path, or the bundled byte-level default.

The default needs no files: transformers' ``ByT5Tokenizer`` maps bytes to ids
3..258 (0 pad, 1 ``</s>`` = EOS, 2 unk). We give it a small chat template so the
tiny default exercises the same chat path as real instruct models.
"""

from __future__ import annotations

from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

BYTE_TOKENIZER = "byte"

# "Q: <prompt>\nA: <response></s>": short, since every character is a token.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'A: ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)


def load_tokenizer(source: str = BYTE_TOKENIZER, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer for ``source``: ``"byte"`` for the bundled default, else an HF name or local path.

    The tokenizer pads on the left (generation needs it) and always has a pad id
    (EOS when the tokenizer has none).
    """
    if source == BYTE_TOKENIZER:
        tokenizer = ByT5Tokenizer(extra_ids=0)
        tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {source!r} has no eos_token: dllm needs one (it is the noise and stop token)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
