"""dllm: teach a causal LM to write a block of tokens per forward pass, then generate that way."""

from dllm._moved import install as _install_old_names
from dllm.generation import GenerateOutput, iterative_generate

__all__ = ["GenerateOutput", "iterative_generate"]

_install_old_names()  # old module names (dllm.records, ...) still import: dllm/_moved.py
