"""The one place a policy is built from an experiment config: base model, HiF8, LoRA, sharding, trained weights.

The local trainer, every Ray worker rank, ``mixgrpo sample`` and the benchmarks call :func:`build_policy`, so
they all see the same numerics (quantization and LoRA are applied to the one transformer that rollouts and
updates share, which keeps the first-step probability ratio at 1). This is also the only module of ``mixgrpo``
that names concrete policies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mixgrpo.config import ExperimentConfig, PolicyConfig
from policies.base import Policy
from policies.compile import maybe_compile

Shard = Callable[[nn.Module], None]
"""Applied to the transformer in place after HiF8 and LoRA, before its weights are materialised or loaded
(sequence parallelism, FSDP)."""


def build_policy(cfg: ExperimentConfig, *, device: str | torch.device = "cpu", shard: Shard | None = None,
                 checkpoint: str | Path | None = None, trainable: bool = True) -> Policy:
    """The experiment's policy on ``device``.

    Args:
        shard: see :data:`Shard`; a synthetic transformer is built on the meta device and materialised only
            after it, so each rank allocates just its own shards.
        checkpoint: a checkpoint folder of a run; its trained weights (the EMA when the run kept one) replace the
            transformer's trainable tensors.
        trainable: False builds the frozen reference of a KL term: the base without LoRA adapters.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        # Every process seeds the same way, so randomly initialised parts (LoRA's A matrices) agree everywhere.
        torch.manual_seed(cfg.train.seed)
        policy = _base_policy(cfg.policy, device=device)
        transformer = policy.transformer
        if cfg.policy.gradient_checkpointing:
            from policies.checkpointing import apply_checkpointing

            apply_checkpointing(transformer, cfg.policy.gradient_checkpointing)
        if cfg.policy.quantization == "fp8":
            from policies.quant.fp8 import apply_fp8

            apply_fp8(transformer)
        if cfg.policy.quantization == "hif8":
            from policies.quant import apply_hif8

            apply_hif8(transformer)
        if trainable and cfg.learner.lora.enabled:
            from mixgrpo.engine.learner import apply_lora

            lora = cfg.learner.lora
            apply_lora(transformer, rank=lora.rank, alpha=lora.alpha, targets=lora.targets)
    if not trainable:
        transformer.requires_grad_(False)
    policy.text_encoder.to(device)
    policy.vae.to(device)
    on_meta = any(p.is_meta for p in transformer.parameters())
    if not on_meta:
        transformer.to(device)
    if shard is not None:
        shard(transformer)
    if on_meta:
        from policies.synthetic import materialize_

        materialize_(transformer, device, seed=cfg.train.seed)
    if checkpoint is not None:
        load_trained_weights(transformer, checkpoint)
    maybe_compile(transformer, cfg.policy.compile, device)  # last: compiles the blocks as HiF8/LoRA/SP/FSDP left them
    return policy


def _base_policy(cfg: PolicyConfig, *, device: torch.device) -> Policy:
    if cfg.kind == "toy":
        from policies.toy import build_toy_policy

        return build_toy_policy(weights=cfg.weights)
    if cfg.kind == "synthetic":
        from policies.synthetic import build_synthetic_policy

        # Built on the meta device: materialised on its device (after sharding) in seconds, not minutes on the CPU.
        return build_synthetic_policy(preset=cfg.preset, num_frames=cfg.num_frames, height=cfg.height,
                                      width=cfg.width, layout=cfg.layout, num_full_blocks=cfg.num_full_blocks,
                                      sparse_ratio=cfg.sparse_ratio, dtype=getattr(torch, cfg.dtype), device="meta")
    from policies.wan import build_wan_policy

    return build_wan_policy(cfg, device=device)


def load_trained_weights(transformer: nn.Module, checkpoint: str | Path, *, ema: bool = True) -> None:
    """Copy a checkpoint's trained tensors (its EMA when ``ema`` and present) into ``transformer``, sharded or not."""
    from mixgrpo.engine.checkpoint import read_model_weights
    from policies.parallel.fsdp import copy_full_

    weights = read_model_weights(Path(checkpoint), ema=ema)
    params = dict(transformer.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"checkpoint {checkpoint} holds tensors this policy lacks, e.g. {unknown[:3]}; was it "
                         "written with other policy or learner.lora settings?")
    with torch.no_grad():
        for name, value in weights.items():
            copy_full_(params[name], value)


def transformer_geometry(cfg: PolicyConfig) -> tuple[int | None, int | None]:
    """(num_heads, sparse_ratio) of the transformer ``cfg`` describes, read without loading any weights (None where
    it cannot be known before loading, e.g. an original Wan weight file with no config)."""
    if cfg.kind == "toy":
        from policies.toy.policy import ToyPolicyConfig, read_toy_metadata

        toy = ToyPolicyConfig.from_dict(read_toy_metadata(cfg.weights)["config"]) if cfg.weights else ToyPolicyConfig()
        return toy.num_heads, toy.sparse_ratio
    if cfg.kind == "synthetic":
        from policies.osp_next import OSPNextConfig

        return OSPNextConfig.preset(cfg.preset).num_heads, cfg.sparse_ratio
    path, _ = cfg.component_dir("transformer")
    config_file = Path(path) / "transformer" / "config.json"
    if not config_file.is_file():
        config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None, cfg.sparse_ratio
    data = json.loads(config_file.read_text())
    heads = data.get("num_attention_heads", data.get("num_heads"))
    return heads, cfg.sparse_ratio if cfg.sparse_ratio is not None else data.get("sparse_ratio", 2)


def check_parallel_degrees(cfg: ExperimentConfig) -> None:
    """Fail before any model loads when ``rollout.sp_size`` does not fit the transformer."""
    from policies.parallel import check_degrees

    if cfg.rollout.backend == "ray" and cfg.rollout.sp_size > 1:
        heads, sparse_ratio = transformer_geometry(cfg.policy)
        if heads is not None:
            check_degrees(cfg.rollout.sp_size, num_heads=heads, sparse_ratio=sparse_ratio)
