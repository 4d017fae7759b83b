"""Tokenizers and chat templates: any HF tokenizer by name or path, or the bundled byte-level default.

The default needs no files: transformers' ``ByT5Tokenizer`` maps bytes to ids
3..258 (0 pad, 1 ``</s>`` = EOS, 2 unk). We give it a small chat template so the
tiny default exercises the same chat path as real instruct models.

``render_chat`` turns a prompt into the text the model sees (the tokenizer's
template, another template, or none for base models) and ``response_text`` the
response into the text written after it.
"""

from __future__ import annotations

from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

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
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


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
        return (prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)), ""
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
        response = "\n".join(m["content"] for m in response if m.get("role", "assistant") == "assistant")
    for k in range(min(len(generation_prompt), len(response)), 0, -1):
        opening = response[:k]
        if opening.lstrip().startswith("<") and generation_prompt.endswith(opening):
            return response[k:]
    return response
