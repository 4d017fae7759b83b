"""A tiny float64 model folder, a real ``serve.py`` subprocess on 127.0.0.1, and alone-references."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package brings
import torch
from conftest import SMALL_MODEL

from dllm import iterative_generate
from dllm.data.tokenizer import render_chat
from dllm.module import DLLMModule

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW, MAX_LENGTH, BLOCK = 48, 160, 6
SERVE_ARGS = [
    "--model.dtype", "float64", "--model.generation.mode", "jacobi",
    "--model.generation.max_new_tokens", str(MAX_NEW), "--model.generation.max_length", str(MAX_LENGTH),
    "--model.generation.add_eos_length", str(BLOCK), "--model.generation.refine_iter", "2",
]  # fmt: skip


def model_folder(path: Path) -> DLLMModule:
    """Save a tiny random byte-tokenizer model (float64) as an HF folder; returns it loaded back."""
    torch.manual_seed(0)
    DLLMModule(model_config=SMALL_MODEL, dtype="float64").save_hf(str(path))
    return DLLMModule(pretrained=str(path), dtype="float64")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(folder: Path, *extra: str):
    """``python serve.py`` on a free port until the block ends; yields the base URL."""
    port = free_port()
    command = [sys.executable, str(ROOT / "serve.py"), "--model.pretrained", str(folder), *SERVE_ARGS,
               "--server.port", str(port), *extra]  # fmt: skip
    log = open(folder.parent / f"serve-{port}.log", "w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve.py exited: {(folder.parent / f'serve-{port}.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "serve.py did not come up in 120 s"
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def reference(module: DLLMModule, prompt, chat: bool, max_tokens: int = MAX_NEW, stop=(), seed=None, **settings):
    """``(text, finish_reason, completion tokens)`` of one request generated alone by ``iterative_generate``."""
    text = render_chat(module.tokenizer, prompt, True)[0] if chat else prompt
    ids = torch.tensor([module.tokenizer(text, add_special_tokens=False).input_ids])
    settings = {"mode": "jacobi", "add_eos_length": BLOCK, "refine_iter": 2, **settings}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = iterative_generate(
        module.model, ids, eos_token_id=module.stop_ids, max_new_tokens=max_tokens, max_length=MAX_LENGTH,
        generator=generator, return_dict=True, **settings,
    )  # fmt: skip
    tokens = out.sequences[0, ids.size(1) : ids.size(1) + int(out.new_tokens[0])].tolist()
    reason = "stop" if out.finish_reason[0] == "eos" else "length"
    body = tokens[:-1] if reason == "stop" else tokens
    full = module.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    hits = [full.find(s) for s in stop if s in full]
    if hits:  # cut where the stop string starts; tokens: up to the one that completed it
        decoded = (module.tokenizer.decode(body[: i + 1], skip_special_tokens=False) for i in range(len(body)))
        used = next(i + 1 for i, text in enumerate(decoded) if any(s in text for s in stop))
        return full[: min(hits)], "stop", used
    return full, reason, len(tokens)
