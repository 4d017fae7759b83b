"""The server's limits: 401 without the key, 503 at once when every row is taken, a client that leaves frees its row.

The server here answers up to 4000 tokens, one per forward with ``add_eos_length`` 0:
a request runs for a minute or more, so a row that is free within seconds was freed by
the cancellation, not by its end.
"""

import json
import time

import httpx2 as httpx  # the HTTP client the openai package brings
import openai
import pytest
from serving_helpers import model_folder, server

KEY = "sesame"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving-auth") / "tiny"
    model_folder(folder)
    args = ["--server.api_key", KEY, "--server.max_batch_rows", "1", "--server.max_queued", "0",
            "--model.generation.max_new_tokens", "4000", "--model.generation.max_length", "4100"]  # fmt: skip
    with server(folder, *args) as url:
        yield url, str(folder)


def test_no_or_wrong_key_is_401(served):
    url, name = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        client.completions.create(model=name, prompt="a", max_tokens=2)
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/v1/completions"):  # no key at all
        response = httpx.request("GET" if "models" in path else "POST", f"{url}{path}", json={"model": name})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200  # the health check needs no key


def test_right_key_is_served(served):
    url, name = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [name]
    assert client.completions.create(model=name, prompt="a", max_tokens=2).usage.completion_tokens >= 1


def wait_idle(url: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while True:
        health = httpx.get(f"{url}/health").json()
        if health["requests"] == 0 and health["running_rows"] == 0:
            return
        assert time.monotonic() < deadline, health
        time.sleep(0.1)


def test_full_queue_is_503_at_once(served):
    url, name = served
    # a long answer, one token per forward: it holds the only row while the second request comes
    body = {"model": name, "prompt": "x", "max_tokens": 4000, "stream": True, "dllm": {"add_eos_length": 0}}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as response:
        lines = response.iter_lines()  # kept open: the request holds the only row while the second one comes
        assert next(lines).startswith("data:")
        start = time.monotonic()
        second = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=30)
        assert second.status_code == 503 and second.json()["error"]["code"] == "server_overloaded"
        assert time.monotonic() - start < 2


def test_a_client_that_leaves_frees_its_row(served):
    url, name = served
    body = {"model": name, "prompt": "x", "max_tokens": 4000, "stream": True, "dllm": {"add_eos_length": 0}}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines)[5:])["choices"][0]["finish_reason"] is None
        assert httpx.get(f"{url}/health").json()["running_rows"] == 1
    wait_idle(url)  # the stream was cut: its row left at a following forward
    with pytest.raises(httpx.TimeoutException):  # a whole-response client that gives up
        httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=1)
    wait_idle(url)
