"""Training examples and prompt items from records: tokenized, checked, never dropped silently.

The rules of docs/method.md, section 9. A training example is the record's prompt rendered by the chat
template and its response ending with exactly one EOS (none for a record cut by the generation budget,
``finish_reason: "length"``). An example longer than ``data.max_length`` is never cut (a cut response would
lose its EOS and teach the model never to stop): ``too_long="drop"`` skips it, ``too_long="error"`` raises
naming it. Records with an empty response are skipped; every skip is counted in one warning per file that
names the first record of each kind. An empty prompt is an error.

A predictions file trains as is (self-distillation): with the tokenizer that wrote them, its records'
``response_ids`` are the training targets (no re-tokenizing of the decoded text, which can split the same text
differently).

A prompt item is what prediction needs of a record: its rendered prompt ids (shorter than both length
limits), its ``id``, its ``reference`` when it has one, and its other fields, which the prediction record
carries through. ``DLLMDataModule`` decides which records; this module turns them into items.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dllm.data.predictions import prompt_digest
from dllm.data.records import INTERNAL_KEYS, Record, field, is_messages, prompt_of
from dllm.data.tokenizer import render_chat, response_text, same_tokenizer, tokenizer_fingerprint
from dllm.errors import UserError

# Keys a prediction record sets itself; an input field of the same name is replaced (the input's
# ``response`` lives on as ``reference``).
OUTPUT_KEYS = (
    "id", "prompt", "response", "reference", "new_tokens", "finish_reason", "forwards", "settings", "response_ids",
    "tokenizer", "checkpoint", "prompt_digest",
)  # fmt: skip


# ----------------------------------------------------------------------------
# Tokenizing


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (the chat template writes its own)."""
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_example(
    tokenizer,
    prompt: str | list[dict],
    response: str | list[dict],
    chat_template: bool | str = True,
    eos: bool = True,
) -> tuple[list[int], list[int], str]:
    """Token ids of prompt and response (ending with exactly one EOS unless ``eos=False``), and the response text."""
    prompt_text, opening = render_chat(tokenizer, prompt, chat_template)
    prompt_ids = encode(tokenizer, prompt_text)
    text = response_text(response, opening)
    return prompt_ids, closed(tokenizer, encode(tokenizer, text), eos), text


def closed(tokenizer, response_ids: list[int], eos: bool = True) -> list[int]:
    """``response_ids`` ending with exactly one EOS (``eos=True``) or as they are (an answer cut by the budget)."""
    if eos and (not response_ids or response_ids[-1] != tokenizer.eos_token_id):
        return [*response_ids, tokenizer.eos_token_id]
    return list(response_ids)


def record_id(record: Record, index: int) -> str:
    """The record's ``id`` as text; a missing or ``null`` id is its index in the file."""
    value = record.get("id")
    return str(index if value is None else value)


# ----------------------------------------------------------------------------
# Examples and prompt items


class ExampleBuilder:
    """Tokenized training examples and prompt items from records (the rules of docs/method.md, section 9).

    Args:
        tokenizer: the model's tokenizer.
        hparams: the data settings (``DLLMDataModule``'s hyper-parameters: keys, ``chat_template``,
            ``max_length``, ``too_long``).
        generation_max_length: the attached module's generation budget (prompt + generated tokens), if any.
    """

    def __init__(self, tokenizer: Any, hparams: Any, generation_max_length: int | None):
        self.tokenizer = tokenizer
        self.hparams = hparams
        self.generation_max_length = generation_max_length

    def render(self, prompt: str | list[dict], where: str) -> tuple[str, str]:
        """The rendered prompt and its generation prompt; a failing template names the record."""
        try:
            return render_chat(self.tokenizer, prompt, self.hparams.chat_template)
        except TemplateError as e:
            raise UserError(f"{where}: the chat template (data.chat_template) failed: {e}") from None

    # --- training examples ---------------------------------------------------------

    def example(self, record: Record, index: int, counts: dict[str, list[str]]) -> dict | str:
        """One tokenized training example, or the reason it is skipped; ``counts`` collects how ids were chosen."""
        hp, where = self.hparams, record["_where"]
        prompt = prompt_of(record, hp.prompt_key)
        response = field(record, hp.response_key, "data.response_key")
        cut = record.get("finish_reason") == "length"  # cut by the generation budget: no closing EOS
        prompt_text, opening = self.render(prompt, where)
        prompt_ids = encode(self.tokenizer, prompt_text)
        text = response_text(response, opening)
        recorded = self.recorded_ids(record, counts)
        response_ids = closed(self.tokenizer, encode(self.tokenizer, text) if recorded is None else recorded, not cut)
        if not text.strip():
            return "with an empty response"
        length = len(prompt_ids) + len(response_ids)
        if length > hp.max_length:
            if hp.too_long == "error":
                raise UserError(f"{where}: prompt + response is {length} tokens, over data.max_length={hp.max_length}")
            return f"longer than data.max_length={hp.max_length}"
        return {
            "id": record_id(record, index),
            "where": where,
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "response_ids": response_ids,
            "reference": text,
            "answer": record.get("answer"),
            "task": record.get("task"),
        }

    def recorded_ids(self, record: Record, counts: dict[str, list[str]]) -> list[int] | None:
        """The token ids predict recorded for the response, when this tokenizer wrote them and they still spell it."""
        ids = record.get("response_ids")
        if ids is None or self.hparams.response_key != "response":
            return None
        where, vocab = record["_where"], len(self.tokenizer)
        if not (isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < vocab for i in ids)):
            raise UserError(f"{where}: response_ids must be a list of token ids in [0, {vocab})")
        if not same_tokenizer(record.get("tokenizer"), tokenizer_fingerprint(self.tokenizer)):
            counts.setdefault("other tokenizer", []).append(where)
            return None
        if self.tokenizer.decode(ids, skip_special_tokens=False) != record.get("response"):
            counts.setdefault("edited", []).append(where)
            return None
        counts.setdefault("exact", []).append(where)
        return ids

    def examples(self, records: list[Record], what: str) -> list[dict]:
        """Tokenized training examples; skipped records are counted in one warning per file."""
        examples, skipped, counts = [], {}, {}
        for index, record in enumerate(records):
            example = self.example(record, index, counts)
            if isinstance(example, str):
                skipped.setdefault(example, []).append(record["_where"])
            else:
                examples.append(example)
        summary = "; ".join(f"{len(where)} {reason} (first: {where[0]})" for reason, where in skipped.items())
        if not examples:
            raise UserError(f"{what}: no usable examples" + (f" (skipped {summary})" if summary else ""))
        if skipped:
            long = any(reason.startswith("longer") for reason in skipped)
            hint = "; data.too_long='error' stops at a long one instead" if long else ""
            count = sum(map(len, skipped.values()))
            rank_zero_warn(f"{what}: skipped {count} of {len(records)} records: {summary}{hint}")
        self.report_ids(counts, len(records), what)
        return examples

    def report_ids(self, counts: dict[str, list[str]], total: int, what: str) -> None:
        """One line on which records train on their recorded token ids, and one warning per reason others do not."""
        fingerprint = tokenizer_fingerprint(self.tokenizer)
        if "exact" in counts:
            rank_zero_info(
                f"{what}: training on the recorded token ids (response_ids) of {len(counts['exact'])} of {total} "
                f"records (tokenizer {fingerprint})"
            )
        if "other tokenizer" in counts:
            where = counts["other tokenizer"]
            rank_zero_warn(
                f"{what}: {len(where)} records carry response_ids of another tokenizer (first: {where[0]}; this "
                f"model's is {fingerprint}): they train on their response text, tokenized again"
            )
        if "edited" in counts:
            where = counts["edited"]
            rank_zero_warn(
                f"{what}: {len(where)} records have a response that is not the text of their response_ids (edited? "
                f"first: {where[0]}): they train on the response text"
            )

    # --- prediction prompts ------------------------------------------------------------

    def reference(self, record: Record, opening: str) -> str | None:
        """The record's reference text (``reference_key``), as the response would be written; ``None`` without one."""
        hp = self.hparams
        key = hp.reference_key
        if key is None:
            key = next((k for k in (hp.response_key, "answer") if record.get(k) is not None), None)
            if key is None:
                return None
        elif record.get(key) is None:
            keys = sorted(k for k in record if k not in INTERNAL_KEYS)
            raise UserError(f"{record['_where']}: missing key {key!r} (data.reference_key; the record has {keys})")
        value = record[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not (isinstance(value, str) or is_messages(value)):
            raise UserError(f"{record['_where']}: reference {key!r} must be a string, a number or chat messages")
        return response_text(value, opening)

    def check_prompt_fits(self, length: int, where: str) -> None:
        """A prompt must leave room to generate: shorter than ``data.max_length`` and the generation budget."""
        limits = {
            "data.max_length": self.hparams.max_length,
            "model.generation.max_length": self.generation_max_length,
        }
        limits = {name: value for name, value in limits.items() if value is not None}
        if any(length >= value for value in limits.values()):
            named = " and ".join(f"{name}={value}" for name, value in limits.items())
            raise UserError(
                f"{where}: the prompt is {length} tokens after the chat template; prompts must be shorter than {named}"
            )

    def prompt_item(self, record: Record, index: int) -> dict:
        """One prompt to predict: its ids, its reference, and the record's other fields to write back."""
        hp, where = self.hparams, record["_where"]
        prompt = prompt_of(record, hp.prompt_key)
        text, opening = self.render(prompt, where)
        prompt_ids = encode(self.tokenizer, text)
        if not prompt_ids or not text.strip():
            raise UserError(f"{where}: empty prompt after the chat template (data.chat_template)")
        self.check_prompt_fits(len(prompt_ids), where)
        extra = {k: v for k, v in record.items() if k not in (*INTERNAL_KEYS, *OUTPUT_KEYS, hp.prompt_key)}
        return {
            "id": record_id(record, index),
            "index": index,
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "prompt_digest": prompt_digest(text, prompt_ids),
            "reference": self.reference(record, opening),
            "answer": record.get("answer"),
            "task": record.get("task"),
            "extra": extra,
        }

    def prompts(self, records: list[Record], what: str) -> list[dict]:
        items, seen = [], set()
        for index, record in enumerate(records):
            item = self.prompt_item(record, index)
            if item["id"] in seen:
                raise UserError(f"{record['_where']}: duplicate id {item['id']!r}")
            seen.add(item["id"])
            items.append(item)
        if not items:
            raise UserError(f"{what}: no prompts")
        return items
