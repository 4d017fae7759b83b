"""LoRA adapters (through PEFT) for ``DLLMModule``, and their merge into an ordinary checkpoint.

A small model fine-tuned on a few hundred of its own answers drifts away from them (docs/real.md); a
low-rank update is both a regulariser (the base weights stay frozen) and cheaper per step (AdamW keeps
state for the adapters only). The adapters are injected *in place* (``peft.inject_adapter_in_model``): the
model stays its HF class, so the objective and generation call it as before, and Lightning checkpoints
hold the frozen base weights plus the adapters, so a fit resumes as any other.

The HF export merges them (``merge_lora``) into a plain checkpoint that ``AutoModelForCausalLM.from_pretrained``
loads without PEFT. The merge works on the gathered state dict, so it serves every strategy (FSDP and ZeRO-3
shard the live layers) without building a second model; it adds each layer's update exactly as PEFT's own
``get_delta_weight`` does, for the three layer types PEFT adapts in a causal LM:

- ``linear`` (``nn.Linear``, weight ``[out, in]``): ``W + s B A``;
- ``conv1d`` (GPT-2's ``Conv1D``, weight stored transposed, PEFT's ``fan_in_fan_out``): ``W + s (B A)^T``;
- ``embedding`` (``lora_embedding_A`` ``[r, vocab]``, ``lora_embedding_B`` ``[dim, r]``): ``W + s (B A)^T``,

with ``s = alpha / r``. Which type each layer is cannot be read from the state dict (a square Conv1D and a
square Linear look the same), so ``add_lora`` records it from the live model at setup (``lora_layers``) and
refuses, in one line, a target it could not merge: another PEFT layer type (convolutions, attention
modules), or an embedding or LM head whose weight the other one shares (``tie_word_embeddings``: the merged
update would change both, while the trained model changed one).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from dllm.errors import UserError

ADAPTER = "default"  # PEFT's adapter name: state-dict keys read ``<layer>.lora_A.default.weight``
LAYERS_ATTR = "dllm_lora_layers"  # where add_lora keeps ``lora_layers(model)`` on the model it adapted


@dataclass
class LoraSettings:
    """LoRA adapters on the model's linear layers (``model.lora``; ``None`` fine-tunes every weight).

    Args:
        r: rank of each update ``B A``.
        alpha: scale: the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapters' input while training.
        target_modules: module names to adapt (e.g. ``[q_proj, v_proj]``), or ``all-linear`` (every linear
            layer but the LM head, GPT-2's ``Conv1D`` included). Embeddings (``embed_tokens``, ``wte``) may be
            named too unless the LM head shares their weight (``tie_word_embeddings``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserError(f"model.lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class AdaptedLayer:
    """How one adapted layer's update lands on its base weight (see the module docstring)."""

    kind: Literal["linear", "conv1d", "embedding"]
    scaling: float


def lora_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(name, layer)`` for every PEFT LoRA layer in ``model`` (the layers to merge, enable or disable)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_layers(model: torch.nn.Module) -> dict[str, AdaptedLayer]:
    """Every LoRA layer of ``model`` by module name, with its type; ``UserError`` for one the export cannot merge."""
    from peft.tuners import lora

    layers: dict[str, AdaptedLayer] = {}
    for name, module in lora_modules(model):
        if type(module) is lora.Linear and not getattr(module, "use_dora", {}).get(ADAPTER, False):
            kind = "conv1d" if module.fan_in_fan_out else "linear"
        elif type(module) is lora.Embedding:
            kind = "embedding"
        else:
            base = type(module.get_base_layer()).__name__
            raise UserError(
                f"model.lora.target_modules: {name} is a {base}, whose adapter the HF export cannot merge; "
                "name linear, Conv1D or embedding layers only"
            )
        layers[name] = AdaptedLayer(kind, float(module.scaling[ADAPTER]))
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # a model that names neither cannot tie them
        return layers
    # a LoRA layer's .weight is its base layer's, so a tie survives the injection
    if inputs is not None and outputs is not None and inputs.weight is outputs.weight:
        for name, module in lora_modules(model):
            if module is inputs or module is outputs:
                raise UserError(
                    f"model.lora.target_modules: {name} shares its weight with the "
                    f"{'LM head' if module is inputs else 'input embedding'} (tie_word_embeddings), so a merged "
                    "update would change both; leave it out of target_modules"
                )
    return layers


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze every other weight; returns ``model``.

    Refuses (``UserError``) a target the HF export could not merge, before any step is trained.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("model.lora needs PEFT: pip install 'dllm[lora]' (or pip install peft)") from None
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    try:
        with warnings.catch_warnings():  # PEFT sets fan_in_fan_out itself on GPT-2's Conv1D, and says so per layer
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:  # PEFT's NoMatchingPeftModuleError and its checks of target_modules
        kinds = ("Linear", "Conv1D", "Embedding")  # the layers a user names (GPT-2's are Conv1D)
        layers = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if type(m).__name__ in kinds})
        reason = str(e).split(". ")[0]
        raise UserError(
            f"--model.lora.target_modules {settings.target_modules}: {reason}; the model's layers: "
            f"{', '.join(layers)} (or all-linear)"
        ) from None
    # kept on the model: under FSDP the live module names gain wrapper segments, the gathered keys do not
    setattr(model, LAYERS_ATTR, lora_layers(model))
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_" in name
    return model


def _delta(state_dict: dict[str, torch.Tensor], name: str, layer: AdaptedLayer) -> torch.Tensor:
    """The update ``s B A`` of layer ``name`` shaped as its stored base weight, in float64."""
    if layer.kind == "embedding":
        a, b = state_dict[f"{name}.lora_embedding_A.{ADAPTER}"], state_dict[f"{name}.lora_embedding_B.{ADAPTER}"]
    else:
        a, b = state_dict[f"{name}.lora_A.{ADAPTER}.weight"], state_dict[f"{name}.lora_B.{ADAPTER}.weight"]
    delta = (b.to(torch.float64) @ a.to(torch.float64)) * layer.scaling
    return delta if layer.kind == "linear" else delta.T


def merge_lora(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA model's gathered state dict as the plain model's: each adapted weight becomes ``W + update``.

    ``model`` is the model ``add_lora`` adapted (live, possibly sharded: only the layer types it recorded are
    read). Works on a gathered state dict (any strategy, no model copy); the tensors given are not changed.
    A state dict without adapters is returned as it is; an adapter of an unrecorded layer raises rather than
    being dropped from the export.
    """
    layers: dict[str, AdaptedLayer] = getattr(model, LAYERS_ATTR, {})
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            if key.rpartition(".lora_")[0] not in layers:
                raise RuntimeError(f"merge_lora: {key} belongs to no recorded LoRA layer; nothing would merge it")
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        name, _, leaf = key.rpartition(".base_layer.")
        if leaf == "weight" and name in layers:
            value = (value.to(torch.float64) + _delta(state_dict, name, layers[name])).to(value.dtype)
        merged[f"{name}.{leaf}"] = value
    return merged
