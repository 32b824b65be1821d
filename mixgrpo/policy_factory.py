"""From the experiment config to a policy and prompt lists (the only place mixgrpo names concrete policies)."""

from __future__ import annotations

from pathlib import Path

from mixgrpo.config import PolicyConfig, PromptConfig
from policies.base import Policy


def build_policy(cfg: PolicyConfig, *, quantization: str = "none", device: str | None = None) -> Policy:
    """The policy the config asks for, with HiF8 fake quantization applied to its transformer if requested.

    Quantization is applied to the one transformer that rollouts and the learner share, so both see the same
    numerics and the first-step probability ratio stays 1.
    """
    if cfg.kind == "toy":
        from policies.toy import build_toy_policy

        policy = build_toy_policy(weights=cfg.weights)
    elif cfg.kind == "synthetic":
        import torch
        from policies.synthetic import build_synthetic_policy

        policy = build_synthetic_policy(preset=cfg.preset, num_frames=cfg.num_frames, height=cfg.height,
                                        width=cfg.width, layout=cfg.layout, num_full_blocks=cfg.num_full_blocks,
                                        sparse_ratio=cfg.sparse_ratio, dtype=getattr(torch, cfg.dtype),
                                        device=device or "cpu")
    else:
        from policies.wan import WanPolicyConfig, build_wan_policy

        policy = build_wan_policy(WanPolicyConfig(
            model_dir=cfg.model_dir, transformer_path=cfg.transformer_path, text_encoder_path=cfg.text_encoder_path,
            vae_path=cfg.vae_path, num_frames=cfg.num_frames, height=cfg.height, width=cfg.width, layout=cfg.layout,
            num_full_blocks=cfg.num_full_blocks, sparse_ratio=cfg.sparse_ratio, dtype=cfg.dtype,
            device=device or "cpu"))
    if cfg.gradient_checkpointing:
        policy.transformer.gradient_checkpointing = True
    if quantization == "hif8":
        from policies.quant import apply_hif8

        apply_hif8(policy.transformer)
    return policy


def read_prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts: no such prompt file {str(path)!r}; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts: {str(path)!r} holds no prompts; write one prompt per line")
    return prompts


def load_prompts(cfg: PromptConfig, *, eval: bool = False) -> list[str]:
    source = cfg.eval_source if eval and cfg.eval_source else cfg.source
    if source == "toy":
        from policies.toy import world

        return world.eval_prompts() if eval else world.train_prompts()
    return read_prompt_file(source)
