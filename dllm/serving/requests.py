"""Checks of an OpenAI-style request body: every bad field answers 400 with an error naming it.

The OpenAI API answers a bad request with ``{"error": {"message", "type", "param", "code"}}``;
clients (the ``openai`` package) raise ``BadRequestError`` and show ``param``. A field
the method supports is honoured per request; one it does not (``n`` > 1) is refused
rather than ignored. Defaults come from the served model's generation settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dllm.generation.draft_sources import parse_sources

MAX_STOPS = 4  # as OpenAI
DLLM_KEYS = ("mode", "add_eos_length", "refine_iter", "draft_sources")
MAX_BLOCK = 256  # add_eos_length above this only wastes the forward
MAX_ROUNDS = 16


class ApiError(Exception):
    """An error answer: HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param, code)


@dataclass
class Defaults:
    """What a request gets for a field it leaves out, and the server's caps."""

    model: str
    max_tokens: int  # the cap too
    max_length: int
    temperature: float
    top_p: float | None
    top_k: int | None
    mode: str
    add_eos_length: int
    refine_iter: int
    draft_sources: str


def _int(body: dict, key: str, low: int, high: int | None = None, prefix: str = "") -> int | None:
    value, key = body.get(key), prefix + key
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(key, f"expected an integer, got {type(value).__name__}", "invalid_type")
    if value < low or (high is not None and value > high):
        limits = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise bad(key, f"must be {limits}, got {value}")
    return value


def _number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, f"expected a finite number, got {value!r}", "invalid_type")
    return float(value)


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(key, f"expected a boolean, got {type(value).__name__}", "invalid_type")
    return value


def _text_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def messages_of(body: dict) -> list[dict]:
    """The chat messages, checked: a non-empty list of ``{role, content}`` with text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of messages", "invalid_type" if messages else "missing")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(where, "expected an object with a string 'role'", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):
            if not all(_text_part(p) for p in content):
                raise bad(f"{where}.content", "only text parts are supported", "invalid_type")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"expected a string, got {type(content).__name__}", "invalid_type")
        out.append({"role": m["role"], "content": content})
    return out


def prompt_of(body: dict) -> str:
    """The completion prompt, checked: a non-empty string (or a list holding one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise bad("prompt", "only one prompt per request is supported", "invalid_value")
    if not isinstance(prompt, str):
        raise bad("prompt", f"expected a string, got {type(prompt).__name__}", "invalid_type")
    if not prompt:
        raise bad("prompt", "must not be empty")
    return prompt


def settings_of(body: dict, defaults: Defaults) -> dict:
    """The generation settings of a request: its fields, checked, over ``defaults``."""
    model = body.get("model")
    if model != defaults.model:
        raise ApiError(400, f"model: {model!r} is not served here (this server serves {defaults.model!r})",
                       "model", "model_not_found")  # fmt: skip
    n = _int(body, "n", 1, 1)
    del n
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        max_tokens = _int(body, "max_completion_tokens", 1, defaults.max_tokens)
    else:
        max_tokens = _int(body, "max_tokens", 1, defaults.max_tokens)
    temperature = _number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise bad("temperature", f"must be >= 0, got {temperature}")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad("top_p", f"must be in (0, 1], got {top_p}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"expected an integer, got {type(seed).__name__}", "invalid_type")
    stops = body.get("stop")
    stops = [stops] if isinstance(stops, str) else stops
    if stops is not None and (
        not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops)
    ):
        raise bad("stop", f"expected a non-empty string or a list of up to {MAX_STOPS} of them")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "expected an object", "invalid_type")
    include_usage = _bool(options or {}, "include_usage")
    return dict(
        max_tokens=max_tokens or defaults.max_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k,
        seed=seed,
        stops=stops or [],
        config=_dllm_config(body, defaults),
        stream=stream,
        include_usage=include_usage,
    )


def _dllm_config(body: dict, defaults: Defaults) -> tuple:
    """``(mode, add_eos_length, refine_iter, draft_sources)`` from the ``dllm`` extension object."""
    extension: Any = body.get("dllm") or {}
    if not isinstance(extension, dict):
        raise bad("dllm", "expected an object", "invalid_type")
    unknown = sorted(set(extension) - set(DLLM_KEYS))
    if unknown:
        raise bad(f"dllm.{unknown[0]}", f"unknown option (known: {', '.join(DLLM_KEYS)})", "unknown_parameter")
    mode = extension.get("mode", defaults.mode)
    if mode not in ("jacobi", "refine"):
        raise bad("dllm.mode", f"must be 'jacobi' or 'refine', got {mode!r}")
    n = _int(extension, "add_eos_length", 0, MAX_BLOCK, "dllm.")
    r = _int(extension, "refine_iter", 1, MAX_ROUNDS, "dllm.")
    sources = extension.get("draft_sources", defaults.draft_sources)
    try:
        sources = ",".join(parse_sources(sources)) or "none"
    except (ValueError, TypeError, AttributeError) as error:
        raise bad("dllm.generation.draft_sources", str(error)) from None
    n = defaults.add_eos_length if n is None else n
    r = defaults.refine_iter if r is None else r
    return mode, n, r if mode == "refine" else 1, sources if mode == "jacobi" else "none"
