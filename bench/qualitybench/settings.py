"""What ``bench/quality.py`` trains: the from-scratch objectives, the stage-2 fine-tunes, the model, the grid.

:data:`OBJECTIVES` (from scratch), :data:`FINETUNES` (stage 2, from the SFT model: :data:`STAGE2`,
:data:`RECIPE`, :data:`PACKED`), :data:`MODEL` and :class:`Setup` (everything that defines a trained model
and the evaluation grid; :data:`QUICK` is the smoke run's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# From-scratch objectives; every other setting is shared.
OBJECTIVES: dict[str, dict] = {
    "sft": {"noise_min": 0.0, "noise_max": 0.0, "num_rounds": 1},
    "refine": {},
    "refine+ar": {"ar_loss_weight": 1.0},
    "refine+block": {"noise_schedule": "block"},
}

# Stage 2: from the SFT model's HF export, every model gets the same optimiser, batch and steps
# (``Setup.stage2_steps``); only the objective differs. ``sft-recipe`` is the documented recipe: a clean
# prefix up to a random cut, then EOS noise at t ~ U[0.5, 1] (``noise_schedule="prefix"``), scored on
# the clean prefix and the 16 targets from the cut on (``loss_window``: the N + 1 = 16 tokens a block
# drafts at N = 15), two rounds weighted 2:1, no extra AR forward. Small batches buy more updates for
# the same compute. The measurements behind each choice are in docs/quality.md.
STAGE2 = {"batch_size": 8, "lr": 1e-3, "warmup_steps": 20}
RECIPE = {"noise_schedule": "prefix", "noise_min": 0.5, "noise_max": 1.0, "loss_window": 16, "loss_weights": [2.0, 1.0]}
# ``sft-packed``: a noisy copy of every 15-token block (N = 15, the N the curve decodes with) beside the clean
# answer, each block EOS with probability t ~ U[0.5, 1]; one round; the clean stream's next-token term from the
# same forward (weight 1). A step is one forward of a row about twice as long as the recipe's two.
PACKED = {"noise_schedule": "packed", "noise_block_size": 15, "noise_min": 0.5, "noise_max": 1.0, "num_rounds": 1,
          "ar_loss_weight": 1.0}  # fmt: skip
FINETUNES: dict[str, dict] = {
    "sft-refine": {**STAGE2},
    "sft-refine+ar": {**STAGE2, "ar_loss_weight": 1.0},
    "sft-refine+block": {**STAGE2, "noise_schedule": "block"},
    "sft-recipe": {**STAGE2, **RECIPE},
    "sft-packed": {**STAGE2, **PACKED},
    # the same for half the steps (its own cosine schedule): the packed objective at half the recipe's time
    "sft-packed-half": {**STAGE2, **PACKED, "step_share": 0.5},
    # tuning after the first run (docs/quality.md): the AR term weighted up, against the accuracy dip
    "sft-packed-half-ar2": {**STAGE2, **PACKED, "ar_loss_weight": 2.0, "step_share": 0.5},
    "sft-packed-half-ar3": {**STAGE2, **PACKED, "ar_loss_weight": 3.0, "step_share": 0.5},
}

MODEL = {  # ~0.18M parameters, Llama-shaped, byte vocabulary
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512, "tie_word_embeddings": True,
}  # fmt: skip


@dataclass
class Setup:
    """Everything that defines a trained model and the evaluation grid."""

    task: str = "recurrence"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-3
    num_train: int = 5000
    num_val: int = 100
    val_every: int = 250
    stage2_steps: int = 1200
    stage2_val_every: int = 200
    stage2_n: int = 15
    num_test: int = 200
    batch1_prompts: int = 40
    eval_batch: int = 50
    max_new_tokens: int = 160
    refine_n: list[int] = field(default_factory=lambda: [3, 7, 15])
    refine_r: list[int] = field(default_factory=lambda: [1, 2, 3])
    jacobi_n: list[int] = field(default_factory=lambda: [3, 7, 15])
    model: dict = field(default_factory=lambda: dict(MODEL))
    objectives: list[str] = field(default_factory=lambda: ["sft", *FINETUNES, "refine", "refine+ar", "refine+block"])

    def stage2_steps_of(self, name: str) -> int:
        """A stage-2 model's steps: ``stage2_steps``, times its ``step_share`` if it has one."""
        return max(1, round(self.stage2_steps * FINETUNES[name].get("step_share", 1.0)))

    def training(self, name: str) -> dict:
        """The settings a checkpoint depends on (reuse only when they match)."""
        shared = {"task": self.task, "batch_size": self.batch_size, "num_train": self.num_train, "model": self.model}
        if name in FINETUNES:
            return {"objective": name, "overrides": FINETUNES[name], "steps": self.stage2_steps_of(name),
                    "stage1": self.training("sft"), **shared}  # fmt: skip
        return {"objective": name, "overrides": OBJECTIVES[name], "steps": self.steps, "lr": self.lr, **shared}


QUICK = Setup(
    steps=6, num_train=64, num_val=8, val_every=3, stage2_steps=4, stage2_val_every=2, stage2_n=3, num_test=8,
    eval_batch=8, max_new_tokens=24, refine_n=[3], refine_r=[1, 2], jacobi_n=[3],
    objectives=["sft", "sft-recipe", "refine"],
    model={**MODEL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
)  # fmt: skip
