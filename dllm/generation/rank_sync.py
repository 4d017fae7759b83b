"""Keeping ranks in step while they generate different amounts (FSDP, DeepSpeed ZeRO-3).

Under FSDP or ZeRO-3 every forward gathers the parameters with a collective, so
all ranks must call forward the same number of times. Hugging Face's answer is
``synced_gpus``; this is the same for ``iterative_generate(sync_ranks=True)``.
"""

from __future__ import annotations

import torch


class RankSync:
    """Keeps every rank calling forward until all are done.

    Under FSDP or DeepSpeed ZeRO-3 each forward gathers parameters with a
    collective, so a rank whose rows are finished must keep calling forward (on
    a dummy row) while others still generate. Before each real forward a rank
    adds 1 to an all-reduced flag; a finished rank adds 0 and runs a dummy
    forward whenever the sum is positive, and everyone stops when it is 0.
    """

    def __init__(self, device: torch.device):
        self.flag = torch.zeros(1, device=device)
        self.dummies = 0

    def _sum(self, value: float) -> float:
        self.flag.fill_(value)
        torch.distributed.all_reduce(self.flag)
        return float(self.flag.item())

    def before_forward(self) -> None:
        """This rank is about to run a real forward."""
        self._sum(1.0)

    def finish(self, model, pad_id: int, device: torch.device) -> None:
        """This rank is done: run dummy forwards until every rank is."""
        ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
        while self._sum(0.0) > 0:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            self.dummies += 1
