"""Old module names still import: ``dllm.records`` is ``dllm.data.records``, the same module object.

``dllm/`` was one flat folder until issue 24 grouped it into ``generation/``, ``training/`` and ``data/``.
This keeps what named the old modules working: user code, configs (``class_path:
dllm.strategies.HFBlockFSDPStrategy``), pickles, and ``python -m dllm.prompts``. Checkpoints need none of it
(their hyper-parameters are plain values; ``dllm.module.DLLMModule`` did not move). New code uses the new
names. ``dllm/__init__.py`` installs the finder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "dllm.draft_jacobi": "dllm.generation.jacobi",
    "dllm.drafting": "dllm.generation.drafting",
    "dllm.draft_sources": "dllm.generation.draft_sources",
    "dllm.batch": "dllm.generation.batch",
    "dllm.sampling": "dllm.generation.sampling",
    "dllm.rank_sync": "dllm.generation.rank_sync",
    "dllm.objective": "dllm.training.objective",
    "dllm.packed": "dllm.training.packed",
    "dllm.lm_head": "dllm.training.lm_head",
    "dllm.lora": "dllm.training.lora",
    "dllm.strategies": "dllm.training.strategies",
    "dllm.records": "dllm.data.records",
    "dllm.predictions": "dllm.data.predictions",
    "dllm.prompts": "dllm.data.prompts",
    "dllm.tokenizer": "dllm.data.tokenizer",
}


class _OldName(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and hands out the module under its new name."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        new = importlib.util.find_spec(MOVED[name])
        return importlib.util.spec_from_loader(name, self, origin=new.origin if new else None)

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass  # already run under its new name

    def get_code(self, name):
        """The new module's code: ``python -m <old name>`` runs it as ``__main__``."""
        new = MOVED[name]
        return importlib.util.find_spec(new).loader.get_code(new)


def install() -> None:
    """First in ``sys.meta_path``: an old name is always the new module, never a stale file of that name."""
    if not any(isinstance(finder, _OldName) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldName())
