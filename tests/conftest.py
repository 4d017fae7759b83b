"""Tiny random models built from configs in memory (no downloads), in float64."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dllm.generation.drafting import forget

VOCAB = 40
EOS = 1
# the model of the Lightning and CLI tests (`model.model_config`; the vocabulary comes from the tokenizer)
SMALL_MODEL = {
    "model_type": "llama",  # AutoTokenizer overrides the byte tokenizer's class for qwen2 checkpoints
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def rope_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=EOS,
        pad_token_id=0,
    )


def build_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of the given architecture, float64, eval mode."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**rope_kwargs()))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**rope_kwargs()))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **rope_kwargs()))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **rope_kwargs()))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512, eos_token_id=EOS)
        )
    else:
        raise ValueError(arch)
    return model.double().eval()


ARCHS = ["llama", "qwen2", "gpt2", "mistral", "qwen3"]


@pytest.fixture(autouse=True)
def fresh_draft_memory():
    """Each test starts without what earlier calls measured (adaptive jacobi's calibration is then the same)."""
    forget()


@pytest.fixture(scope="session")
def models() -> dict:
    return {arch: build_model(arch) for arch in ARCHS}
