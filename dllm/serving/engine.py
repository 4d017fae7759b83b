"""The generation thread of the server: admits requests to steppers, steps them, streams each forward's text.

One thread owns the model. HTTP handlers (``dllm.serving.api``) hand it a
:class:`Job` and read the job's asyncio queue; the thread admits new jobs into
the :class:`~dllm.generation.stepper.Stepper` of their decoding configuration (mode, block
size, refine rounds, draft sources: usually one), runs one step of every busy
stepper, and puts each step's text delta on the jobs' queues at once, so a
request joins the running batch at the next forward and a client sees every
forward's tokens as soon as they are committed. A cancelled job (its client
left, or a stop string appeared) leaves its batch at the next step. A failing
step fails the requests of that stepper only; the thread keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from dataclasses import dataclass, field

from dllm.generation.stepper import Stepper
from dllm.serving.stream import TextStream

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every running row and every queue place is taken."""


@dataclass
class Params:
    """One request's generation settings, checked (``dllm.serving.requests``)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stops: list[str]
    config: tuple  # (mode, add_eos_length, refine_iter, draft_sources): the stepper it runs in
    stream: bool = False
    include_usage: bool = False


@dataclass
class Job:
    """One request in flight; the engine puts ``("delta", text)``, then ``("end", finish_reason, usage)``
    or ``("error", status, message)`` on ``queue`` (a step's items for every job in one hand-off to ``loop``;
    a whole response, not streamed, gets one delta: its text)."""

    params: Params
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = 0
    stream: TextStream | None = None
    completion_tokens: int = 0
    forwards: int = 0
    finished: bool = False

    def usage(self) -> dict:
        prompt = len(self.params.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
            "forwards": self.forwards,
            "tokens_per_forward": round(self.completion_tokens / max(self.forwards, 1), 4),
        }


def _put_all(items: list[tuple[Job, tuple]]) -> None:
    """On the event loop: each job's items, in order."""
    for job, item in items:
        job.queue.put_nowait(item)


class Engine:
    """The model's thread; see the module docstring.

    Args:
        model: the causal LM (eval mode, on its device).
        tokenizer: decodes the committed tokens.
        stop_ids: token ids that end a response.
        max_length: prompt + generated tokens per request.
        max_rows: running rows per decoding configuration.
        max_queued: requests that may wait for a row; one more answers 503.
        use_cache: keep a KV cache of the committed text.
        adaptive_draft: jacobi: choose the draft length per forward.
        static: static batching (a batch runs to its end before the next is admitted).
    """

    def __init__(
        self,
        model,
        tokenizer,
        stop_ids,
        *,
        max_length,
        max_rows=16,
        max_queued=64,
        use_cache=True,
        adaptive_draft=True,
        static=False,
    ):
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, list(stop_ids)
        self.max_length, self.max_rows, self.max_queued = max_length, max_rows, max_queued
        self.use_cache, self.adaptive_draft, self.static = use_cache, adaptive_draft, static
        self.steppers: dict[tuple, Stepper] = {}
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._incoming: list[Job] = []
        self._cancelled: list[Job] = []
        self._outbox: list[tuple[Job, tuple]] = []  # one step's items: one wake-up of each event loop
        self.thread = threading.Thread(target=self._run, name="dllm-engine", daemon=True)

    def start(self) -> None:
        """Start the generation thread."""
        self.thread.start()

    @property
    def capacity(self) -> int:
        """Requests in flight at most: the running rows of one configuration and the queue."""
        return self.max_rows + self.max_queued

    def submit(self, job: Job) -> None:
        """Hand a job to the thread; raises :class:`QueueFull` when no place is left."""
        with self._wake:
            if len(self.jobs) >= self.capacity:
                raise QueueFull(f"{len(self.jobs)} requests in flight; retry later")
            job.id = next(self._ids)
            job.stream = TextStream(self.tokenizer, self.stop_ids, job.params.stops)
            self.jobs[job.id] = job
            self._incoming.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Free a job's row at the next step (its client is gone); nothing more is put on its queue."""
        with self._wake:
            if job.id in self.jobs and not job.finished:
                job.finished = True
                self._cancelled.append(job)
                self._wake.notify()

    # --- the thread ------------------------------------------------------------------

    def _stepper(self, config: tuple) -> Stepper:
        if config not in self.steppers:
            mode, n, r, sources = config
            self.steppers[config] = Stepper(
                self.model, self.stop_ids, mode=mode, add_eos_length=n, refine_iter=r, max_length=self.max_length,
                max_rows=self.max_rows, use_cache=self.use_cache, adaptive_draft=self.adaptive_draft,
                draft_sources=sources, static=self.static,
            )  # fmt: skip
        return self.steppers[config]

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._incoming and not self._cancelled and all(s.idle for s in self.steppers.values()):
                    self._wake.wait()
                incoming, self._incoming = self._incoming, []
                cancelled, self._cancelled = self._cancelled, []
            for job in incoming:
                if job.finished:  # cancelled before it was admitted
                    self._forget(job)
                    continue
                p = job.params
                try:
                    stepper = self._stepper(p.config)
                    stepper.admit(job.id, p.prompt_ids, p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed)
                except Exception as error:  # a request the checks let through: it alone fails
                    log.exception("admitting request %s failed", job.id)
                    self._fail(job, error)
            for job in cancelled:
                if job.params.config in self.steppers:
                    self.steppers[job.params.config].cancel(job.id)
            for config, stepper in list(self.steppers.items()):
                if stepper.idle:
                    continue
                try:
                    events = stepper.step()
                except Exception as error:  # the batch is lost: fail its requests, keep serving the others
                    log.exception("a generation step failed")
                    del self.steppers[config]
                    for job in [j for j in list(self.jobs.values()) if j.params.config == config]:
                        self._fail(job, error)
                    continue
                for event in events:
                    try:
                        self._deliver(stepper, event)
                    except Exception as error:  # e.g. a tokenizer that cannot decode: this request alone fails
                        log.exception("streaming request %s failed", event.id)
                        stepper.cancel(event.id)
                        if event.id in self.jobs:
                            self._fail(self.jobs[event.id], error)
                self._send()
            self._send()

    def _put(self, job: Job, item: tuple) -> None:
        self._outbox.append((job, item))

    def _send(self) -> None:
        """Hand the step's items to their event loops, one call per loop (not one per row and forward)."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, item in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed (a test's client went): nobody reads these
                log.warning("an event loop closed with %d items for it", len(items))

    def _deliver(self, stepper: Stepper, event) -> None:
        job = self.jobs.get(event.id)
        if job is None:
            return
        if event.finish_reason == "cancelled":
            self._forget(job)
            return
        if job.finished:  # cancelled or stopped: its row leaves at the next step
            return
        job.forwards = event.forwards
        last = event.finish_reason is not None
        delta = job.stream.push(event.tokens, last=last)
        job.completion_tokens += job.stream.used  # up to the token that completed a stop string
        if job.stream.stopped:
            stepper.cancel(job.id)
        if delta and job.params.stream:
            self._put(job, ("delta", delta))
        if last or job.stream.stopped:
            reason = "stop" if job.stream.stopped or event.finish_reason == "eos" else "length"
            job.finished = True
            if not job.params.stream and job.stream.text:  # a whole response: its text in one item
                self._put(job, ("delta", job.stream.text))
            self._put(job, ("end", reason, job.usage()))
            if last:
                self._forget(job)

    def _fail(self, job: Job, error: Exception) -> None:
        job.finished = True
        self._put(job, ("error", 500, f"generation failed: {type(error).__name__}: {error}"))
        self._forget(job)

    def _forget(self, job: Job) -> None:
        with self._wake:
            self.jobs.pop(job.id, None)
