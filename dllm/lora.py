"""LoRA adapters (through PEFT) for ``DLLMModule``, and their merge into an ordinary checkpoint.

A small model fine-tuned on a few hundred of its own answers drifts away from them (docs/real.md); a
low-rank update is both a regulariser (the base weights stay frozen) and cheaper per step (AdamW keeps
state for the adapters only). The adapters are injected *in place* (``peft.inject_adapter_in_model``): the
model stays its HF class, so the objective and generation call it as before, and Lightning checkpoints
hold the frozen base weights plus the adapters, so a fit resumes as any other. The HF export merges them
(``merge_lora``): ``W + (alpha / r) B A`` per adapted layer, which is what PEFT's ``merge_and_unload`` computes,
so the exported folder is a plain checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads without PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dllm.errors import UserError

ADAPTER = "default"  # PEFT's adapter name: state-dict keys read ``<layer>.lora_A.default.weight``


@dataclass
class LoraSettings:
    """LoRA adapters on the model's linear layers (``model.lora``; ``None`` fine-tunes every weight).

    Args:
        r: rank of each update ``B A``.
        alpha: scale: the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapters' input while training.
        target_modules: module names to adapt (e.g. ``[q_proj, v_proj]``), or ``all-linear`` (every linear
            layer but the LM head).
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


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze every other weight; returns ``model``."""
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
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:  # PEFT's NoMatchingPeftModuleError and its checks of target_modules
        kinds = ("Linear", "Conv1D", "Embedding")  # the layers a user names (GPT-2's are Conv1D)
        layers = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if type(m).__name__ in kinds})
        reason = str(e).split(". ")[0]
        raise UserError(
            f"--model.lora.target_modules {settings.target_modules}: {reason}; the model's layers: "
            f"{', '.join(layers)} (or all-linear)"
        ) from None
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_" in name
    return model


def merge_lora(state_dict: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict as the plain model's: each adapted layer's weight becomes ``W + s B A``.

    Works on a gathered state dict (any strategy, no model copy). A state dict without adapters is returned
    as it is.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        layer, _, leaf = key.rpartition(".base_layer.")
        if leaf == "weight" and f"{layer}.lora_A.{ADAPTER}.weight" in state_dict:
            a = state_dict[f"{layer}.lora_A.{ADAPTER}.weight"]
            b = state_dict[f"{layer}.lora_B.{ADAPTER}.weight"]
            delta = (b.to(torch.float64) @ a.to(torch.float64)) * settings.scaling
            value = (value.to(torch.float64) + delta).to(value.dtype)
        merged[f"{layer}.{leaf}"] = value
    return merged
