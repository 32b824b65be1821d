"""Experiment configuration: typed keyword-only dataclasses, YAML files and dotted ``key=value`` overrides.

Every section is validated when it is built, and every message names the field and says how to fix it. The
resolved configuration is written into each run directory (``config.yaml``) and is what ``--resume`` reads back.

    cfg = load_config("quickstart", ["train.iterations=10", "sampler.eta=0.5"])   # a shipped config, or a path
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from mixgrpo import yaml_load
from policies.wan import WanPolicyConfig
from mixgrpo.results.tracking import TrackingConfig
from rewards.ensemble import RewardSpec  # one spec for configs and the scoring service: name, weight, args, backend


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(kw_only=True)
class PolicyConfig(WanPolicyConfig):
    """Which policy to post-train, and how it runs. The Wan fields (model_dir, component paths, tokenizer_path,
    dtypes, vae_tiling, text_len, video size, layout) are ``policies.wan.WanPolicyConfig``'s own, inherited."""

    _owner: ClassVar[str] = "policy."
    kind: Literal["toy", "wan", "synthetic"] = "toy"
    """``toy``: the embedded toy world (tiny OSP-Next in pixel space); ``wan``: OSP-Next / Wan2.1 from local folders;
    ``synthetic``: an OSP-Next ``preset`` with seeded random weights and stand-in encoders (benchmarks only)."""
    weights: str | None = None
    """toy: a safetensors file of a pretrained toy base (default: the one shipped with the library)."""
    layout: str | list[str] | None = "dual_end"
    """OSP-Next attention layout: ``full``, ``dual_end`` or one kind per block (wan: None keeps the checkpoint's)."""
    num_full_blocks: int | None = 8
    """Full-attention blocks of layout=dual_end, split between both ends (OSP-Next: 8)."""
    sparse_ratio: int | None = 2
    """Skiparse k: sparse blocks attend within k*k subsequences (OSP-Next: 2)."""
    gradient_checkpointing: bool | int | str = False
    """Blocks recomputed in backward: false/none, true/all, full_blocks, sparse_blocks, or N (the first N blocks).

    Checkpoint only as many as memory needs: each recomputed block costs one more forward in the update."""
    quantization: Literal["none", "hif8", "fp8"] = "none"
    """``hif8``: HiF8 fake-quantized transformer; ``fp8``: torchao float8 training linears; rollouts and updates alike."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each transformer block (regional); ``auto``: on CUDA devices only. Compile time is logged."""
    preset: str = "wan2.1-t2v-1.3b"
    """synthetic: the ``OSPNextConfig`` preset whose shapes the random transformer has."""

    def __post_init__(self) -> None:
        _require(self.kind in ("toy", "wan", "synthetic"),
                 f"policy.kind must be 'toy', 'wan' or 'synthetic', got {self.kind!r}")
        _require(self.sparse_ratio is None or self.sparse_ratio >= 1,
                 f"policy.sparse_ratio must be >= 1, got {self.sparse_ratio}")
        _require(self.compile in (True, False, "auto"),
                 f"policy.compile must be auto, true or false, got {self.compile!r}")
        from policies.checkpointing import parse_checkpointing

        try:
            self.gradient_checkpointing = parse_checkpointing(self.gradient_checkpointing)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        try:
            self.check_fields()  # the sources (model_dir, ...) are checked by the preflight of a run that loads them
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclass(kw_only=True)
class PromptConfig:
    """Where training prompts come from."""

    source: str = "toy"
    """``toy`` (the toy world's training captions), a text file with one prompt per line, or a ``.jsonl`` file of
    ``{"prompt": ..., <field>: ...}`` objects whose extra fields reach the rewards (``mixgrpo.driver.prompts``)."""
    eval_source: str | None = None
    """Prompts for the sample videos; default: the toy world's held-out captions, or the training prompts."""



@dataclass(kw_only=True)
class SamplerConfig:
    """The mixed SDE/ODE sampler."""

    num_steps: int = 10
    """Denoising steps of one rollout (the last one, to sigma 0, is always ODE)."""
    shift: float = 1.0
    """Time shift of the sigma schedule (Wan / OSP-Next RL uses 7.5 at 720P)."""
    guidance_scale: float = 2.0
    """Classifier-free guidance scale; 1.0 (or 0) samples without CFG (half the model calls)."""
    eta: float = 0.7
    """SDE noise level (Flow-GRPO sigma_t = eta * sqrt(sigma / (1 - sigma)))."""
    sde_kind: Literal["flow_grpo", "dance_grpo", "osp_next", "cps"] = "flow_grpo"
    """Stochastic step: Flow-GRPO, DanceGRPO (constant noise), OSP-Next release (std = sigma), or CPS."""
    post_window: Literal["euler", "dpm2m"] = "euler"
    """ODE solver after the window: Euler, or DPM-Solver++ 2M (MixGRPO-Flash)."""
    post_window_ratio: float = 1.0
    """Fraction of the post-window steps kept (Flash 0.4, Flash* 0.2); 1.0 keeps all."""

    def __post_init__(self) -> None:
        _require(self.num_steps >= 2, f"sampler.num_steps must be >= 2, got {self.num_steps}")
        _require(self.shift > 0, f"sampler.shift must be > 0, got {self.shift}")
        # At 0 the SDE has no noise and its log-prob divides by zero; above 1 the injected noise outgrows the flow
        # it perturbs (the first step's mean (1 - eta^2/2) x erases x at sqrt 2) and rollouts diverge (eta=5 or 1e6
        # end far outside the data range). The peers use 0.3 (DanceGRPO) to 1.0 (OSP-Next).
        _require(0 < self.eta <= 1, f"sampler.eta must be in (0, 1] (Flow-GRPO 0.7, DanceGRPO 0.3, OSP-Next 1.0), "
                 f"got {self.eta}")
        _require(self.guidance_scale >= 0, f"sampler.guidance_scale must be >= 0 (1.0 or 0 disables CFG), got {self.guidance_scale}")
        _require(0 < self.post_window_ratio <= 1, f"sampler.post_window_ratio must be in (0, 1], got {self.post_window_ratio}")

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on: the rollouts and the learner pass the negative prompt's states."""
        return self.guidance_scale not in (0.0, 1.0)


@dataclass(kw_only=True)
class WindowConfig:
    """Which denoising steps are SDE (and trained) at each iteration."""

    kind: Literal["progressive", "frozen", "random", "decay", "exp_decay"] = "progressive"
    """How the window moves: progressive (MixGRPO), frozen (fixed at start), random, decay or exp_decay."""
    size: int = 4
    """Window size w: SDE steps per rollout. Set it to sampler.num_steps for DanceGRPO-style SDE everywhere."""
    start: int = 0
    """First SDE step of the window (frozen: where it stays)."""
    shift_interval: int = 25
    """tau: iterations between window moves (progressive)."""
    stride: int = 1
    """s: steps the window moves each time (progressive); >= 1 (window.kind=frozen keeps it in place)."""
    roll_back: bool = True
    """progressive: restart at step 0 after reaching the last step."""
    max_shift_interval: int = 10
    """decay: tau at the first window position."""
    min_shift_interval: int = 1
    """decay: tau at the last window position."""
    decay_rate: float = 0.1
    """exp_decay: k in tau(l) = ceil(tau0 * exp(-k * relu(l - threshold)))."""
    decay_threshold: int = 13
    """exp_decay: the window position after which the interval starts to shrink."""
    train_fraction: float = 1.0
    """Fraction of the window's steps trained (DanceGRPO trains a random 60% of all steps)."""

    def __post_init__(self) -> None:
        _require(self.size >= 1, f"window.size must be >= 1, got {self.size}")
        _require(self.start >= 0, f"window.start must be >= 0, got {self.start}")
        _require(self.shift_interval >= 1, f"window.shift_interval must be >= 1, got {self.shift_interval}")
        _require(0 < self.train_fraction <= 1, f"window.train_fraction must be in (0, 1], got {self.train_fraction}")
        _require(self.stride >= 1, f"window.stride must be >= 1 (steps per move); for a window that stays put use window.kind=frozen, got {self.stride}")
        _require(1 <= self.min_shift_interval <= self.max_shift_interval,
                 f"window.min_shift_interval ({self.min_shift_interval}) must be in [1, window.max_shift_interval="
                 f"{self.max_shift_interval}]")
        _require(self.decay_rate >= 0, f"window.decay_rate must be >= 0, got {self.decay_rate}")
        _require(self.decay_threshold >= 0, f"window.decay_threshold must be >= 0, got {self.decay_threshold}")


@dataclass(kw_only=True)
class AdvantageConfig:
    """Group-relative advantages from the rewards."""

    std: Literal["group", "global"] = "group"
    """Normalise by the std of each prompt group (MixGRPO, DanceGRPO) or of the whole batch (Flow-GRPO)."""
    aggregation: Literal["advantage", "reward"] = "advantage"
    """Combine rewards after (``advantage``) or before (``reward``) normalisation."""
    clip: float = 5.0
    """Advantages are clipped to [-clip, clip]."""
    eps: float = 1e-4
    """Added to the standard deviation before dividing (a group of equal rewards gets advantage 0)."""

    def __post_init__(self) -> None:
        _require(self.clip > 0, f"advantages.clip must be > 0, got {self.clip}")
        # A negative eps can make the std denominator negative, which flips every advantage: training runs backwards.
        _require(self.eps > 0, f"advantages.eps must be > 0 (it keeps the std denominator positive), got {self.eps}")


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters (peft) instead of full fine-tuning."""

    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    rank: int = 32
    """LoRA rank r."""
    alpha: float = 64.0
    """LoRA alpha (the adapter is scaled by alpha / r)."""
    targets: list[str] = field(default_factory=lambda: ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                         "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"])
    """Module names (suffixes) that get adapters."""

    def __post_init__(self) -> None:
        _require(self.rank >= 1, f"learner.lora.rank must be >= 1, got {self.rank}")
        _require(self.alpha > 0, f"learner.lora.alpha must be > 0, got {self.alpha}")
        _require(bool(self.targets), "learner.lora.targets is empty; name the modules that get adapters, e.g. "
                 "[self_attn.q, self_attn.k, self_attn.v, self_attn.o]")


@dataclass(kw_only=True)
class LearnerConfig:
    """The update: optimizer, clipped objective, KL, EMA, precision, sharding and LoRA."""

    lr: float = 3e-4
    """AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Gradients are clipped to this total norm before every optimizer step."""
    optimizer_steps: int = 2
    """Optimizer steps per rollout batch (the batch is split into this many minibatches)."""
    micro_batch_size: int = 8
    """Samples per forward/backward pass while recomputing log-probs."""
    clip_range: float = 1e-3
    """PPO clip range of the probability ratio (Flow-GRPO / OSP-Next use 1e-4 .. 1e-3)."""
    kl_coeff: float = 0.0
    """Weight of the KL penalty to the reference policy (0: no KL term)."""
    kl_reference: Literal["lora_disabled", "frozen_copy"] = "lora_disabled"
    """The KL reference: the model with its LoRA adapters switched off, or a frozen copy of the base."""
    ema_decay: float = 0.0
    """0 disables the EMA of trainable weights."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype of the update's forward and backward (with learner.sharding=fsdp: FSDP's compute dtype)."""
    sharding: Literal["none", "fsdp"] = "none"
    """``fsdp``: parameters, gradients and Adam state sharded over every rank (FSDP2), for full fine-tuning of
    models whose weights and optimizer state do not fit one GPU; ``none``: every rank holds a full copy."""
    reuse_rollout_uncond: bool = False
    """Keep each SDE step's CFG uncond velocity from the rollout and reuse it at the first optimizer step instead
    of a second forward (the weights are still the sampling ones there; exact up to fp32 round-off). Off by
    default: it holds one latent-sized tensor per SDE step per sample until the update, and it is exact only when
    the rollout and the update compute the uncond branch alike (same dtype/autocast, no dropout)."""
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _build(LoraConfig, self.lora, "learner.lora")
        _require(isinstance(self.reuse_rollout_uncond, bool),
                 f"learner.reuse_rollout_uncond must be true or false, got {self.reuse_rollout_uncond!r}")
        self.betas = tuple(self.betas)  # YAML gives lists
        _require(self.lr > 0, f"learner.lr must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"learner.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {list(self.betas)}")
        _require(self.weight_decay >= 0, f"learner.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.adam_eps > 0, f"learner.adam_eps must be > 0, got {self.adam_eps}")
        # A negative max norm makes clip_grad_norm_ scale gradients by a negative factor: the update runs backwards.
        _require(self.grad_clip > 0, f"learner.grad_clip must be > 0 (the max gradient norm), got {self.grad_clip}")
        _require(self.optimizer_steps >= 1, f"learner.optimizer_steps must be >= 1, got {self.optimizer_steps}")
        _require(self.micro_batch_size >= 1, f"learner.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _require(self.clip_range > 0, f"learner.clip_range must be > 0, got {self.clip_range}")
        _require(self.kl_coeff >= 0, f"learner.kl_coeff must be >= 0, got {self.kl_coeff}")
        _require(0 <= self.ema_decay < 1, f"learner.ema_decay must be in [0, 1), got {self.ema_decay}")
        _require(self.kl_coeff == 0 or self.kl_reference != "lora_disabled" or self.lora.enabled,
                 "learner.kl_reference=lora_disabled needs learner.lora.enabled=true; "
                 "set learner.kl_reference=frozen_copy to use a frozen copy of the base instead")


@dataclass(kw_only=True)
class RolloutConfig:
    """Where and how rollouts are sampled (and, on Ray, where the update runs)."""

    backend: Literal["local", "ray"] = "local"
    """local: sample and learn in this process; ray: on worker groups of a Ray cluster (docs/ray.md)."""
    num_workers: int = 1
    """ray: worker groups; each samples and trains on its share of the prompt groups."""
    sp_size: int = 1
    """ray: GPUs per worker group, sharding each video (SSP x Ulysses); they must be on one node."""
    prompts_per_iteration: int = 4
    """Prompt groups sampled each iteration."""
    group_size: int = 4
    """Videos per prompt (the GRPO group); they share their initial noise."""
    batch_size: int = 16
    """Videos sampled together in one batched forward."""
    timeout_s: float = 1800.0
    """ray: a worker group that makes no progress for this long is treated as dead (torn down and restarted)."""
    recovery: Literal["auto", "snapshot", "stop"] = "auto"
    """ray, after a rank dies or hangs: ``snapshot`` restarts every group from a copy of the learner state taken at the
    start of each iteration (kept in Ray's object store; costs one device-to-host copy of the trainable state per
    iteration) and redoes the iteration; ``stop`` ends the run with an error (resume it with --resume from the last
    checkpoint); ``auto``: ``snapshot`` unless learner.sharding=fsdp, whose full optimizer state is too large to copy
    every iteration."""

    def __post_init__(self) -> None:
        _require(self.group_size >= 2, f"rollout.group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        _require(self.prompts_per_iteration >= 1, f"rollout.prompts_per_iteration must be >= 1, got {self.prompts_per_iteration}")
        _require(self.num_workers >= 1, f"rollout.num_workers must be >= 1, got {self.num_workers}")
        _require(self.sp_size >= 1, f"rollout.sp_size must be >= 1, got {self.sp_size}")
        _require(self.batch_size >= 1, f"rollout.batch_size must be >= 1, got {self.batch_size}")
        _require(math.isfinite(self.timeout_s) and self.timeout_s > 0,
                 f"rollout.timeout_s must be a number of seconds > 0, got {self.timeout_s}")


@dataclass(kw_only=True)
class TrainConfig:
    """The run: length, seed, device, checkpoints, videos and failure handling."""

    iterations: int = 40
    """Iterations (rollout, score, update) of the run."""
    seed: int = 0
    """Seed of every random draw of the run (prompts, noise, minibatches)."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    checkpoint_every: int = 10
    """Write a checkpoint every N iterations (and after the last)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints."""
    video_every: int = 0
    """Write sample mp4s every N iterations (0: only at the start and the end)."""
    num_videos: int = 4
    """Held-out prompts sampled as mp4s and a contact sheet at the start and the end."""
    on_reward_error: Literal["raise", "drop"] = "raise"
    """A reward that fails: raise (stop the run) or drop the groups of the failed samples."""
    reward_timeout_s: float = 600.0
    """Seconds each reward call may take (0: no limit); a slower call is a reward failure, handled by
    ``on_reward_error``."""
    max_failed_iterations: int = 3
    """Stop the run with an error after this many iterations in a row in which no group could be trained."""
    sample_videos_per_iteration: int = 2
    """Training samples written as mp4 each iteration (the first member of the first groups), linked from
    samples.parquet's video_path; 0 writes none."""

    def __post_init__(self) -> None:
        _require(self.iterations >= 1, f"train.iterations must be >= 1, got {self.iterations}")
        _require(self.seed >= 0, f"train.seed must be >= 0 (seeds of torch and numpy are unsigned), got {self.seed}")
        _require(self.threads >= 0, f"train.threads must be >= 0 (0: torch's default), got {self.threads}")
        _require(self.num_videos >= 0, f"train.num_videos must be >= 0, got {self.num_videos}")
        _require(_is_device(self.device), f"train.device {self.device!r} is not a device; use auto, cpu, cuda or "
                 "cuda:N")
        _require(self.sample_videos_per_iteration >= 0,
                 f"train.sample_videos_per_iteration must be >= 0, got {self.sample_videos_per_iteration}")
        _require(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _require(self.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _require(self.video_every >= 0, f"train.video_every must be >= 0, got {self.video_every}")
        _require(math.isfinite(self.reward_timeout_s) and self.reward_timeout_s >= 0,
                 f"train.reward_timeout_s must be >= 0 seconds (0: no limit), got {self.reward_timeout_s}")
        _require(self.max_failed_iterations >= 1,
                 f"train.max_failed_iterations must be >= 1, got {self.max_failed_iterations}")


@dataclass(kw_only=True)
class EvalConfig:
    """Scored evaluation: deterministic ODE samples of the current policy (its EMA when it keeps one) on a fixed
    prompt set, scored by the run's rewards, written to eval.parquet and as eval/... columns of metrics.parquet."""

    every: int = 0
    """Evaluate after every N iterations (and after the last); 0 turns evaluation off."""
    prompts: str = "toy"
    """``toy`` (the toy world's held-out captions) or a prompt file (text or .jsonl)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Initial-noise seeds: every prompt is sampled once per seed (one eval.parquet row per prompt x seed)."""
    max_prompts: int = 0
    """Use only the first N prompts of the set (0: all)."""

    def __post_init__(self) -> None:
        self.seeds = list(self.seeds)
        _require(self.every >= 0, f"eval.every must be >= 0 iterations (0: off), got {self.every}")
        _require(bool(self.seeds) and all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds),
                 f"eval.seeds must be a non-empty list of integers, e.g. [0, 1]; got {self.seeds!r}")
        _require(self.max_prompts >= 0, f"eval.max_prompts must be >= 0 (0: all), got {self.max_prompts}")


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str = "experiment"
    """The run's name: its default run directory is runs/<name>."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="toy_fidelity")])
    """The rewards and their weights (each a RewardSpec: name, weight, args, backend)."""
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # The name is a folder under runs/: one path component, no way out of it.
        _require(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)) and ".." not in self.name,
                 f"name {self.name!r} must be letters, digits, '.', '_' or '-' (it names the folder runs/<name>); "
                 "use --run-dir for another place")
        _require(len(self.rewards) >= 1, "rewards: give at least one reward, e.g. rewards=[{name: toy_fidelity}]")
        names = [r.name for r in self.rewards]
        _require(len(set(names)) == len(names), f"rewards: names must be unique, got {names}")
        _require(sum(r.weight for r in self.rewards) > 0, f"rewards: weights must sum to > 0, got {[r.weight for r in self.rewards]}")
        # The last sampler step lands on sigma = 0, where the SDE has no noise: windows cover steps 0..num_steps-2.
        coverable = self.sampler.num_steps - 1
        _require(self.window.size <= coverable,
                 f"window.size ({self.window.size}) must be <= sampler.num_steps - 1 ({coverable}); the final step "
                 "is always an ODE step. Lower window.size or raise sampler.num_steps")
        _require(self.window.start + self.window.size <= coverable,
                 f"window.start + window.size ({self.window.start + self.window.size}) must be <= sampler.num_steps - 1 "
                 f"({coverable}); lower window.start")
        _require(not (self.eval.every and self.eval.prompts == "toy" and self.policy.kind != "toy"),
                 "eval.prompts=toy is the toy world's held-out captions; give a prompt file for this policy, or set "
                 "eval.every=0")
        if self.policy.quantization == "hif8":
            _require(self.learner.mixed_precision != "fp16", "policy.quantization=hif8 runs in bf16 or fp32; set learner.mixed_precision=bf16 or no")
        rollout = self.rollout
        if rollout.backend == "ray":
            _require(rollout.prompts_per_iteration >= rollout.num_workers,
                     f"rollout.prompts_per_iteration ({rollout.prompts_per_iteration}) must be >= rollout.num_workers "
                     f"({rollout.num_workers}): every worker group samples and trains on its own prompt groups")
        if self.learner.sharding == "fsdp":
            _require(rollout.backend == "ray" and rollout.num_workers * rollout.sp_size > 1,
                     "learner.sharding=fsdp shards over the ranks of the Ray worker groups; set rollout.backend=ray "
                     "with rollout.num_workers x rollout.sp_size > 1, or learner.sharding=none on one device")
            _require(rollout.prompts_per_iteration % rollout.num_workers == 0,
                     f"learner.sharding=fsdp runs every forward in lockstep over all worker groups: "
                     f"rollout.prompts_per_iteration ({rollout.prompts_per_iteration}) must be a multiple of "
                     f"rollout.num_workers ({rollout.num_workers})")
            _require(not self.learner.lora.enabled, "learner.sharding=fsdp is for full fine-tuning; with "
                     "learner.lora.enabled=true keep learner.sharding=none (the frozen base is replicated)")

    @property
    def samples_per_iteration(self) -> int:
        return self.rollout.prompts_per_iteration * self.rollout.group_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- building dataclasses from plain dicts, with helpful errors ----

def _is_device(name: str) -> bool:
    import torch

    if name == "auto":
        return True
    try:
        return torch.device(name).type in ("cpu", "cuda")
    except (RuntimeError, TypeError, ValueError):
        return False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        _require(isinstance(value, dict), f"{where} must be a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, where)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        _require(isinstance(value, list), f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        _require(value in args, f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if annotation in (int, float) and isinstance(value, str):
        # PyYAML reads "1e-4" (no dot) as a string; accept any number spelled as text.
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float):
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} must be a number, got {value!r}")
        _require(math.isfinite(value), f"{where} must be a finite number, got {value!r}")
    if annotation is int:
        _require(float(value).is_integer(), f"{where} must be an integer, got {value!r}")
        return int(value)
    if annotation is bool:
        _require(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    types = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    _require(isinstance(values, dict), f"{where or 'the config'} must be a mapping, got {values!r}")
    for key, value in values.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            fix = f"did you mean {_join(where, hint[0])}?" if hint else f"valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {_join(where, key)}; {fix}")
        kwargs[key] = _coerce(value, types[key], _join(where, key))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # e.g. RewardSpec, which lives in rewards/ and raises ValueError
        raise ConfigError(f"{where or 'config'}: {error}") from None


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    return _build(ExperimentConfig, values, "")


def _split_override(item: str) -> tuple[list[str], str]:
    key, sep, raw = item.partition("=")
    _require(bool(sep) and bool(key.strip()), f"override {item!r} must look like section.key=value, e.g. "
             "train.iterations=10")
    return key.strip().split("."), raw


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.iterations=10", "rewards=[{name: toy_fidelity}]"]`` -> nested dict, each value typed by its field
    (see :func:`apply_overrides`, which also takes list indices such as ``rewards.0.weight=2``)."""
    return apply_overrides({}, overrides, fill_defaults=False)


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...], *,
                    fill_defaults: bool = True) -> dict[str, Any]:
    """``values`` (a config as plain data, e.g. a YAML file's) with dotted ``key=value`` overrides applied in place.

    A value is read by the type of the field it sets, not by YAML 1.1 alone: ``learner.mixed_precision=no`` stays
    the string ``"no"`` (YAML would read False), ``policy.gradient_checkpointing=on`` is True, lists, mappings and
    numbers are YAML. A list item is addressed by its index: ``rewards.0.weight=2``, ``learner.lora.targets.1=x``.
    ``fill_defaults``: a section or list the values do not hold yet starts from its default (so ``rewards.0.weight``
    works without a ``rewards:`` in the file).
    """
    for item in overrides:
        keys, raw = _split_override(item)
        node: Any = values
        annotation: Any = ExperimentConfig
        for depth, key in enumerate(keys):
            where = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if isinstance(node, list):
                _require(key.lstrip("-").isdigit(), f"override {item}: {'.'.join(keys[:depth])} is a list; address "
                         f"an item by its index, e.g. {'.'.join(keys[:depth])}.0")
                index = int(key)
                _require(0 <= index < len(node), f"override {item}: {'.'.join(keys[:depth])} has {len(node)} items "
                         f"(indices 0..{len(node) - 1}); give the whole list instead, e.g. {keys[0]}=[...]")
                child_type = _item_type(annotation)
                if last:
                    node[index] = _typed_value(raw, child_type, where)
                else:
                    node, annotation = node[index], child_type
                continue
            _require(isinstance(node, dict), f"override {item}: {'.'.join(keys[:depth])} is not a section")
            child_type = _child_type(annotation, key, where)
            if last:
                node[key] = _typed_value(raw, child_type, where)
            else:
                if key not in node:
                    node[key] = _default_plain(annotation, key) if fill_defaults else {}
                    if node[key] is None or not isinstance(node[key], (dict, list)):
                        node[key] = {}
                node, annotation = node[key], child_type
    return values


def _child_type(annotation: Any, key: str, where: str) -> Any:
    if dataclasses.is_dataclass(annotation):
        types = _field_types(annotation)
        if key not in types:
            known = [f.name for f in dataclasses.fields(annotation)]
            hint = difflib.get_close_matches(key, known, n=1)
            parent = where.rpartition(".")[0]
            raise ConfigError(f"unknown config key {where}; " + (f"did you mean {_join(parent, hint[0])}?" if hint
                              else f"valid keys: {', '.join(known)}"))
        return types[key]
    return Any  # inside a free-form mapping such as a reward's args


def _item_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if typing.get_origin(a) is list or a is list]
    target = args[0] if args else annotation
    inner = typing.get_args(target)
    return inner[0] if inner else Any


def _default_plain(annotation: Any, key: str) -> Any:
    """The default of field ``key`` of dataclass ``annotation`` as plain data (dicts and lists)."""
    if not dataclasses.is_dataclass(annotation):
        return {}
    for f in dataclasses.fields(annotation):
        if f.name == key:
            if f.default_factory is not dataclasses.MISSING:
                return _plain(_as_data(f.default_factory()))
            if f.default is not dataclasses.MISSING:
                return _plain(_as_data(f.default))
    return {}


def _as_data(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_as_data(v) for v in value]
    return value


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _typed_value(raw: str, annotation: Any, where: str) -> Any:
    """``raw`` read as the field's type wants it (see :func:`apply_overrides`)."""
    text = raw.strip()
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if type(None) in options and text in ("null", "~", "None"):
        return None
    if bool in options and text.lower() in _BOOLS:
        return _BOOLS[text.lower()]
    stringly = [o for o in options if o is str or (typing.get_origin(o) is Literal and
                                                    all(isinstance(a, str) for a in typing.get_args(o)))]
    if stringly and not text.startswith(("[", "{")):
        return text  # a string field keeps the text as typed: no, on, off, 1e-4 ... stay strings
    if not text:
        return ""
    try:
        value = yaml_load.safe_load(text, source=f"override {where}", error=ConfigError)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {where}={raw}: not a valid value ({str(error).splitlines()[0]}); quote it or fix "
                          "the brackets") from None
    if isinstance(value, str) and _NUMBER.fullmatch(text):
        return float(text)  # YAML 1.1 reads 1e-4 (no dot) as a string; a field of any type means the number
    return value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The experiment configs shipped inside the package (``mixgrpo train NAME``)."""


def shipped_configs() -> list[str]:
    """Names of the shipped configs (``quickstart``, ``osp_next_14b_videoalign``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` itself when it is a file, else the shipped config of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a shipped config; shipped configs: "
                      f"{', '.join(shipped_configs())} (or give a path to a YAML file)")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The config file or shipped config ``path`` (None: defaults only) with dotted ``key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)
        try:
            loaded = yaml_load.load_file(path, error=ConfigError) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {str(path)!r} is not valid YAML ({getattr(error, 'problem', error)} "
                              f"at{where}); fix the file or print a valid one with `mixgrpo config`") from None
        _require(isinstance(loaded, dict), f"config file {str(path)!r} must hold a mapping at the top level")
        values = loaded
    return config_from_dict(apply_overrides(values, list(overrides)))


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
