"""The Mix-GRPO loop: rollout -> score -> advantages -> update -> sync -> log -> checkpoint.

``train(cfg, run_dir=..., resume=...)`` is what ``mixgrpo train`` runs. Construction (policy, rewards, learner,
rollout engine, run log) lives in ``Trainer.__init__``; ``Trainer.run`` is the loop and fits on one screen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
import warnings
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from mixgrpo.advantages import compute_advantages
from mixgrpo.checkpoint import load_latest_checkpoint, save_checkpoint
from mixgrpo.config import ConfigError, ExperimentConfig, dump_config
from mixgrpo.learner import Learner, UpdateBatch, apply_lora
from mixgrpo.rollout import LocalRolloutEngine, RolloutRequest, RolloutResult, group_seed, text_states
from mixgrpo.runlog import RunLog
from mixgrpo.window import build_window_scheduler
from mixgrpo import media
from mixgrpo.policy_factory import build_policy, load_prompts
from rewards.ensemble import RewardSet, ScoreTable


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(cfg: ExperimentConfig, run_dir: Path) -> None:
    """A resumed run must use the config it was started with (only ``train.iterations`` may grow): otherwise the
    run directory would mix two experiments and its config.yaml would no longer describe its metrics."""
    written = run_dir / "config.yaml"
    if not written.is_file():
        return
    before = _flatten(yaml.safe_load(written.read_text()) or {})
    now = _flatten(yaml.safe_load(dump_config(cfg)))
    changed = sorted(k for k in before.keys() | now.keys() if k != "train.iterations" and before.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"--resume with a config that differs from the run's {written}: {shown}"
                          f"{' ...' if len(changed) > 5 else ''}. Resume without CONFIG or overrides (the run's own "
                          "config is used), change only train.iterations, or start a new --run-dir")


class PromptSampler:
    """Stateless prompt draws: iteration i always gets the same prompts (an epoch-wise shuffle of the list), so a
    resumed run sees exactly the prompts an uninterrupted one would."""

    def __init__(self, prompts: list[str], seed: int) -> None:
        if not prompts:
            raise ValueError("prompts: the prompt source is empty; give a file with one prompt per line")
        self.prompts, self.seed = list(prompts), seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        """The shuffle of one epoch, computed once (large prompt files make it the costly part)."""
        if epoch not in self._orders:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            self._orders = {epoch: order}  # draws move forward epoch by epoch: keep just the current one
        return self._orders[epoch]

    def draw(self, iteration: int, count: int) -> list[str]:
        out = []
        for index in range(iteration * count, (iteration + 1) * count):
            epoch, position = divmod(index, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[position]])
        return out


class Trainer:
    def __init__(self, cfg: ExperimentConfig, *, run_dir: Path, resume: bool = False) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if resume:
            check_resume_config(cfg, self.run_dir)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.policy = build_policy(cfg.policy, quantization=cfg.learner.quantization, device=str(self.device)).to(self.device)
        if cfg.learner.lora.enabled:
            apply_lora(self.policy.transformer, rank=cfg.learner.lora.rank, alpha=cfg.learner.lora.alpha,
                       targets=cfg.learner.lora.targets)
        self.learner = Learner(self.policy.transformer, cfg.learner, cfg.sampler, autocast=self._autocast)
        self.log = RunLog(self.run_dir, resume=resume)
        self.engine = self._build_engine()
        self.rewards = RewardSet([dataclasses.asdict(r) for r in cfg.rewards], on_error=cfg.train.on_reward_error,
                                 device=str(self.device))
        # The final step lands on sigma = 0 where the SDE's std vanishes: never sample or train it (as Flow-GRPO).
        self.window = build_window_scheduler(**dataclasses.asdict(cfg.window), num_steps=cfg.sampler.num_steps - 1,
                                             seed=cfg.train.seed)
        self.prompts = PromptSampler(load_prompts(cfg.prompts), cfg.train.seed)
        self.eval_prompts = load_prompts(cfg.prompts, eval=True)[: cfg.train.num_videos]
        self.start_iteration = self._restore() if resume else 0
        self.log.write_config(cfg.to_dict())

    def _build_engine(self):
        if self.cfg.rollout.backend == "ray":
            from mixgrpo.ray_rollout import RayRolloutEngine

            return RayRolloutEngine(self.cfg, self.policy, device=self.device, on_event=self.log.event)
        return LocalRolloutEngine(self.policy, self.cfg.sampler, device=self.device,
                                  batch_groups=max(1, self.cfg.rollout.batch_size // self.cfg.rollout.group_size))

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.learner.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- the loop ----

    def run(self) -> Path:
        cfg = self.cfg
        bar = tqdm(range(self.start_iteration, cfg.train.iterations), desc="mix-grpo", unit="it",
                   initial=self.start_iteration, total=cfg.train.iterations)
        if self.start_iteration == 0:
            self.write_videos("start")
        for iteration in bar:
            tick = time.perf_counter()
            rollouts = self.engine.rollout(self.request(iteration))
            scores, reward_seconds = self.score(rollouts)
            advantages, keep, adv_stats = self.advantages(rollouts, scores)
            update_start = time.perf_counter()
            batch = self.update_batch(rollouts, advantages, keep)
            stats = self.learner.update(batch, generator=self.update_generator(iteration))
            self.engine_sync()
            metrics = self.metrics(iteration, rollouts, scores, adv_stats, stats, reward_seconds,
                                   time.perf_counter() - update_start, time.perf_counter() - tick)
            self.log.log_metrics(metrics)
            self.log.log_samples(self.sample_rows(iteration, rollouts, scores, advantages))
            self.window.advance()
            if (iteration + 1) % cfg.train.checkpoint_every == 0 or iteration + 1 == cfg.train.iterations:
                self.checkpoint(iteration + 1)
            if cfg.train.video_every and (iteration + 1) % cfg.train.video_every == 0:
                self.write_videos(f"iter{iteration + 1:06d}")
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", ratio0=f"{metrics['ratio/first_step']:.4f}")
        self.write_videos("end")
        self.finish()
        return self.run_dir

    # ---- the steps ----

    def request(self, iteration: int) -> RolloutRequest:
        groups = self.cfg.rollout.prompts_per_iteration
        return RolloutRequest(
            iteration=iteration, prompts=self.prompts.draw(iteration, groups),
            group_seeds=[group_seed(self.cfg.train.seed, iteration, g) for g in range(groups)],
            group_size=self.cfg.rollout.group_size, sde_steps=self.window.sde_steps())

    def group_ids(self, rollouts: RolloutResult) -> torch.Tensor:
        return torch.arange(len(rollouts.request.prompts)).repeat_interleave(rollouts.request.group_size)

    def score(self, rollouts: RolloutResult):
        start = time.perf_counter()
        request = rollouts.request
        scores = self.rewards.score(rollouts.videos_BTCHW, request.sample_prompts, sample_ids=request.sample_seeds,
                                    group_ids=[request.group_ids[g] for g in self.group_ids(rollouts).tolist()])
        return scores, time.perf_counter() - start

    def advantages(self, rollouts: RolloutResult, scores: ScoreTable) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Group-relative advantages over the usable samples. Groups with a dropped sample (reward error under
        on_error=drop) or a NaN score are left out of the update whole; constant-reward groups are filtered too."""
        group_ids = self.group_ids(rollouts)
        usable = scores.keep_B.clone()
        for values in scores.raw.values():
            usable &= ~values.isnan()
        usable = torch.stack([usable[group_ids == g].all() for g in group_ids])  # whole groups only
        advantages = torch.zeros(len(group_ids))
        keep = torch.zeros(len(group_ids), dtype=torch.bool)
        stats: dict[str, float] = {"dropped_groups": float((~usable).sum()) / rollouts.request.group_size}
        if usable.any():
            cfg = self.cfg.advantages
            result = compute_advantages({k: v[usable] for k, v in scores.raw.items()}, group_ids[usable],
                                        weights=scores.weights, std=cfg.std, aggregation=cfg.aggregation,
                                        clip=cfg.clip, eps=cfg.eps)
            advantages[usable], keep[usable] = result.advantages, result.keep
            stats.update(result.stats)
        return advantages, keep, stats

    def update_batch(self, rollouts: RolloutResult, advantages: torch.Tensor, keep: torch.Tensor) -> UpdateBatch:
        request = rollouts.request
        cond, neg = text_states(self.policy, request.sample_prompts, self.device)
        guided = self.cfg.sampler.guidance_scale not in (0.0, 1.0)
        traj = rollouts.trajectory.to(self.device)
        mask = (self.window.train_mask(len(request.sample_seeds)) & keep[:, None]).to(self.device)
        return UpdateBatch(trajectory=traj, advantages_B=advantages.to(self.device), text_states_BLD=cond,
                           negative_text_states_BLD=neg if guided else None, train_mask_BS=mask)

    def update_generator(self, iteration: int) -> torch.Generator:
        return torch.Generator().manual_seed(group_seed(self.cfg.train.seed + 1, iteration, 0))

    def engine_sync(self) -> None:
        sync = getattr(self.engine, "sync_weights", None)
        if sync is not None:
            sync(self.learner.trainable_state())

    # ---- logging, checkpoints, videos ----

    def metrics(self, iteration, rollouts, scores, adv_stats, stats, reward_seconds, update_seconds, total_seconds):
        window = self.window.sde_steps()
        aggregate = scores.aggregate
        row = {"iteration": iteration, **_mean_std("reward", aggregate)}
        for name, values in scores.raw.items():
            row.update(_mean_std(f"reward/{name}", values))
            row[f"reward/{name}/nan_count"] = float(scores.nan_counts.get(name, 0))
            row[f"reward/{name}/failed"] = float(len(scores.failed_ids.get(name, [])))
        row.update(component_means(scores))
        row.update({k: float(v) for k, v in adv_stats.items() if not k.startswith("reward/")})
        row.update(stats)
        row.update({"window/start": float(min(window)), "window/size": float(len(window)), "nfe": float(rollouts.nfe),
                    "time/rollout": rollouts.seconds, "time/reward": reward_seconds, "time/update": update_seconds,
                    "time/total": total_seconds})
        return row

    def sample_rows(self, iteration, rollouts, scores, advantages):
        request = rollouts.request
        aggregate = scores.aggregate
        rows = []
        for b, (prompt, seed) in enumerate(zip(request.sample_prompts, request.sample_seeds)):
            row = {"iteration": iteration, "prompt": prompt, "group": request.group_ids[b // request.group_size],
                   "sample": b % request.group_size, "seed": seed, "reward": float(aggregate[b]),
                   "advantage": float(advantages[b])}
            row.update({f"reward/{name}": float(values[b]) for name, values in scores.raw.items()})
            row.update({f"reward/{name}/{component}": float(values[b])
                        for name, parts in scores.details.items() for component, values in parts.items()})
            rows.append(row)
        return rows

    def checkpoint(self, iteration: int) -> None:
        ema = self.learner.ema_state()
        tensors = {"model": self.learner.trainable_state(), **({"ema": ema} if ema is not None else {})}
        objects = {"optimizer": self.learner.optimizer.state_dict(),
                   # Every draw of the loop is derived from seeds; the global torch state covers library code.
                   "rng": {"torch": torch.get_rng_state()}}
        state = {"window": self.window.state_dict(), "config_name": self.cfg.name}
        save_checkpoint(self.run_dir / "checkpoints", iteration, tensors=tensors, objects=objects, state=state,
                        keep=self.cfg.train.keep_checkpoints)

    def _restore(self) -> int:
        ckpt = load_latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            warnings.warn(f"--resume: no usable checkpoint in {self.run_dir / 'checkpoints'}; starting from iteration 0",
                          stacklevel=2)
            self.log.truncate_after(-1)
            return 0
        self.learner.load_trainable_state(ckpt.tensors["model"], ckpt.tensors.get("ema"))
        self.learner.optimizer.load_state_dict(ckpt.objects["optimizer"])
        torch.set_rng_state(ckpt.objects["rng"]["torch"])
        self.window.load_state_dict(ckpt.state["window"])
        self.log.truncate_after(ckpt.iteration - 1)
        self.log.event("resume", iteration=ckpt.iteration, checkpoint=ckpt.path.name)
        return ckpt.iteration

    @torch.no_grad()
    def write_videos(self, tag: str) -> list[Path]:
        """Sample the eval prompts with the pure ODE sampler (seeded) and write mp4s plus a contact sheet."""
        if not self.eval_prompts:
            return []
        videos = generate(self.policy, self.cfg, self.eval_prompts, seed=self.cfg.train.seed, device=self.device)
        paths = []
        for index, (prompt, video) in enumerate(zip(self.eval_prompts, videos)):
            path = self.run_dir / "videos" / f"{tag}_{index:02d}_{media_slug(prompt)}.mp4"
            paths.append(media.write_mp4(path, video, fps=4, layout="TCHW"))
        media.contact_sheet(list(videos), list(self.eval_prompts), self.run_dir / "videos" / f"{tag}_sheet.png")
        return paths

    def finish(self) -> None:
        from mixgrpo.plots import plot_reward_curves
        from mixgrpo.analysis import load_run

        plot_reward_curves([load_run(self.run_dir)], self.run_dir / "reward_curve.png")
        if hasattr(self.engine, "shutdown"):  # Ray workers: free their actors and placement groups
            self.engine.shutdown()
        self.log.close()


def _mean_std(prefix: str, values: torch.Tensor) -> dict[str, float]:
    finite = values[~values.isnan()]
    return {f"{prefix}/mean": float(finite.mean()) if finite.numel() else float("nan"),
            f"{prefix}/std": float(finite.std()) if finite.numel() > 1 else 0.0}


def component_means(scores: ScoreTable) -> dict[str, float]:
    """``reward/<name>/<component>/mean`` over the finite component scores: the same samples as
    ``reward/<name>/mean`` (a failed call leaves NaN components), so a reward's parts and its total line up."""
    means = {}
    for name, parts in scores.details.items():
        for component, values in parts.items():
            prefix = f"reward/{name}/{component}"
            means[f"{prefix}/mean"] = _mean_std(prefix, values)[f"{prefix}/mean"]
    return means


def media_slug(prompt: str) -> str:
    from mixgrpo.runlog import slugify

    return slugify(prompt)


@torch.no_grad()
def generate(policy, cfg: ExperimentConfig, prompts: list[str], *, seed: int, device: torch.device) -> torch.Tensor:
    """Videos ``[B, T, C, H, W]`` for ``prompts`` with the deterministic ODE sampler (no SDE window)."""
    from mixgrpo.sampler import sample
    from mixgrpo.sde import sigma_schedule

    policy.transformer.eval()
    engine = LocalRolloutEngine(policy, cfg.sampler, device=device, batch_groups=len(prompts))
    cond, neg = text_states(policy, prompts, device)
    guided = cfg.sampler.guidance_scale not in (0.0, 1.0)
    traj = sample(engine.velocity_fn, text_states_BLD=cond, negative_text_states_BLD=neg if guided else None,
                  guidance_scale=cfg.sampler.guidance_scale, sigmas=sigma_schedule(cfg.sampler.num_steps, cfg.sampler.shift),
                  sde_steps=[], eta=0.0, sde_kind=cfg.sampler.sde_kind, post_window="euler", post_window_ratio=1.0,
                  latent_shape=policy.latent_shape(), group_size=1,
                  seeds=[seed + i for i in range(len(prompts))], group_seeds=[seed + i for i in range(len(prompts))],
                  device=device)
    return policy.decode(traj.latents).float().cpu()


def train(cfg: ExperimentConfig, *, run_dir: Path, resume: bool = False) -> Path:
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume)
    print(f"run directory: {trainer.run_dir}")
    return trainer.run()


def load_policy(cfg: ExperimentConfig, *, checkpoint: str | os.PathLike | None = None, device: torch.device):
    """The experiment's policy: the base, or with a checkpoint's trained weights (EMA weights when present)."""
    from mixgrpo.checkpoint import read_checkpoint

    policy = build_policy(cfg.policy, quantization=cfg.learner.quantization).to(device)
    if cfg.learner.lora.enabled:
        apply_lora(policy.transformer, rank=cfg.learner.lora.rank, alpha=cfg.learner.lora.alpha,
                   targets=cfg.learner.lora.targets)
    if checkpoint is not None:
        ckpt = read_checkpoint(Path(checkpoint))
        weights = ckpt.tensors.get("ema") or ckpt.tensors["model"]
        missing = set(weights) - set(dict(policy.transformer.named_parameters()))
        if missing:
            raise ValueError(f"checkpoint {checkpoint} holds tensors this policy lacks, e.g. {sorted(missing)[:3]}")
        params = dict(policy.transformer.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
    return policy


def sample_videos(cfg: ExperimentConfig, *, prompts: list[str], checkpoint: str | None, out_dir: Path,
                  num_per_prompt: int = 1, seed: int = 0) -> list[Path]:
    """``mixgrpo sample``: mp4s of the policy (the base, or a checkpoint's weights; EMA weights when present)."""
    device = resolve_device(cfg.train.device)
    policy = load_policy(cfg, checkpoint=checkpoint, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    expanded = [p for p in prompts for _ in range(num_per_prompt)]
    videos = generate(policy, cfg, expanded, seed=seed, device=device)
    paths = []
    for index, (prompt, video) in enumerate(zip(expanded, videos)):
        paths.append(media.write_mp4(out_dir / f"{index:02d}_{media_slug(prompt)}.mp4", video, fps=4, layout="TCHW"))
    return paths
