"""The OpenAI server end to end: a real ``serve.py`` subprocess, the official ``openai`` client.

Every answer is compared with ``iterative_generate`` run on that request alone
(float64, so greedy ties cannot flip): streamed or not, sync or async, alone or
among 16 staggered clients, greedy, seeded sampling, refine mode, stop strings.
"""

import asyncio
import json

import httpx2 as httpx  # the HTTP client the openai package brings
import openai
import pytest
from serving_helpers import MAX_NEW, model_folder, reference, server

PROMPTS = ["hi", "what is 2+2?", "tell me a story", "abc", "x", "hello there, how are you", "q", "numbers: 1 2 3"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving") / "tiny"
    module = model_folder(folder)
    with server(folder) as url:
        yield url, module


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0)


def model_name(served) -> str:
    return str(httpx.get(f"{served[0]}/v1/models").json()["data"][0]["id"])


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [model_name(served)]
    assert httpx.get(f"{served[0]}/health").json()["status"] == "ok"


def test_chat_whole_and_streamed_equal_alone(served, client):
    url, module = served
    messages = [{"role": "user", "content": "tell me a story"}]
    text, reason, tokens = reference(module, messages, chat=True)
    whole = client.chat.completions.create(model=model_name(served), messages=messages)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == reason
    assert whole.usage.completion_tokens == tokens and whole.usage.prompt_tokens > 0
    usage = whole.usage.model_extra
    assert usage["tokens_per_forward"] == pytest.approx(tokens / usage["forwards"], abs=1e-3)
    chunks = list(
        client.chat.completions.create(
            model=model_name(served), messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == tokens  # the usage chunk comes last
    assert len(deltas) <= chunks[-1].usage.model_extra["forwards"]  # at most one delta per forward


def test_async_completions_streamed_and_not_equal_alone(served):
    url, module = served
    name = model_name(served)

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        whole = await client.completions.create(model=name, prompt="abc", max_tokens=30)
        parts = []
        async for chunk in await client.completions.create(model=name, prompt="abc", max_tokens=30, stream=True):
            parts.append(chunk.choices[0].text)
        return whole, parts

    whole, parts = asyncio.run(main())
    text, reason, _ = reference(module, "abc", chat=False, max_tokens=30)
    assert whole.choices[0].text == text == "".join(parts)
    assert whole.choices[0].finish_reason == reason


def test_usage_counts_tokens_up_to_the_one_that_completed_a_stop_string(served, client):
    """A forward commits several tokens; the ones after a stop string's last token are not in the usage."""
    url, module = served
    prompt = "tell me a story"  # refine commits a whole block per step: the stop string ends inside one
    full, _, _ = reference(module, prompt, chat=False, max_tokens=40, mode="refine")
    assert len(full) >= 12, full
    stop = [full[8:10]]  # two characters the answer writes: the stop string spans tokens
    text, reason, used = reference(module, prompt, chat=False, max_tokens=40, stop=stop, mode="refine")
    assert reason == "stop" and used < 40
    whole = client.completions.create(
        model=model_name(served), prompt=prompt, max_tokens=40, stop=stop, extra_body={"dllm": {"mode": "refine"}}
    )
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (text, "stop")
    assert whole.usage.completion_tokens == used


def request_kinds():
    """16 requests: greedy, seeded sampling, stop strings, refine blocks, short and long budgets."""
    kinds = []
    for i in range(16):
        prompt = PROMPTS[i % len(PROMPTS)]
        kind = {"prompt": prompt, "chat": i % 2 == 0, "max_tokens": [MAX_NEW, 20, 35, 9][i % 4], "delay": 0.15 * i}
        if i % 4 == 1:
            kind.update(temperature=0.9, top_p=0.9, seed=100 + i)
        if i % 5 == 2:
            kind["mode"] = "refine"
        if i % 7 == 3:
            kind["stop"] = ["e", "a"]
        kinds.append(kind)
    return kinds


def test_sixteen_staggered_clients_each_equal_alone(served):
    url, module = served
    name = model_name(served)
    kinds = request_kinds()

    async def one(client, kind):
        await asyncio.sleep(kind["delay"])
        extra = {"dllm": {"mode": kind["mode"]}} if "mode" in kind else None
        common = dict(model=name, max_tokens=kind["max_tokens"], temperature=kind.get("temperature", 0.0),
                      top_p=kind.get("top_p"), seed=kind.get("seed"), stop=kind.get("stop"), stream=True,
                      extra_body=extra)  # fmt: skip
        if kind["chat"]:
            messages = [{"role": "user", "content": kind["prompt"]}]
            stream = await client.chat.completions.create(messages=messages, **common)
            parts = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) async for c in stream]
        else:
            stream = await client.completions.create(prompt=kind["prompt"], **common)
            parts = [(c.choices[0].text, c.choices[0].finish_reason) async for c in stream]
        return "".join(p for p, _ in parts), parts[-1][1]

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, kind) for kind in kinds))

    answers = asyncio.run(main())
    for kind, (text, reason) in zip(kinds, answers):
        prompt = [{"role": "user", "content": kind["prompt"]}] if kind["chat"] else kind["prompt"]
        settings = {k: kind[k] for k in ("temperature", "top_p", "seed", "mode") if k in kind}
        expected = reference(module, prompt, kind["chat"], kind["max_tokens"], kind.get("stop", ()), **settings)
        assert (text, reason) == expected[:2], kind


def test_utf8_multibyte_stream(served):
    """The byte tokenizer writes one UTF-8 byte per token: a character spans forwards, never a delta."""
    url, module = served
    prompt = [{"role": "user", "content": "hi"}]
    text, _, _ = reference(module, prompt, chat=True, max_tokens=20)
    assert any(len(c.encode()) > 1 for c in text), text  # the reference holds multi-byte characters
    body = {"model": model_name(served), "messages": prompt, "max_tokens": 20, "stream": True}
    deltas = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                deltas.append(json.loads(line[5:])["choices"][0]["delta"].get("content") or "")
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


BAD = [
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("chat", {"messages": "hi"}, "messages"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": "a", "model": "gpt-4"}, "model"),
    ("completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": MAX_NEW + 1}, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": "10"}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": -3}, "max_completion_tokens"),
    ("completions", {"prompt": "a" * 400}, "prompt"),
    ("completions", {"prompt": "a", "temperature": -0.5}, "temperature"),
    ("completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "a", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": "a", "n": 2}, "n"),
    ("completions", {"prompt": "a", "seed": "7"}, "seed"),
    ("completions", {"prompt": "a", "stop": ["", "x"]}, "stop"),
    ("completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("completions", {"prompt": "a", "extra_body": {"dllm": {"mode": "beam"}}}, "dllm.mode"),
    ("completions", {"prompt": "a", "extra_body": {"dllm": {"add_eos_length": -1}}}, "dllm.add_eos_length"),
    (
        "completions",
        {"prompt": "a", "extra_body": {"dllm": {"draft_sources": "oracle"}}},
        "dllm.generation.draft_sources",
    ),
    ("completions", {"prompt": "a", "extra_body": {"dllm": {"blocks": 3}}}, "dllm.blocks"),
]


@pytest.mark.parametrize("endpoint,body,param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_request_is_400_naming_the_field(served, client, endpoint, body, param):
    body = {"model": model_name(served), **body}
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    with pytest.raises(openai.BadRequestError) as error:
        create(**body)
    assert error.value.status_code == 400
    assert error.value.body["param"] == param and error.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_body_is_400_and_the_server_goes_on(served, client, raw):
    response = httpx.post(f"{served[0]}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert client.completions.create(model=model_name(served), prompt="q", max_tokens=3).choices[0].text is not None
