"""``python serve.py``: predict.py's arguments (model, checkpoint, generation, chat template) plus ``--server.*``.

The command line is predict's, parsed by the same ``LightningCLI`` (so
``--ckpt_path`` brings the trained weights and its saved model settings, and
``--model.generation.*`` / ``--data.chat_template`` reach the server exactly as
they reach predict.py); instead of predicting over a file it loads the weights,
starts the generation thread and serves the OpenAI API with uvicorn.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser

from dllm.cli import DLLMCLI, SUBCOMMANDS, _user_error, one_line
from dllm.errors import UserError
from dllm.preflight import is_sharded_checkpoint


@dataclass
class ServerSettings:
    """How the server listens and how much it takes on.

    Args:
        host: the address to listen on (``0.0.0.0`` to be reachable from other machines).
        port: the port.
        max_batch_rows: requests generating together (the running batch); more wait in the queue.
        max_queued: requests that may wait for a row; one more is answered 503 at once.
        request_timeout: seconds a request may take before it is cancelled and answered 504.
        api_key: when set, every ``/v1`` request must send ``Authorization: Bearer <key>``
            (default: the ``DLLM_API_KEY`` environment variable; none: no check).
        model_name: the model id of ``/v1/models`` and of requests (default: ``--model.pretrained`` or
            the checkpoint's file name).
        device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:1``, ...
        log_level: uvicorn's log level.
        batching: ``continuous`` (a request joins the running batch at the next forward) or ``static``
            (a batch runs to its end before the waiting requests start: for comparison).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_rows: int = 16
    max_queued: int = 64
    request_timeout: float = 600.0
    api_key: str | None = None
    model_name: str | None = None
    device: str = "auto"
    log_level: str = "warning"
    batching: Literal["continuous", "static"] = "continuous"


class ServeCLI(DLLMCLI):
    """predict's CLI whose ``predict`` serves the model instead."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(ServerSettings, "server")

    def _run_subcommand(self, subcommand: str) -> None:
        config = self.config[subcommand]
        serve(self.model, self.datamodule, ServerSettings(**config.server), config.get("ckpt_path"))


def load_checkpoint(module, path: str) -> None:
    """Put a Lightning checkpoint's weights into ``module`` (what ``trainer.predict(ckpt_path=...)`` does)."""
    if Path(path).is_dir() and is_sharded_checkpoint(Path(path)):
        raise UserError(f"--ckpt_path {path}: a sharded checkpoint; serve a single-file one or an HF export")
    state = torch.load(path, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])


def serve(module, datamodule, settings: ServerSettings, ckpt_path: str | None = None) -> None:
    """Load the weights, start the generation thread, serve until interrupted."""
    import uvicorn

    from dllm.serving.api import create_app
    from dllm.serving.engine import Engine
    from dllm.serving.requests import Defaults

    if ckpt_path:
        load_checkpoint(module, ckpt_path)
    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = module.model.to(device).eval()
    generation = module.generation
    if settings.max_batch_rows < 1 or settings.max_queued < 0:
        raise UserError("server.max_batch_rows must be >= 1 and server.max_queued >= 0")
    name = settings.model_name or module.hparams.get("pretrained") or (Path(ckpt_path).stem if ckpt_path else "dllm")
    engine = Engine(
        model, module.tokenizer, module.stop_ids, max_length=generation.max_length, max_rows=settings.max_batch_rows,
        max_queued=settings.max_queued, use_cache=generation.use_cache, adaptive_draft=generation.adaptive_draft,
        static=settings.batching == "static",
    )  # fmt: skip
    defaults = Defaults(
        model=name, max_tokens=generation.max_new_tokens, max_length=generation.max_length,
        temperature=generation.temperature, top_p=generation.top_p, top_k=generation.top_k, mode=generation.mode,
        add_eos_length=generation.add_eos_length, refine_iter=generation.refine_iter,
        draft_sources=generation.draft_sources,
    )  # fmt: skip
    api_key = settings.api_key or os.environ.get("DLLM_API_KEY") or None
    app = create_app(engine, defaults, datamodule.hparams.chat_template, api_key, settings.request_timeout)
    engine.start()
    print(f"dllm: serving {name!r} ({generation.mode}) on http://{settings.host}:{settings.port}/v1", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


def main() -> None:
    """Run ``serve.py``'s command line; a user mistake prints one ``error:`` line and exits with code 2."""
    # predict's checks want something to predict; the server never builds a loader, so one placeholder prompt,
    # last: a --config (configs/predict-tiny.yaml says `prompt: null`) must not undo it
    args = ["predict", *sys.argv[1:], "--data.prompt", "(served over HTTP)"]
    no_exit = {"exit_on_error": False}
    parser_kwargs = {**no_exit, **{name: dict(no_exit) for name in SUBCOMMANDS}}
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        ServeCLI(args=args, parser_kwargs=parser_kwargs, save_config_callback=None)
    except (UserError, ArgumentError, ValueError) as error:
        mistake = error if isinstance(error, ArgumentError) else _user_error(error)
        if mistake is None:
            raise
        print(f"error: {one_line(mistake)}", file=sys.stderr)
        sys.exit(2)
