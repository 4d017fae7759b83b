"""``DLLMCLI``: the one LightningCLI behind ``train.py`` and ``predict.py``.

It links the model's tokenizer into the DataModule (known only once the model
is built) and adds the JSONL prediction writer, so ``predict`` needs nothing
but a checkpoint and a prompts file.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dllm.callbacks import PredictionWriter
from dllm.data import DLLMDataModule
from dllm.module import DLLMModule


class DLLMCLI(LightningCLI):
    """``fit``/``validate``/``predict`` over ``DLLMModule`` and ``DLLMDataModule``."""

    def __init__(self, args=None, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(DLLMModule, DLLMDataModule, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model", "data.tokenizer", apply_on="instantiate", compute_fn=_tokenizer_of)
        parser.add_lightning_class_args(PredictionWriter, "predictions")


def _tokenizer_of(model: DLLMModule):
    return model.tokenizer
