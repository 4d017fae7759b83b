"""Training: the iterative-refine objective (plain and packed), the LM-head helpers, LoRA and the FSDP
strategy. Pure PyTorch except the strategy; the LightningModule (``dllm.module``) assembles them.
"""

from dllm.training.objective import RefineLossOutput, iterative_refine_loss

__all__ = ["RefineLossOutput", "iterative_refine_loss"]
