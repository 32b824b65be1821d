"""LoRA adapters (peft) on a transformer: inject them, and run the base model with them switched off."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


def apply_lora(transformer: nn.Module, *, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Inject LoRA adapters (peft) into ``transformer`` in place; only the adapters stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian", lora_dropout=0.0)
    transformer.requires_grad_(False)
    inject_adapter_in_model(config, transformer)
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in transformer.parameters()):
        raise ValueError(f"learner.lora.targets {targets} matched no module of the transformer; "
                         "name modules as they appear in transformer.named_modules(), e.g. self_attn.q")
    # Gaussian init of B as well as A would change the model; peft's "gaussian" keeps B at zero: the start is the base.
    return transformer


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run the base model without its LoRA adapters (the KL reference in the OSP-Next recipe)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
