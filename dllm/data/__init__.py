"""Data: reading and checking record files, the tokenizer and chat rendering, prediction files, prompt
sets, and the ``DLLMDataModule`` that batches them (imported on first use: the rest needs no
Lightning, so ``python -m dllm.data.prompts`` starts quickly).
"""

__all__ = ["DLLMDataModule"]


def __getattr__(name: str):
    # imported on first use (PEP 562): the package's other modules need no Lightning
    if name == "DLLMDataModule":
        from dllm.data.datamodule import DLLMDataModule

        return DLLMDataModule
    raise AttributeError(f"module 'dllm.data' has no attribute {name!r}")
