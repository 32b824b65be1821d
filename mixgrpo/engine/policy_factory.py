"""The one place a policy is built from an experiment config: base model, the model recipe, trained weights.

The local trainer, every Ray worker rank, ``mixgrpo sample`` and the benchmarks call :func:`build_policy`, so
they all see the same numerics (quantization and LoRA are applied to the one transformer that rollouts and
updates share, which keeps the first-step probability ratio at 1). What is applied to the transformer, and in
which order, is ``policies.prepare`` (one recipe, one function). This is also the only module of ``mixgrpo``
that names concrete policies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mixgrpo.config import ExperimentConfig, PolicyConfig
from mixgrpo.engine.checkpoint import load_trained_weights
from policies.base import Policy
from policies.compile import maybe_compile
from policies.parallel.dims import ParallelDims
from policies.prepare import LoraRecipe, ModelRecipe, mixed_precision_dtype, prepare_transformer

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["build_policy", "check_parallel_degrees", "load_trained_weights", "model_recipe", "transformer_geometry"]


def model_recipe(cfg: ExperimentConfig, *, trainable: bool = True) -> ModelRecipe:
    """What ``cfg`` asks to apply to its transformer (``trainable=False``: the frozen base of a KL reference)."""
    lora = cfg.learner.lora
    return ModelRecipe(gradient_checkpointing=cfg.policy.gradient_checkpointing, quantization=cfg.policy.quantization,
                       lora=LoraRecipe(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets))
                       if trainable and lora.enabled else None,
                       trainable=trainable, mixed_precision=mixed_precision_dtype(cfg.learner.mixed_precision),
                       seed=cfg.train.seed)


def build_policy(cfg: ExperimentConfig, *, device: str | torch.device = "cpu", dims: ParallelDims = ParallelDims(),
                 mesh: DeviceMesh | None = None, checkpoint: str | Path | None = None,
                 trainable: bool = True) -> Policy:
    """The experiment's policy on ``device``, its transformer prepared for the world ``dims`` describes.

    Args:
        dims, mesh: this rank's world and its mesh (``dims.world_mesh()``; needed when ``dims.sharded``); the
            default is one device. A synthetic transformer is built on the meta device and materialised only
            after sharding, so each rank allocates just its own shards.
        checkpoint: a checkpoint folder of a run; its trained weights (the EMA when the run kept one) replace the
            transformer's trainable tensors.
        trainable: False builds the frozen reference of a KL term: the base without LoRA adapters.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        # Every process seeds the same way, so randomly initialised parts (LoRA's A matrices) agree everywhere.
        torch.manual_seed(cfg.train.seed)
        policy = _base_policy(cfg.policy, device=device)
        policy.text_encoder.to(device)
        policy.vae.to(device)
        prepare_transformer(policy.transformer, model_recipe(cfg, trainable=trainable), dims=dims, device=device,
                            mesh=mesh)
    if checkpoint is not None:
        load_trained_weights(policy.transformer, checkpoint)
    # last: compiles the blocks as the recipe (HiF8/LoRA/SP/FSDP) left them, after the trained weights are in
    maybe_compile(policy.transformer, cfg.policy.compile, device)
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
