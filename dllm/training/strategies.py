"""FSDP for any HF causal LM: wrap its transformer blocks without naming their class.

Lightning's ``FSDPStrategy`` needs an ``auto_wrap_policy`` naming the block
class (``Qwen2DecoderLayer``, ``LlamaDecoderLayer``, ...). Every HF model lists
those classes in ``_no_split_modules``; ``HFBlockFSDPStrategy`` reads that list
from the model it is given, so one YAML serves every architecture::

    trainer:
      strategy:
        class_path: dllm.training.strategies.HFBlockFSDPStrategy
        init_args: {sharding_strategy: FULL_SHARD, state_dict_type: full}
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy


def hf_block_classes(module: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The transformer-block classes of the HF models inside ``module`` (from ``_no_split_modules``)."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or [])
    classes = {type(sub) for sub in module.modules() if type(sub).__name__ in names}
    if not classes:
        raise ValueError(f"no transformer blocks found to wrap (looked for {sorted(names) or '_no_split_modules'})")
    return classes


class HFBlockFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that auto-wraps each transformer block of the HF model (and checkpoints it if asked).

    Args:
        activation_checkpointing_blocks: recompute each block's activations in backward.
        **kwargs: everything ``FSDPStrategy`` takes (``sharding_strategy``, ``state_dict_type``,
            ``cpu_offload``, ``mixed_precision``, ...). An explicit ``auto_wrap_policy`` wins.
    """

    def __init__(self, activation_checkpointing_blocks: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._checkpoint_blocks = activation_checkpointing_blocks

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning.fabric.strategies.fsdp import _activation_checkpointing_kwargs, _auto_wrap_policy_kwargs

        blocks = hf_block_classes(model)
        if "auto_wrap_policy" not in self.kwargs:
            self.kwargs = _auto_wrap_policy_kwargs(blocks, self.kwargs)
        if self._checkpoint_blocks and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = _activation_checkpointing_kwargs(None, blocks)
        return super()._setup_model(model)
