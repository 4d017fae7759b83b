"""Serving under load: dllm continuous batching vs dllm static batching vs a LitServe HF-generate server.

Open-loop Poisson arrivals at several rates (requests per second), the same
prompts and the same greedy answers for every method, measured side by side in
one run, one server at a time on the same machine:

- ``continuous``: ``serve.py`` (jacobi, the default drafts): a request joins the
  running batch at the next forward; the client streams (SSE).
- ``static``: ``serve.py --server.batching static``: the waiting requests start
  when the running batch is done; streamed.
- ``hf``: a LitServe server (``bench/serving_hf.py``) whose ``predict`` runs HF ``generate`` (greedy) on a
  batch of up to ``--rows`` requests gathered for ``--batch-timeout`` seconds, the
  way LitServe's own LLM examples batch; streamed too (LitServe's batched
  streaming, one JSON line per request and generated token).

``--whole``: every method answers whole responses instead (no stream; time to
first token is then the latency), so throughput compares without the streams'
traffic.

Reported per method and rate: throughput (completion tokens per second over the
run), time to first token and time per output token after the first (p50, p99),
failed requests, failed ``/health`` polls, and the share of answers identical to
the HF server's (greedy jacobi is exactly greedy decoding). Outputs in
``--out-dir``: ``serving.json``, ``serving.md``, ``serving.png``.

    python bench/serving.py --model tiny --ckpt bench/results/quality/sft-recipe/model.ckpt
    python bench/serving.py --model models/smollm2-135m --rates 0.5,1,2 --requests 16
    python bench/serving.py --quick --out-dir /tmp/serving   # smoke run: seconds per cell
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------
# Servers


def start(command: list[str], url: str, log: Path) -> subprocess.Popen:
    import httpx2 as httpx

    # a session of its own: LitServe's workers are its children, and they must go with it
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not come up: {log}")


def serve_command(folder: str, port: int, args, static: bool) -> list[str]:
    return [
        sys.executable, str(ROOT / "serve.py"), "--model.pretrained", folder, "--model.generation.mode", "jacobi",
        "--model.generation.add_eos_length", str(args.block), "--model.generation.max_new_tokens", str(args.max_tokens),
        "--model.generation.max_length", str(args.max_length), "--server.port", str(port),
        "--server.max_batch_rows", str(args.rows), "--server.max_queued", "1000",
        "--server.batching", "static" if static else "continuous", "--data.chat_template", "false",
    ]  # fmt: skip


# ----------------------------------------------------------------------------
# The load


async def one_request(client, url, prompt, max_tokens, streamed, model):
    """``(ttft, tpot, tokens, text, ok)`` of one request."""
    start = time.perf_counter()
    try:
        if model is None and not streamed:  # the HF server's own route
            r = await client.post(f"{url}/predict", json={"prompt": prompt, "max_tokens": max_tokens})
            r.raise_for_status()
            answer = r.json()
            return time.perf_counter() - start, None, answer["tokens"], answer["text"], True
        if model is None:  # ... streamed: one JSON line per step, {"text": delta, "tokens": so far}
            async with client.stream("POST", f"{url}/predict", json={"prompt": prompt, "max_tokens": max_tokens}) as r:
                r.raise_for_status()
                return await timed_stream(r, start, hf_line)
        if not streamed:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
            r = await client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            answer = r.json()
            text, tokens = answer["choices"][0]["text"], answer["usage"]["completion_tokens"]
            return time.perf_counter() - start, None, tokens, text, True
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            return await timed_stream(r, start, sse_line)
    except Exception as error:  # counted as a failed request
        return None, None, 0, repr(error), False


def hf_line(line: str) -> tuple[list[str], int | None]:
    """One line of the HF server's stream: ``(text deltas, tokens so far)``."""
    if not line.strip():
        return [], None
    step = json.loads(line)
    return [step["text"]], step["tokens"]


def sse_line(line: str) -> tuple[list[str], int | None]:
    """One line of an OpenAI SSE stream: ``(text deltas, completion tokens when the usage chunk has them)``."""
    if not line.startswith("data:") or line == "data: [DONE]":
        return [], None
    chunk = json.loads(line[5:])
    usage = chunk.get("usage")
    return [choice["text"] for choice in chunk["choices"]], usage["completion_tokens"] if usage else None


async def timed_stream(response, start: float, parse):
    """``(ttft, tpot, tokens, text, True)`` of a streamed response, ``parse`` reading each line (:func:`hf_line`,
    :func:`sse_line`): the first and last non-empty deltas' times, and the last token count seen."""
    first = last = None
    parts, tokens = [], 0
    async for line in response.aiter_lines():
        texts, count = parse(line)
        tokens = tokens if count is None else count
        for text in filter(None, texts):
            last = time.perf_counter()
            first = first or last
            parts.append(text)
    first = first or time.perf_counter()
    tpot = (last - first) / (tokens - 1) if last and tokens > 1 else None
    return first - start, tpot, tokens, "".join(parts), True


async def run_load(url, prompts, rate, max_tokens, streamed, model, seed, clients=0):
    """Open loop: Poisson arrivals at ``rate``; or, with ``clients``, that many clients each sending its next
    request when the last is answered (closed loop). Results in prompt order."""
    import httpx2 as httpx

    rng = random.Random(seed)
    health_failures = 0
    done = asyncio.Event()

    async def poll(client):
        nonlocal health_failures
        while not done.is_set():
            try:
                if (await client.get(f"{url}/health", timeout=5)).status_code != 200:
                    health_failures += 1
            except httpx.HTTPError:
                health_failures += 1
            await asyncio.sleep(0.5)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1000)) as client:
        poller = asyncio.create_task(poll(client))
        tasks, start = [], time.perf_counter()
        if clients:
            results, todo = [None] * len(prompts), iter(range(len(prompts)))

            async def worker():
                for i in todo:
                    results[i] = await one_request(client, url, prompts[i], max_tokens, streamed, model)

            await asyncio.gather(*(worker() for _ in range(clients)))
        else:
            for prompt in prompts:
                tasks.append(asyncio.create_task(one_request(client, url, prompt, max_tokens, streamed, model)))
                await asyncio.sleep(rng.expovariate(rate))
            results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        done.set()
        await poller
    return results, elapsed, health_failures


def percentile(values, q):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(results, elapsed, health_failures, reference=None):
    ok = [r for r in results if r[4]]
    ttft, tpot = [r[0] for r in ok], [r[1] for r in ok]
    same = None
    if reference is not None:
        same = sum(r[3] == ref[3] for r, ref in zip(results, reference) if r[4] and ref[4]) / max(len(ok), 1)
    return {
        "throughput": sum(r[2] for r in ok) / elapsed,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
        "failed": len(results) - len(ok), "health_failures": health_failures, "same_as_hf": same,
        "tokens": sum(r[2] for r in ok), "seconds": elapsed,
    }  # fmt: skip


# ----------------------------------------------------------------------------
# The run


def prepare_model(args) -> str:
    """An HF folder of the model (a Lightning checkpoint is exported once), for every server."""
    if args.ckpt is None:
        return args.model
    from dllm.module import DLLMModule

    folder = Path(tempfile.mkdtemp(prefix="dllm-serving-")) / "hf"
    DLLMModule.load_from_checkpoint(args.ckpt, map_location="cpu").save_hf(str(folder))
    return str(folder)


def load_prompts(args, folder: str) -> list[str]:
    from dllm.data.tokenizer import render_chat
    from dllm.module import DLLMModule

    tokenizer = DLLMModule(pretrained=folder).tokenizer
    if args.prompts:
        records = [json.loads(line) for line in open(args.prompts)]
        texts = [r["prompt"] for r in records]
    else:
        texts = ["Write a short story about a lighthouse.", "Explain what a hash table is.",
                 "List five fruits and their colours.", "How do I boil an egg?"]  # fmt: skip
    texts = (texts * (args.requests // len(texts) + 1))[: args.requests]
    return [render_chat(tokenizer, t, True)[0] for t in texts]  # rendered here: every server gets raw text


def markdown(rows: list[dict], title: str) -> str:
    def f(v, scale=1.0, digits=2):
        return "-" if v is None else f"{v * scale:.{digits}f}"

    lines = [f"### {title}", "", "| rate (req/s) | method | tokens/s | TTFT p50 (s) | TTFT p99 (s) | "
             "TPOT p50 (ms) | TPOT p99 (ms) | failed | /health failed | same as HF |", "|" + "---:|" * 10]  # fmt: skip
    for row in rows:
        m = row["metrics"]
        lines.append(
            f"| {row['rate']} | {row['method']} | {f(m['throughput'], digits=1)} | {f(m['ttft_p50'])} | "
            f"{f(m['ttft_p99'])} | {f(m['tpot_p50'], 1000, 1)} | {f(m['tpot_p99'], 1000, 1)} | {m['failed']} | "
            f"{m['health_failures']} | {f(m['same_as_hf'], 100, 0)}% |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        rates = [r["rate"] for r in mine]
        axes[0].plot(rates, [r["metrics"]["ttft_p50"] for r in mine], marker="o", label=method)
        axes[1].plot(rates, [r["metrics"]["throughput"] for r in mine], marker="o", label=method)
    axes[0].set(xlabel="arrival rate (requests/s)", ylabel="time to first token p50 (s)", yscale="log")
    axes[1].set(xlabel="arrival rate (requests/s)", ylabel="throughput (tokens/s)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m", help="HF folder or name")
    parser.add_argument("--ckpt", default=None, help="a Lightning checkpoint instead (exported to HF first)")
    parser.add_argument("--prompts", default=None, help="a JSONL file with 'prompt' (default: four chat prompts)")
    parser.add_argument("--rates", default="1,2,4", help="arrival rates, requests per second")
    parser.add_argument("--clients", type=int, default=0, help="closed loop instead: this many clients, back to back")
    parser.add_argument("--requests", type=int, default=32, help="requests per cell")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--block", type=int, default=15, help="add_eos_length: the longest jacobi draft")
    parser.add_argument("--rows", type=int, default=16, help="batch rows of every server")
    parser.add_argument("--batch-timeout", type=float, default=0.05, help="the HF server's batch gathering time")
    parser.add_argument("--methods", default="continuous,static,hf")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument(
        "--whole", action="store_true", help="every method answers whole (no SSE): throughput like for like"
    )
    parser.add_argument("--out-dir", default="bench/results/serving")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 requests, one rate, 16 tokens")
    args = parser.parse_args()
    if args.ckpt is None and not Path(args.model).exists():
        from transformers import AutoConfig

        try:  # a hub name: reachable only with a network
            AutoConfig.from_pretrained(args.model)
        except OSError:
            parser.error(
                f"--model {args.model}: no such folder, and not a model the hub answered for (for the default: "
                "python -m dllm.models smollm2 --out models/smollm2-135m; or --model PATH, or --ckpt FILE)"
            )
    if args.quick:
        args.requests, args.rates, args.max_tokens = 4, "2", 16
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = prepare_model(args)
    prompts = load_prompts(args, folder)
    rates = [float(r) for r in args.rates.split(",")] if not args.clients else [0.0]  # 0: the closed loop
    methods = args.methods.split(",")
    name = args.ckpt or args.model
    rows, answers = [], {}
    for method in ["hf", *[m for m in methods if m != "hf"]] if "hf" in methods else methods:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if method == "hf":
            hf = str(ROOT / "bench" / "serving_hf.py")
            mode = "whole" if args.whole else "stream"
            command = [sys.executable, hf, folder, str(port), str(args.rows), str(args.batch_timeout), mode]
        else:
            command = serve_command(folder, port, args, static=method == "static")
        process = start(command, url, out / f"server-{method}.log")
        streamed = not args.whole
        try:
            for rate in rates:
                results, elapsed, health = asyncio.run(
                    run_load(
                        url,
                        prompts,
                        rate,
                        args.max_tokens,
                        streamed,
                        None if method == "hf" else folder,
                        int(rate * 1000),
                        args.clients,
                    )
                )
                answers[(method, rate)] = results
                metrics = summarise(results, elapsed, health, answers.get(("hf", rate)))
                rows.append({"method": method, "rate": rate, "metrics": metrics})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
    load = f"{args.clients} clients back to back" if args.clients else "per rate"
    load += ", whole responses" if args.whole else ", streamed"
    title = f"{name}: {args.requests} requests {load}, {args.max_tokens} tokens, {args.rows} rows"
    (out / "serving.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    (out / "serving.md").write_text(markdown(rows, title))
    plot(rows, out / "serving.png", title)
    print(markdown(rows, title))


if __name__ == "__main__":
    main()
