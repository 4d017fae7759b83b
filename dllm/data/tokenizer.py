"""Tokenizers and chat templates: any HF tokenizer by name or path, or the bundled byte-level default.

The default needs no files: transformers' ``ByT5Tokenizer`` maps bytes to ids
3..258 (0 pad, 1 ``</s>`` = EOS, 2 unk). We give it a small chat template so the
tiny default exercises the same chat path as real instruct models.

``render_chat`` turns a prompt into the text the model sees (the tokenizer's
template, another template, or none for base models) and ``response_text`` the
response into the text written after it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from dllm.data.records import plain_messages
from dllm.errors import UserError

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
        raise UserError(
            f"model.tokenizer: {source!r} has no eos_token; dllm needs one (it is the noise and stop token)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# ----------------------------------------------------------------------------
# Chat templates: how a prompt is rendered, and what the template appends for the reply


def chat_template_of(tokenizer: PreTrainedTokenizerBase, chat_template: bool | str = True) -> str | None:
    """The Jinja template to render prompts with, or ``None`` for raw prompts.

    Args:
        tokenizer: the tokenizer whose own template ``True`` selects.
        chat_template: ``True`` the tokenizer's template (``None`` when it has none), ``False`` none,
            or a Jinja template string.
    """
    if chat_template is False:
        return None
    if chat_template is True:
        return getattr(tokenizer, "chat_template", None) or None
    return chat_template


def _messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else plain_messages(prompt)


def render_chat(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], chat_template: bool | str = True
) -> tuple[str, str]:
    """The prompt text the model sees, and the generation prompt at its end.

    With a template the prompt is rendered with ``add_generation_prompt=True``; the generation
    prompt is what that flag appended (the difference to rendering without it):
    ``<|im_start|>assistant\\n`` for Qwen2.5, ``<｜Assistant｜><think>\\n`` for DeepSeek-R1
    distills. Only that text can overlap a response's opening (``response_text``); the user's
    own words never do. Without a template the prompt is the raw text (a message list joined by
    content: base models know no roles) and the generation prompt is empty.

    Args:
        tokenizer: renders the template.
        prompt: a string (one user message) or chat messages.
        chat_template: see ``chat_template_of``.
    """
    template = chat_template_of(tokenizer, chat_template)
    if template is None:
        return (prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in plain_messages(prompt))), ""
    messages = _messages(prompt)
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    before = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=False
    )
    return text, (text[len(before) :] if text.startswith(before) else "")


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], chat_template: bool | str = True
) -> str:
    """The prompt text the model sees (``render_chat`` without the generation prompt)."""
    return render_chat(tokenizer, prompt, chat_template)[0]


def response_text(response: str | list[dict], generation_prompt: str = "") -> str:
    """The response as it is written after the rendered prompt.

    Message lists are joined by the content of their assistant messages. R1-style templates
    open the reply themselves (their generation prompt ends with ``<think>\\n``), while training
    data written for them usually starts with that tag too: the longest opening of the response
    that the generation prompt already ends with, starting with ``<``, is not written twice.
    Nothing is removed without a template (``generation_prompt=""``), so a response that merely
    repeats the end of the user's prompt (``... starting with <html>`` / ``<html>...``) stays whole.

    Args:
        response: the response, a string or chat messages.
        generation_prompt: what the chat template appended to open the reply (``render_chat``).
    """
    if isinstance(response, list):
        response = "\n".join(
            m["content"] for m in plain_messages(response) if m.get("role", "assistant") == "assistant"
        )
    for k in range(min(len(generation_prompt), len(response)), 0, -1):
        opening = response[:k]
        if opening.lstrip().startswith("<") and generation_prompt.endswith(opening):
            return response[k:]
    return response


# ----------------------------------------------------------------------------
# Which tokenizer wrote a record's token ids


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """``"<name>@<16 hex digits>"``: a hash of what turns text into ids and back.

    It covers the tokenizer's class, its full serialization when it has a fast backend (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens) or else its vocabulary, and its special tokens. Token
    ids recorded under one fingerprint mean the same text under any tokenizer with that fingerprint.
    Computed once per tokenizer object (SmolLM2's 49k-token tokenizer: about 0.15 s).
    """
    cached = getattr(tokenizer, "_dllm_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    name = Path(tokenizer.name_or_path).name if tokenizer.name_or_path else type(tokenizer).__name__
    fingerprint = f"{name}@{h.hexdigest()[:16]}"
    tokenizer._dllm_fingerprint = fingerprint
    return fingerprint


def same_tokenizer(fingerprint: object, other: str) -> bool:
    """Whether two ``tokenizer_fingerprint`` values hash the same tokenizer (the names before ``@`` may differ)."""
    return isinstance(fingerprint, str) and fingerprint.rpartition("@")[2] == other.rpartition("@")[2]
