"""SIGTERM and SIGINT: stop soon, keep what is finished, exit non-zero, say so in one line.

Schedulers (``timeout``, SLURM, Kubernetes) stop a job with SIGTERM, then SIGKILL a few seconds or
minutes later; a user stops it with Ctrl+C (SIGINT). What each command does:

- ``predict``: stops at once (at the next Python instruction, so within one forward). Every finished
  batch is already in ``<output>.rank<r>`` (a record is never cut in half: a write defers the signal
  until its line is whole), and a rerun of the same command reuses those records.
- ``fit``: stops after the current optimizer step (a step is never cut in half), saves ``last.ckpt``
  of every ``ModelCheckpoint`` with ``save_last`` and exits; ``--ckpt_path last`` resumes it. A second
  signal stops at once, keeping the checkpoint of the last validation (``ResumePoint``).
- Before the model is loaded, either command stops at once.

The exit code is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports a
process killed by it, so a scheduler sees a failure, not a finished job. SIGKILL cannot be caught:
what was written survives (predict's shards, fit's last ``last.ckpt``), nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    """Raised in the main thread when a stop signal arrives; exits with code 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class _State:
    """What the handlers saw: the first stop signal, and lines the callbacks add for the final message."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.notes: list[str] = []
        self.deferring = 0  # inside ``deferred()``: a signal waits for the block to end
        self.pending: int | None = None
        self.on_signal: Callable[[int], bool] | None = None  # fit: ``True`` = handled gracefully, do not raise


state = _State()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _handler(signum: int, frame) -> None:
    first = state.signum is None
    if first:
        state.signum = signum
    if first and state.on_signal is not None and state.on_signal(signum):
        return  # fit stops at the end of the step
    if state.deferring:
        state.pending = signum
        return
    raise Stopped(signum)


def install() -> dict[int, object]:
    """Handle SIGTERM and SIGINT with ``_handler``; returns the previous handlers for ``restore``.

    Only the main thread may set handlers: elsewhere (a test thread) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    state.__init__()
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)
    return previous


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers ``install`` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    state.on_signal = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A stop signal inside the block takes effect when the block ends (a record line is written whole)."""
    state.deferring += 1
    try:
        yield
    finally:
        state.deferring -= 1
        if not state.deferring and state.pending is not None:
            signum, state.pending = state.pending, None
            raise Stopped(signum)


def message() -> str:
    """The one line printed when a run stopped on a signal."""
    name = signal_name(state.signum) if state.signum is not None else "a signal"
    notes = "; ".join(state.notes) or "nothing was running that keeps a result"
    return f"stopped by {name}: {notes}"


def exit_stopped(error: SystemExit, speaks: bool) -> None:
    """A run stopped by SIGTERM/SIGINT: one line saying what was kept (from the rank that ``speaks``), then
    exit with code 128 + the signal (Lightning's own ``SIGTERMException`` carries none: SIGTERM's)."""
    signum = state.signum or getattr(error, "signum", None) or signal.SIGTERM
    if speaks:
        print(message(), file=sys.stderr)
    sys.exit(128 + signum)


class _NoLightningSigtermLine(logging.Filter):
    """Lightning logs "Received SIGTERM: 15" on its own; ours is the one line that says what was kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Received SIGTERM" not in str(record.msg)


logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").addFilter(_NoLightningSigtermLine())
