"""Flow-matching pretraining of the toy policy on procedurally rendered videos.

Shape legend: B = videos, C = RGB, T = frames, H, W = pixels, L = text tokens, D = text width.

Objective as in OSP-Next's SFT (rectified flow): ``x_sigma = sigma * noise + (1 - sigma) * x0``, the model
predicts ``v = noise - x0``, plain MSE; sigma is logit-normal (``sigmoid(N(0, 1))``, no resolution shift: the
toy latents are tiny) and 10% of captions are dropped to the empty prompt so CFG works. The text encoder is
trained jointly here and frozen afterwards (``Policy`` freezes it).

The base should follow prompts only partly, leaving room for RL. Two settings do that. The step count is short.
The captions are noisy the way web captions are: 60% of them are shown with a random colour word
(``colour_noise``). The shipped base therefore draws shapes that move, though not reliably, and often in the
wrong or a blended colour. Colour binding is what the quickstart's Mix-GRPO run visibly fixes within minutes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from policies.base import Policy
from policies.toy.policy import ToyPolicyConfig, cache_dir, make_toy_policy, save_toy_policy
from policies.toy.world import COLOURS, Scene, parse_caption, render_videos, train_prompts


@dataclass(kw_only=True)
class ToyPretrainConfig:
    """Optimisation settings of ``pretrain_toy``."""

    steps: int = 1200
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    """Linear warm-up, then constant: a run of N steps is a prefix of any longer run (same seed)."""
    ema_decay: float = 0.99
    """The saved weights are an exponential moving average of the iterates: fewer speckles in samples."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    colour_noise: float = 0.6
    """Fraction of shown captions whose colour word is replaced by a uniformly drawn colour (it may draw the
    true one). Web captions are noisy in the same way; the base then binds colour words only partly, which is
    the kind of prompt-following error RL with a fidelity reward is used to fix."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ToyPretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"ToyPretrainConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError("ToyPretrainConfig: warmup_steps and weight_decay must be >= 0 and grad_clip > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ToyPretrainConfig.ema_decay must be in [0, 1) (0 = no averaging), got {self.ema_decay}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"ToyPretrainConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.colour_noise <= 1.0:
            raise ValueError(f"ToyPretrainConfig.colour_noise must be in [0, 1], got {self.colour_noise}")


def learning_rate(step: int, cfg: ToyPretrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))


def flow_matching_loss(
    policy: Policy, latents_BCTHW: torch.Tensor, text_states_BLD: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Rectified-flow MSE at logit-normal sigmas (gradients reach the transformer and the text states)."""
    b = latents_BCTHW.shape[0]
    sigma_B = torch.sigmoid(torch.randn(b, generator=generator))
    noise = torch.randn(latents_BCTHW.shape, generator=generator)
    s = sigma_B.view(b, 1, 1, 1, 1)
    noisy = s * noise + (1 - s) * latents_BCTHW
    v_pred = policy.velocity(noisy, sigma_B, text_states_BLD)
    return (v_pred.float() - (noise - latents_BCTHW)).square().mean()


def draw_batch(
    prompts: Sequence[str],
    batch_size: int,
    caption_dropout: float,
    generator: torch.Generator,
    colour_noise: float = 0.0,
) -> tuple[list[str], list[str], list[int]]:
    """Random captions, the text actually shown (dropped ones -> "", noisy ones with a random colour word), and
    render seeds. The videos are always rendered from the true captions."""
    idx = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
    captions = [prompts[i] for i in idx]
    drop = (torch.rand(batch_size, generator=generator) < caption_dropout).tolist()
    shown = ["" if d else c for c, d in zip(captions, drop)]
    if colour_noise > 0:
        # Drawn only when enabled, so runs without noise keep the exact random stream of earlier versions.
        noisy = (torch.rand(batch_size, generator=generator) < colour_noise).tolist()
        colours = torch.randint(len(COLOURS), (batch_size,), generator=generator).tolist()
        shown = [recolour(text, list(COLOURS)[c]) if n and text else text for text, n, c in zip(shown, noisy, colours)]
    seeds = torch.randint(2**31 - 1, (batch_size,), generator=generator).tolist()
    return captions, shown, seeds


def recolour(caption: str, colour: str) -> str:
    """``caption`` with its colour word replaced by ``colour``."""
    scene = parse_caption(caption)
    return Scene(colour=colour, shape=scene.shape, direction=scene.direction).caption


def pretrain_policy(policy: Policy, cfg: ToyPretrainConfig, *, progress: bool = True) -> list[float]:
    """Train ``policy`` (transformer + text encoder) in place, ending on the EMA weights; returns step losses."""
    spec = policy.spec
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts = train_prompts()
    policy.transformer.train()
    policy.text_encoder.requires_grad_(True).train()
    params = [p for p in policy.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="toy pretrain", disable=None if progress else True)  # None: off in logs (no tty)
    for step in bar:
        captions, shown, seeds = draw_batch(prompts, cfg.batch_size, cfg.caption_dropout, generator, cfg.colour_noise)
        videos = render_videos(captions, seeds, num_frames=spec.num_frames, height=spec.height, width=spec.width)
        loss = flow_matching_loss(policy, policy.vae.encode(videos), policy.text_encoder(shown), generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for avg, p in zip(ema, params):
                avg.lerp_(p, 1.0 - cfg.ema_decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    with torch.no_grad():
        for p, avg in zip(params, ema):
            p.copy_(avg)
    policy.text_encoder.requires_grad_(False).eval()
    policy.transformer.eval()
    return losses


def pretrain_toy(
    *,
    out_path: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float | None = None,
    colour_noise: float | None = None,
    progress: bool = True,
    config: ToyPolicyConfig | None = None,
) -> Path:
    """Pretrain a toy base policy from scratch and save it; returns the safetensors path.

    Args:
        out_path: where to write (default: ``~/.cache/mixgrpo/toy_policy.safetensors``).
        steps, batch_size, lr, colour_noise: override ``ToyPretrainConfig``'s defaults.
        seed: seeds the initialisation, the data and the noise: same seed -> same weights.
        config: model/video sizes (default ``ToyPolicyConfig()``, the shipped architecture).
    """
    defaults = ToyPretrainConfig()
    cfg = ToyPretrainConfig(
        steps=defaults.steps if steps is None else steps,
        batch_size=defaults.batch_size if batch_size is None else batch_size,
        lr=defaults.lr if lr is None else lr,
        colour_noise=defaults.colour_noise if colour_noise is None else colour_noise,
        seed=seed,
    )
    out = Path(out_path) if out_path is not None else cache_dir() / "toy_policy.safetensors"
    policy = make_toy_policy(config, seed=seed)
    start = time.perf_counter()
    losses = pretrain_policy(policy, cfg, progress=progress)
    info = {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "ema_decay": cfg.ema_decay,
        "colour_noise": cfg.colour_noise,
        "seed": cfg.seed,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    return save_toy_policy(policy, out, pretrain=info)


@torch.no_grad()
def sample_euler(
    policy: Policy,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    num_steps: int = 12,
    guidance_scale: float = 2.0,
) -> torch.Tensor:
    """Deterministic Euler ODE sampling from sigma = 1 to 0 with CFG; returns videos_BTCHW in [0, 1].

    A reference sampler for evaluating toy bases (the RL sampler lives in ``mixgrpo``). Each video's initial
    noise depends only on its seed, so results do not depend on batch composition.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_euler got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed per prompt")
    shape = policy.latent_shape()
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    cond = policy.encode_text(prompts)
    uncond = policy.encode_text([policy.negative_prompt] * len(prompts))
    text = torch.cat([cond, uncond]) if guidance_scale != 1.0 else cond
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if guidance_scale != 1.0:
            v_cond, v_uncond = policy.velocity(torch.cat([x, x]), sigma.repeat(2 * len(x)), text).chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            v = policy.velocity(x, sigma.repeat(len(x)), text)
        x = x + (sigma_next - sigma) * v
    return policy.decode(x)
