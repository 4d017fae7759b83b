"""FSDP auto-wrap finds each architecture's transformer blocks from the model itself."""

import pytest
import torch
from conftest import build_model

from dllm.training.strategies import HFBlockFSDPStrategy, hf_block_classes


@pytest.mark.parametrize(
    ("arch", "block"),
    [("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"), ("gpt2", "GPT2Block"),
     ("mistral", "MistralDecoderLayer"), ("qwen3", "Qwen3DecoderLayer")],
)  # fmt: skip
def test_hf_block_classes_are_the_decoder_layers(arch, block):
    wrapper = torch.nn.ModuleDict({"model": build_model(arch)})  # as inside DLLMModule
    classes = hf_block_classes(wrapper)
    assert {c.__name__ for c in classes} == {block}
    layers = [m for m in wrapper.modules() if type(m) in classes]
    assert len(layers) == 2  # the config's num_hidden_layers


def test_hf_block_classes_without_an_hf_model_is_an_error():
    with pytest.raises(ValueError, match="no transformer blocks"):
        hf_block_classes(torch.nn.Linear(2, 2))


def test_strategy_keeps_fsdp_arguments():
    strategy = HFBlockFSDPStrategy(activation_checkpointing_blocks=True, sharding_strategy="SHARD_GRAD_OP")
    assert strategy._checkpoint_blocks
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
