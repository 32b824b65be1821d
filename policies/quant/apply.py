"""``apply_hif8(model)``: HiF8 fake quantization of a model's linears and attention inputs, in place.

Targeted ``nn.Linear`` modules get their class swapped to ``HiF8Linear`` (a subclass whose forward is
``hif8_linear``): parameters, ``state_dict`` keys, ``isinstance(m, nn.Linear)``, deepcopy and pickling are
unchanged, so checkpoints, EMA copies and FSDP wrapping keep working. Attention modules get a
``HiF8QKVHook`` in their ``qkv_hook`` attribute.

peft LoRA: a LoRA-wrapped target keeps its frozen ``nn.Linear`` as ``base_layer``; that base layer is
quantized and the LoRA branch (lora_A / lora_B) stays in high precision. Reasons: OSP-Next's recipe
quantizes the ten block linears of a full fine-tune, the rank-r branch costs little compute, and the
adapters are merged into the base weight before deployment, where the merged weight is what a HiF8
kernel would quantize. Module names are matched with peft's ``base_model.model.`` prefix and
``.base_layer`` components removed, so the same patterns work with and without LoRA, and on models
wrapped before or after ``apply_hif8``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from policies.quant.fake_quant import BACKENDS, HiF8QKVHook, LinearQuantizers, TensorQuantizer, hif8_linear
from policies.quant.scaling import BACKWARD_TARGET_MAX, FORWARD_TARGET_MAX, DelayedScaler

__all__ = [
    "DEFAULT_LINEAR_TARGETS",
    "DEFAULT_ATTENTION_TARGETS",
    "HiF8Config",
    "HiF8Linear",
    "HiF8Summary",
    "apply_hif8",
    "remove_hif8",
    "share_amax",
    "hif8_scaling_state_dict",
    "load_hif8_scaling_state_dict",
]

# OSP-Next's ten quantized linears per block.
DEFAULT_LINEAR_TARGETS = (
    "blocks.*.self_attn.q",
    "blocks.*.self_attn.k",
    "blocks.*.self_attn.v",
    "blocks.*.self_attn.o",
    "blocks.*.cross_attn.q",
    "blocks.*.cross_attn.k",
    "blocks.*.cross_attn.v",
    "blocks.*.cross_attn.o",
    "blocks.*.ffn.0",
    "blocks.*.ffn.2",
)
DEFAULT_ATTENTION_TARGETS = ("blocks.*.self_attn", "blocks.*.cross_attn")
_PEFT_PREFIX = "base_model.model."


@dataclass(kw_only=True)
class HiF8Config:
    """How ``apply_hif8`` quantizes. Targets are fnmatch patterns on module names (``*`` spans dots)."""

    targets: tuple[str, ...] = DEFAULT_LINEAR_TARGETS
    """nn.Linear modules whose input, weight and grad_output are quantized."""
    quantize_attention: bool = True
    """Also quantize Q/K/V (forward) and dQ/dK/dV (backward) of the attention modules below."""
    attention_targets: tuple[str, ...] = DEFAULT_ATTENTION_TARGETS
    """Attention modules; each must have a ``qkv_hook`` attribute the model calls before the kernel."""
    scaling: str = "current"
    """'current' (per-tensor amax of this call; keeps rollout/learner parity) or 'delayed' (amax history)."""
    history_len: int = 16
    """Length of the amax history for delayed scaling."""
    forward_target_max: float = FORWARD_TARGET_MAX
    """amax of activations, weights and Q/K/V maps here (15: top of HiF8's 3-mantissa-bit band)."""
    backward_target_max: float = BACKWARD_TARGET_MAX
    """amax of gradients maps here (224: top of the 2-mantissa-bit band)."""
    saturate: bool = False
    """Clamp overflow to +-32768 instead of +-Inf (and NaN to 0). OSP-Next does not saturate."""
    backend: str = "auto"
    """'auto' (fused Triton kernel on CUDA, torch ops elsewhere), 'torch' or 'triton'; bit-identical."""

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.attention_targets = tuple(self.attention_targets)
        if not self.targets and not self.quantize_attention:
            raise ValueError("targets is empty and quantize_attention is False: nothing to quantize; drop apply_hif8")
        if self.scaling not in ("current", "delayed"):
            raise ValueError(f"scaling must be 'current' or 'delayed', got {self.scaling!r}")
        if not (isinstance(self.history_len, int) and self.history_len >= 1):
            raise ValueError(f"history_len must be an int >= 1, got {self.history_len!r}")
        for name in ("forward_target_max", "backward_target_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 32768):
                raise ValueError(f"{name} must be in (0, 32768], got {value!r}; OSP-Next uses 15 forward, 224 backward")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def quantizer_kwargs(self) -> dict[str, Any]:
        return {
            "scaling": self.scaling,
            "history_len": self.history_len,
            "forward_target_max": self.forward_target_max,
            "backward_target_max": self.backward_target_max,
            "saturate": self.saturate,
            "backend": self.backend,
        }


class HiF8Linear(nn.Linear):
    """An ``nn.Linear`` whose forward runs ``hif8_linear``; made by ``apply_hif8`` via class swap only."""

    hif8: LinearQuantizers

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return hif8_linear(input, self.weight, self.bias, self.hif8)


@dataclass
class HiF8Summary:
    """What ``apply_hif8`` changed: canonical module names (peft prefixes removed) and the config."""

    config: HiF8Config
    linear_names: list[str] = field(default_factory=list)
    attention_names: list[str] = field(default_factory=list)

    @property
    def num_linears(self) -> int:
        return len(self.linear_names)

    @property
    def num_attention(self) -> int:
        return len(self.attention_names)

    def __str__(self) -> str:
        return (
            f"HiF8: {self.num_linears} linears, {self.num_attention} attention Q/K/V hooks, "
            f"{self.config.scaling} scaling (forward amax -> {self.config.forward_target_max:g}, "
            f"grads -> {self.config.backward_target_max:g})"
        )


def _canonical_name(name: str) -> str:
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def apply_hif8(
    model: nn.Module,
    *,
    targets: tuple[str, ...] = DEFAULT_LINEAR_TARGETS,
    quantize_attention: bool = True,
    attention_targets: tuple[str, ...] = DEFAULT_ATTENTION_TARGETS,
    scaling: str = "current",
    history_len: int = 16,
    forward_target_max: float = FORWARD_TARGET_MAX,
    backward_target_max: float = BACKWARD_TARGET_MAX,
    saturate: bool = False,
    backend: str = "auto",
) -> HiF8Summary:
    """Quantize ``model`` in place; the arguments are the fields of ``HiF8Config`` (documented there).

    ``apply_hif8(model)`` is OSP-Next's recipe: the ten linears of every block plus Q/K/V, current
    per-tensor scaling to 15 forward / 224 backward, TA rounding, no saturation. A config dataclass can be
    passed as ``apply_hif8(model, **dataclasses.asdict(cfg))``. Raises ValueError if a pattern matches
    nothing, matches a module of the wrong kind, or the model is already quantized.
    """
    cfg = HiF8Config(
        targets=targets, quantize_attention=quantize_attention, attention_targets=attention_targets,
        scaling=scaling, history_len=history_len, forward_target_max=forward_target_max,
        backward_target_max=backward_target_max, saturate=saturate, backend=backend,
    )
    summary = HiF8Summary(config=cfg)
    linear_hits = {pattern: 0 for pattern in cfg.targets}
    attention_hits = {pattern: 0 for pattern in cfg.attention_targets}
    for name, module in model.named_modules():
        canonical = _canonical_name(name)
        if isinstance(module, HiF8Linear) or isinstance(getattr(module, "qkv_hook", None), HiF8QKVHook):
            raise ValueError(f"{name} is already HiF8-quantized; call remove_hif8(model) before applying again")
        if type(module) is nn.Linear and _matches(canonical, cfg.targets):
            _count_hits(canonical, cfg.targets, linear_hits)
            module.__class__ = HiF8Linear
            module.hif8 = LinearQuantizers.build(**cfg.quantizer_kwargs())
            summary.linear_names.append(canonical)
        elif cfg.quantize_attention and _matches(canonical, cfg.attention_targets):
            if "qkv_hook" not in vars(module):
                raise ValueError(
                    f"attention module {name} ({type(module).__name__}) has no qkv_hook attribute; narrow "
                    "attention_targets to modules that call qkv_hook, or pass quantize_attention=False"
                )
            _count_hits(canonical, cfg.attention_targets, attention_hits)
            module.qkv_hook = HiF8QKVHook(**cfg.quantizer_kwargs())
            summary.attention_names.append(canonical)
    _check_hits("targets", linear_hits)
    if cfg.quantize_attention:
        _check_hits("attention_targets", attention_hits)
    return summary


def _count_hits(name: str, patterns: tuple[str, ...], hits: dict[str, int]) -> None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            hits[pattern] += 1


def _check_hits(field_name: str, hits: dict[str, int]) -> None:
    unmatched = [pattern for pattern, count in hits.items() if count == 0]
    if unmatched:
        raise ValueError(
            f"{field_name} pattern(s) {unmatched} matched no module (plain nn.Linear for targets); check the "
            "names in model.named_modules() and fix or drop the pattern"
        )


def remove_hif8(model: nn.Module) -> int:
    """Undo ``apply_hif8``: linears become plain ``nn.Linear``, qkv hooks None. Returns modules restored."""
    restored = 0
    for module in model.modules():
        if isinstance(module, HiF8Linear):
            module.__class__ = nn.Linear
            del module.hif8
            restored += 1
        elif isinstance(getattr(module, "qkv_hook", None), HiF8QKVHook):
            module.qkv_hook = None
            restored += 1
    return restored


def _named_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    found: dict[str, TensorQuantizer] = {}
    for name, module in model.named_modules():
        canonical = _canonical_name(name)
        if isinstance(module, HiF8Linear):
            for role in ("input", "weight", "grad_output"):
                found[f"{canonical}.{role}"] = getattr(module.hif8, role)
        elif isinstance(getattr(module, "qkv_hook", None), HiF8QKVHook):
            for role, quantizer in module.qkv_hook.quantizers().items():
                found[f"{canonical}.{role}"] = quantizer
    return found


def share_amax(model: nn.Module, group: Any) -> int:
    """Let every activation, Q/K/V and gradient quantizer of ``model`` use the amax of the whole tensor whose shards
    the ranks of ``group`` (the sequence-parallel group) hold; returns how many quantizers now share.

    Weights are left alone: every rank quantizes the same full weight (replicated, or gathered by FSDP) already.
    Call it after ``apply_hif8`` and ``apply_sequence_parallel``, on every rank of ``group``.
    """
    shared = 0
    for key, quantizer in _named_quantizers(model).items():
        if not key.endswith(".weight"):
            quantizer.amax_group = group
            shared += 1
    return shared


def hif8_scaling_state_dict(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Delayed-scaling state of every quantized tensor role, keyed ``<module>.<role>`` (empty if current)."""
    return {
        key: q.scaler.state_dict() for key, q in _named_quantizers(model).items() if isinstance(q.scaler, DelayedScaler)
    }


def load_hif8_scaling_state_dict(model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    """Restore ``hif8_scaling_state_dict`` output into a model quantized with the same settings."""
    quantizers = {k: q for k, q in _named_quantizers(model).items() if isinstance(q.scaler, DelayedScaler)}
    if set(quantizers) != set(state):
        missing, unexpected = sorted(set(quantizers) - set(state)), sorted(set(state) - set(quantizers))
        raise ValueError(
            f"HiF8 scaling state does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}; "
            "apply_hif8 with the same targets and scaling='delayed' before loading"
        )
    for key, quantizer in quantizers.items():
        quantizer.scaler.load_state_dict(state[key])
