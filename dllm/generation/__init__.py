"""Generation: the block-parallel decoding engine (refine, jacobi), its draft policy and sources, the
batch and KV-cache bookkeeping, the exact sampler and rank sync. Pure PyTorch, no Lightning.
"""

from dllm.generation.contract import GenerateOutput, TraceStep
from dllm.generation.engine import filter_logits, iterative_generate
from dllm.generation.settings import GenerationSettings

__all__ = ["GenerateOutput", "GenerationSettings", "TraceStep", "filter_logits", "iterative_generate"]
