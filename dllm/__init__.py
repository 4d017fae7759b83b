"""dllm: teach a causal LM to write a block of tokens per forward pass, then generate that way."""

from dllm.generation import GenerateOutput, iterative_generate

__all__ = ["GenerateOutput", "iterative_generate"]
