"""Whether a run is distributed, and whether its strategy makes every forward a collective.

Below generation (ranks kept in step), data (every rank batches the same prompts) and the module: FSDP and
DeepSpeed ZeRO-3 gather parameters in each forward, so every rank must call forward the same number of times.
"""

from __future__ import annotations

import torch


def forwards_are_collective(strategy) -> bool:
    """Whether every forward is a collective across ranks (sharded parameters gathered on the fly).

    True under FSDP, FSDP2 (``ModelParallelStrategy``) and DeepSpeed ZeRO-3 with more than one
    rank. Generation must then keep every rank calling forward until all are done
    (``iterative_generate(sync_ranks=True)``), and every rank must generate in the same places.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if strategy is None or getattr(strategy, "world_size", 1) <= 1:
        return False
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and bool(getattr(strategy, "zero_stage_3", False))


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
