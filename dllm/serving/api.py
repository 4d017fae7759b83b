"""The OpenAI-compatible HTTP API over the generation thread: four endpoints, SSE streams, OpenAI error bodies.

``POST /v1/chat/completions`` renders the messages with the chat template that
predict.py uses (``--data.chat_template``), so a chat request answers what
predict.py answers for that prompt; ``POST /v1/completions`` takes the raw
text. ``GET /v1/models`` names the one served model; ``GET /health`` answers
while the server runs (never behind the API key). A streamed request gets one
``data:`` chunk per forward that committed text, then a chunk with
``finish_reason``, the usage chunk when ``stream_options.include_usage`` asks
for it, and ``data: [DONE]``. A client that leaves frees its row at the next
forward (the stream's generator is closed, or the poll of a whole response
sees the disconnect).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from dllm.data.tokenizer import render_chat
from dllm.serving.engine import Engine, Job, Params, QueueFull
from dllm.serving.requests import ApiError, Defaults, messages_of, prompt_of, settings_of

POLL = 0.25  # seconds between checks that a whole-response client is still there


def create_app(
    engine: Engine,
    defaults: Defaults,
    chat_template: bool | str = True,
    api_key: str | None = None,
    request_timeout: float = 600.0,
) -> FastAPI:
    """The FastAPI app of a server; ``engine`` must be started by the caller."""
    app = FastAPI(title="dllm", openapi_url=None)
    tokenizer = engine.tokenizer

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", None, "invalid_api_key")

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the body is not valid JSON: {error}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
        return body

    def params_of(body: dict, text: str, field: str) -> Params:
        settings = settings_of(body, defaults)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise ApiError(400, f"{field}: the prompt has no tokens", field, "invalid_value")
        if len(ids) >= defaults.max_length:
            message = f"{field}: the prompt has {len(ids)} tokens, not below max_length={defaults.max_length}"
            raise ApiError(400, message, field, "context_length_exceeded")
        return Params(prompt_ids=ids, **settings)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health() -> dict:
        # read without the engine's lock: a snapshot, good enough for monitoring and the tests' polls
        running = sum(stepper.running for stepper in list(engine.steppers.values()))
        return {"status": "ok", "requests": len(engine.jobs), "running_rows": running}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": defaults.model, "object": "model", "created": 0, "owned_by": "dllm"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        body = await body_of(request)
        messages = messages_of(body)
        try:
            text, _ = render_chat(tokenizer, messages, chat_template)
        except Exception as error:  # a template that refuses these roles or this order
            raise ApiError(400, f"messages: the chat template failed: {error}", "messages") from None
        return await respond(request, params_of(body, text, "messages"), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = await body_of(request)
        return await respond(request, params_of(body, prompt_of(body), "prompt"), chat=False)

    async def respond(request: Request, params: Params, chat: bool):
        job = Job(params, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull as error:
            raise ApiError(503, str(error), None, "server_overloaded") from None
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": defaults.model,
        }
        if params.stream:
            return StreamingResponse(stream(job, head, chat), media_type="text/event-stream")
        return await whole(request, job, head, chat)

    async def whole(request: Request, job: Job, head: dict, chat: bool) -> JSONResponse:
        deadline = time.monotonic() + request_timeout
        check = time.monotonic() + POLL
        text = []
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.queue.get(), POLL)
                except asyncio.TimeoutError:
                    item = None
                if time.monotonic() >= check:  # deltas may keep coming: look for a gone client by the clock
                    check = time.monotonic() + POLL
                    if await request.is_disconnected():
                        engine.cancel(job)
                        return JSONResponse({}, status_code=499)
                    if time.monotonic() > deadline:
                        engine.cancel(job)
                        raise ApiError(504, f"no answer within request_timeout={request_timeout}s", None, "timeout")
                if item is None:
                    continue
                if item[0] == "delta":
                    text.append(item[1])
                elif item[0] == "error":
                    raise ApiError(item[1], item[2])
                else:
                    break
        except asyncio.CancelledError:
            engine.cancel(job)
            raise
        reason, usage = item[1], item[2]
        content = "".join(text)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content}}
        else:
            choice = {"index": 0, "text": content}
        choice.update(finish_reason=reason, logprobs=None)
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "object": kind, "choices": [choice], "usage": usage})

    async def stream(job: Job, head: dict, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        deadline = time.monotonic() + request_timeout

        def chunk(delta: str | None, reason: str | None = None) -> str:
            if chat:
                part = {} if delta is None else {"content": delta}
                if first:
                    part["role"] = "assistant"
                choice = {"index": 0, "delta": part}
            else:
                choice = {"index": 0, "text": delta or ""}
            choice.update(finish_reason=reason, logprobs=None)
            return f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"

        first = True
        try:
            while True:
                timeout = deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(job.queue.get(), max(timeout, 0.0))
                except asyncio.TimeoutError:
                    engine.cancel(job)
                    error = ApiError(504, f"no answer within request_timeout={request_timeout}s", None, "timeout")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                if item[0] == "delta":
                    yield chunk(item[1])
                    first = False
                elif item[0] == "error":
                    yield f"data: {json.dumps(ApiError(item[1], item[2]).body())}\n\n"
                    return
                else:
                    yield chunk(None, item[1])
                    if job.params.include_usage:
                        yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': item[2]})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client left (the generator is closed) or the answer is complete: either way the row goes
            engine.cancel(job)

    return app
