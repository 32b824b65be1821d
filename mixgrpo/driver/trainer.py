"""The Mix-GRPO loop: rollout -> score -> advantages -> update -> log -> checkpoint.

``train(cfg, run_dir=..., resume=...)`` is what ``mixgrpo train`` runs. The trainer is the controller: it draws
prompts, scores videos, computes advantages and writes the run directory; the workers (``LocalWorkers`` in this
process, or ``RayWorkers``: N groups x S ranks) hold the policy, sample, and train on their own samples.
Construction lives in ``Trainer.__init__``; ``Trainer.run`` is the loop and fits on one screen.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from mixgrpo import yaml_load
from mixgrpo.algo.advantages import FailureStreak, advantages_from_scores
from mixgrpo.engine.checkpoint import load_latest_checkpoint, save_checkpoint
from mixgrpo.config import ConfigError, ExperimentConfig, config_from_dict, dump_config
from mixgrpo.engine.learner import UpdatePlan, plan_update
from mixgrpo.engine.rollout import RolloutRequest, RolloutResult, generate, group_seed
from mixgrpo.results.runlog import RunLog, check_config_unchanged
from mixgrpo.results.tracking import build_trackers, console_line, flatten, stdout_is_terminal, warn_tracker_failure
from mixgrpo.algo.window import build_window_scheduler
from mixgrpo.results import media
from mixgrpo.results.notices import notice
from mixgrpo.engine.policy_factory import build_policy
from mixgrpo.driver.preflight import validate_experiment
from mixgrpo.driver.resume import no_checkpoint_line, resumed_line
from mixgrpo.driver.prompts import Prompt, field_names, load_prompts, prompt_metadata
from mixgrpo.engine.worker import LocalWorkers, resolve_device
from mixgrpo.driver.ray_workers import WorkerFault
from rewards.ensemble import RewardError, RewardSet, ScoreTable


def check_resume_config(cfg: ExperimentConfig, run_dir: Path) -> None:
    """A resumed run must use the config it was started with: otherwise the run directory would mix two experiments
    and its config.yaml would no longer describe its metrics. Only ``train.iterations`` (a longer run) and the
    ``tracking`` section (where the metrics are also sent) may change; keys added to mixgrpo since the run started
    take their defaults."""
    written = run_dir / "config.yaml"
    if not written.is_file():
        return
    check_config_unchanged(run_dir)
    stored = yaml_load.load_file(written) or {}
    try:
        stored = yaml.safe_load(dump_config(config_from_dict(stored)))  # fills in keys newer than the run
    except ConfigError:
        pass  # compare as written: the difference itself is what the user needs to see
    before, now = flatten(stored), flatten(yaml.safe_load(dump_config(cfg)))
    free = ("train.iterations", "tracking.")
    changed = sorted(k for k in before.keys() | now.keys() if not k.startswith(free) and before.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"--resume with a config that differs from the run's {written}: {shown}"
                          f"{' ...' if len(changed) > 5 else ''}. Resume without CONFIG or overrides (the run's own "
                          "config is used), change only train.iterations or tracking.*, or start a new --run-dir")


EVAL_VIDEOS_TRACKED = 4
"""Evaluation videos written as mp4 and sent to the trackers at each evaluation (the first prompts, first seed)."""


class PromptSampler:
    """Stateless prompt draws: iteration i always gets the same prompts (an epoch-wise shuffle of the list), so a
    resumed run sees exactly the prompts an uninterrupted one would."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
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

    def draw(self, iteration: int, count: int) -> list[Prompt]:
        out = []
        for index in range(iteration * count, (iteration + 1) * count):
            epoch, position = divmod(index, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[position]])
        return out


class Trainer:
    def __init__(self, cfg: ExperimentConfig, *, run_dir: Path, resume: bool = False) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        notes = validate_experiment(cfg)  # before the run directory is made or any model loads
        if resume:
            check_resume_config(cfg, self.run_dir)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        # The final step lands on sigma = 0 where the SDE's std vanishes: never sample or train it (as Flow-GRPO).
        self.window = build_window_scheduler(cfg.window, num_steps=cfg.sampler.num_steps - 1, seed=cfg.train.seed)
        self.prompts = PromptSampler(load_prompts(cfg.prompts), cfg.train.seed)
        self.eval_prompts = [p.text for p in load_prompts(cfg.prompts, eval=True)][: cfg.train.num_videos]
        self.eval_set = eval_prompt_set(cfg) if cfg.eval.every else []
        self.video_seeds = [cfg.train.seed + i for i in range(len(self.eval_prompts))]
        self._kept, self._kept_version = {}, -1  # see sample()
        # Every batch passes every field of the prompt set (None where a prompt lacks it): a reward asking for one
        # must not miss its argument because a batch, or the held-out set, happened to draw no prompt with it.
        self.prompt_fields = field_names([*self.prompts.prompts, *self.eval_set])
        self.log = RunLog(self.run_dir, resume=resume)  # holds the run directory's lock until close()
        try:
            self.mp4 = not notes  # the only note today: no mp4 encoder here
            for note in notes:
                notice(note, log=self.log, kind="artefact_skipped")
            self.workers = self._build_workers()
            self.rewards = self._build_rewards()
            self.failure_streak = FailureStreak(cfg.train.max_failed_iterations)
            self.start_iteration = self._restore() if resume else 0
            self.log.write_config(cfg.to_dict())
            self.trackers = build_trackers(cfg.tracking, self.run_dir, run_name=cfg.name, config=cfg.to_dict(),
                                           resume_step=self.start_iteration if resume else None,
                                           on_error=self._tracker_failed)
        except BaseException:  # a half-built trainer frees what it took: workers, the lock
            self.close()
            raise
        self.console = cfg.tracking.console_every if not stdout_is_terminal() else 0

    def _build_workers(self):
        if self.cfg.rollout.backend == "ray":
            from mixgrpo.driver.ray_workers import RayWorkers

            return RayWorkers(self.cfg, on_event=self.log.event)
        return LocalWorkers(self.cfg, on_event=self.log.event)

    def _build_rewards(self) -> RewardSet:
        cfg = self.cfg
        if any(spec.backend == "ray" for spec in cfg.rewards):
            from mixgrpo.driver.ray_workers import ensure_ray

            ensure_ray()
        # The driver of Ray workers holds no model on a GPU: its in-process rewards run on the CPU.
        device = "cpu" if cfg.rollout.backend == "ray" else str(resolve_device(cfg.train.device))
        return RewardSet(cfg.rewards, on_error=cfg.train.on_reward_error, timeout_s=cfg.train.reward_timeout_s,
                         device=device)

    # ---- the loop ----

    def run(self) -> Path:
        cfg = self.cfg
        # The bar only on a terminal; logs (Ray jobs, nohup) get one compact line every tracking.console_every.
        bar = tqdm(range(self.start_iteration, cfg.train.iterations), desc="mix-grpo", unit="it",
                   initial=self.start_iteration, total=cfg.train.iterations, disable=None if self.console else False)
        stop_on_sigterm()
        try:
            if self.start_iteration == 0:
                self.evaluate(-1)  # the base policy, for before/after comparisons (eval.parquet only)
                self.write_videos("start", version=0)  # after it: reuses its samples, which keep their own batch
            for iteration in bar:
                tick = time.perf_counter()
                metrics, samples = self.workers.attempt(lambda: self.step(iteration), iteration)
                metrics["time/total"] = time.perf_counter() - tick
                if self.eval_due(iteration):
                    metrics.update(self.evaluate(iteration))
                self.log.log_metrics(metrics)
                self.log.log_samples(samples)
                self.report(iteration, metrics)
                self.window.advance()
                if (iteration + 1) % cfg.train.checkpoint_every == 0 or iteration + 1 == cfg.train.iterations:
                    self.checkpoint(iteration + 1)
                if cfg.train.video_every and (iteration + 1) % cfg.train.video_every == 0:
                    self.write_videos(f"iter{iteration + 1:06d}", version=iteration + 1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", ratio0=f"{metrics['ratio/first_step']:.4f}")
            self.write_videos("end", version=cfg.train.iterations)
            self.artefact("reward curve", self.plot)
        except WorkerFault as fault:  # outside attempt() (evaluation, videos, checkpoints): not redone here
            self.log.event("worker_failed", after_iteration=self.log.last_iteration, error=str(fault))
            raise RuntimeError(f"{fault}; resume the run with --resume (from its last checkpoint)") from fault
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (`ray job stop`, a scheduler's preemption)
            self.log.event("interrupted", after_iteration=self.log.last_iteration,
                           message="stopped; continue with --resume and the same --run-dir")
            raise
        finally:  # also on errors and interrupts: free the workers' GPUs, close trackers and the run directory
            self.close()
        return self.run_dir

    def step(self, iteration: int) -> tuple[dict[str, float], list[dict]]:
        """One iteration: rollout -> score -> advantages -> update. Returns its metrics row and sample rows."""
        rollouts = self.workers.rollout(self.request(iteration))
        scores, reward_seconds = self.score(rollouts)
        advantages, keep, adv_stats = self.advantages(rollouts, scores)
        update_start = time.perf_counter()
        stats = self.workers.update(advantages, self.plan(iteration, keep))
        metrics = self.metrics(iteration, rollouts, scores, adv_stats, stats, reward_seconds,
                               time.perf_counter() - update_start)
        rows = self.sample_rows(iteration, rollouts, scores, advantages)
        self.write_sample_videos(iteration, rollouts, rows)
        return metrics, rows

    # ---- the steps ----

    def request(self, iteration: int) -> RolloutRequest:
        groups = self.cfg.rollout.prompts_per_iteration
        return RolloutRequest(
            iteration=iteration, prompts=[p.text for p in self.prompts.draw(iteration, groups)],
            group_seeds=[group_seed(self.cfg.train.seed, iteration, g) for g in range(groups)],
            group_size=self.cfg.rollout.group_size, sde_steps=self.window.sde_steps())

    def group_ids(self, rollouts: RolloutResult) -> torch.Tensor:
        return torch.arange(len(rollouts.request.prompts)).repeat_interleave(rollouts.request.group_size)

    def score(self, rollouts: RolloutResult):
        """Every reward's scores; the prompts' extra fields (JSONL) reach the rewards as keyword arguments."""
        start = time.perf_counter()
        request = rollouts.request
        records = self.prompts.draw(request.iteration, len(request.prompts))  # stateless: the request's own draw
        members = self.group_ids(rollouts).tolist()
        scores = self.score_videos(request.iteration, rollouts.videos_BTCHW, request.sample_prompts,
                                   sample_ids=request.sample_seeds, group_ids=[request.group_ids[g] for g in members],
                                   metadata=prompt_metadata([records[g] for g in members], self.prompt_fields))
        return scores, time.perf_counter() - start

    def score_videos(self, iteration: int, videos, texts: list[str], **kwargs) -> ScoreTable:
        try:
            return self.rewards.score(videos, texts, **kwargs)
        except RewardError as error:  # on_reward_error=raise: the failure is an event, then it ends the run
            kind, fields = error.event()
            self.log.event(kind, iteration=iteration, **fields)
            raise

    def advantages(self, rollouts: RolloutResult, scores: ScoreTable) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Group-relative advantages (TRL's rule for a reward that did not score a sample); every failure, NaN and
        dropped group is an event and a warning, and too many iterations in a row with nothing to train stop the run."""
        request, cfg = rollouts.request, self.cfg.advantages
        labels = [request.group_ids[g] for g in self.group_ids(rollouts).tolist()]
        report = advantages_from_scores(scores.raw, labels, weights=scores.weights, dropped=scores.drop_reasons,
                                        std=cfg.std, aggregation=cfg.aggregation, clip=cfg.clip, eps=cfg.eps)
        for kind, fields in scores.events() + report.events():
            self.log.event(kind, iteration=request.iteration, **fields)
            tqdm.write(f"mixgrpo: iteration {request.iteration}: {fields['message']}", file=sys.stderr)
        self.failure_streak.record(report, request.iteration)
        return report.advantages, report.keep, report.stats

    def plan(self, iteration: int, keep: torch.Tensor) -> UpdatePlan:
        """The iteration's minibatches (the same on every rank), over the trained steps of the kept samples."""
        learner = self.cfg.learner
        mask = self.window.train_mask(len(keep)) & keep[:, None]
        return plan_update(mask, optimizer_steps=learner.optimizer_steps, micro_batch_size=learner.micro_batch_size,
                           shares=self.workers.shares, generator=self.update_generator(iteration),
                           lockstep=self.workers.sharded)

    def update_generator(self, iteration: int) -> torch.Generator:
        return torch.Generator().manual_seed(group_seed(self.cfg.train.seed + 1, iteration, 0))

    # ---- logging, checkpoints, videos ----

    def metrics(self, iteration, rollouts, scores, adv_stats, stats, reward_seconds, update_seconds):
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
                    "learner/world_size": float(self.workers.world_size), "time/rollout": rollouts.seconds,
                    "time/reward": reward_seconds, "time/update": update_seconds})
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
        # Every draw of the loop is derived from seeds; the global torch state covers library code.
        objects = {"rng": {"torch": torch.get_rng_state()}}
        state = {"window": self.window.state_dict(), "config_name": self.cfg.name}
        root, keep = self.run_dir / "checkpoints", self.cfg.train.keep_checkpoints
        if self.workers.sharded:  # every rank writes its shards; no whole model exists anywhere
            save_checkpoint(root, iteration, tensors={}, objects=objects, state=state, keep=keep,
                            write_shards=self.workers.save_sharded)
            return
        tensors, optimizer = self.workers.checkpoint_payload()
        save_checkpoint(root, iteration, tensors=tensors, objects={**optimizer, **objects}, state=state, keep=keep)

    def _restore(self) -> int:
        ckpt = load_latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            if self.log.last_iteration is not None:  # never throw away logged iterations for want of a checkpoint
                raise ValueError(f"--resume: {self.run_dir / 'checkpoints'} holds no intact checkpoint, but the run "
                                 f"logged iterations up to {self.log.last_iteration}; nothing was deleted. Restore a "
                                 "checkpoint, or start a new --run-dir")
            notice(no_checkpoint_line(self.run_dir), log=self.log, kind="resume_without_checkpoint")
            return 0
        self.workers.load_checkpoint(ckpt.path)
        torch.set_rng_state(ckpt.objects["rng"]["torch"])
        self.window.load_state_dict(ckpt.state["window"])
        dropped = self.log.logged_iterations_after(ckpt.iteration - 1)
        self.log.truncate_after(ckpt.iteration - 1)
        print(resumed_line(ckpt.path, ckpt.iteration, dropped))
        self.log.event("resume", iteration=ckpt.iteration, checkpoint=ckpt.path.name)
        return ckpt.iteration

    def write_sample_videos(self, iteration: int, rollouts: RolloutResult, rows: list[dict]) -> None:
        """The first member of each of the first ``train.sample_videos_per_iteration`` groups as mp4, linked from
        its samples.parquet row."""
        size = rollouts.request.group_size
        for b in range(0, min(len(rows), self.cfg.train.sample_videos_per_iteration * size), size):
            path = self.log.video_path(iteration, rows[b]["prompt"], b)
            written = self.video(path, rollouts.videos_BTCHW[b])
            rows[b]["video_path"] = str(written) if written else ""

    @torch.no_grad()
    def sample(self, texts: list[str], seeds: list[int], *, version: int) -> torch.Tensor:
        """Deterministic ODE videos [B, T, C, H, W] of (text, seed) pairs with the weights after ``version``
        iterations. The sample videos' pairs are kept while the weights stay the same: the scored evaluation and
        the start/end videos often ask for the same prompt and seed, and a large model's video is not sampled twice."""
        if self._kept_version != version:
            self._kept, self._kept_version = {}, version
        pairs = list(zip(texts, seeds))
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in self._kept]
        videos = self.workers.generate([t for t, _ in missing], [s for _, s in missing]) if missing else None
        fresh = dict(zip(missing, videos)) if missing else {}
        wanted = set(zip(self.eval_prompts, self.video_seeds))
        self._kept.update({pair: video for pair, video in fresh.items() if pair in wanted})
        if missing == pairs:
            return videos  # as generated: the scores of a batch sampled whole stay bit-identical
        return torch.stack([fresh[pair] if pair in fresh else self._kept[pair] for pair in pairs])

    def write_videos(self, tag: str, *, version: int) -> list[Path]:
        """Sample the eval prompts with the pure ODE sampler (seeded) and write mp4s plus a contact sheet."""
        if not self.eval_prompts:
            return []
        videos = self.sample(self.eval_prompts, self.video_seeds, version=version)
        paths = []
        for index, (prompt, video) in enumerate(zip(self.eval_prompts, videos)):
            path = self.run_dir / "videos" / f"{tag}_{index:02d}_{media_slug(prompt)}.mp4"
            paths.append(self.video(path, video))
        self.artefact("contact sheet", media.contact_sheet, list(videos), list(self.eval_prompts),
                      self.run_dir / "videos" / f"{tag}_sheet.png")
        return [p for p in paths if p]

    # ---- scored evaluation ----

    def eval_due(self, iteration: int) -> bool:
        every = self.cfg.eval.every
        return bool(every) and ((iteration + 1) % every == 0 or iteration + 1 == self.cfg.train.iterations)

    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict[str, float]:
        """Deterministic ODE samples of every eval prompt x seed with the current policy (its EMA when it keeps one),
        scored by the run's rewards: rows in eval.parquet, a captioned contact sheet, ``eval/...`` metrics."""
        if not self.eval_set:
            return {}
        pairs = [(prompt, seed) for prompt in self.eval_set for seed in self.cfg.eval.seeds]
        texts = [prompt.text for prompt, _ in pairs]
        videos = self.sample(texts, [seed for _, seed in pairs], version=iteration + 1)
        ids = list(range(len(pairs)))  # each video is its own group: a failed score drops that video only
        scores = self.score_videos(iteration, videos, texts, sample_ids=ids, group_ids=ids,
                                   metadata=prompt_metadata([prompt for prompt, _ in pairs], self.prompt_fields))
        for kind, fields in scores.events():  # as in training; a failed or None score costs that video only
            self.log.event(kind, iteration=iteration, phase="eval", **fields)
        aggregate = scores.aggregate
        rows = []
        for i, (text, (_, seed)) in enumerate(zip(texts, pairs)):
            row = {"iteration": iteration, "prompt": text, "seed": seed, "reward": float(aggregate[i])}
            row.update({f"reward/{name}": float(values[i]) for name, values in scores.raw.items()})
            row.update({f"reward/{name}/{part}": float(values[i])
                        for name, parts in scores.details.items() for part, values in parts.items()})
            rows.append(row)
        self.log.log_eval(rows)
        first_seed = [i for i, (_, seed) in enumerate(pairs) if seed == self.cfg.eval.seeds[0]]
        tag = "base" if iteration < 0 else f"iter{iteration + 1:06d}"
        sheet = self.artefact("evaluation sheet", media.contact_sheet, [videos[i] for i in first_seed],
                              [f"{texts[i]}  (reward {float(aggregate[i]):.3f})" for i in first_seed],
                              self.run_dir / "videos" / f"eval_{tag}_sheet.png")
        step, prefix = max(iteration, 0), "eval_base" if iteration < 0 else "eval"  # the base has its own tags
        self.trackers.log_image(f"{prefix}/sheet", sheet, step)
        for i in first_seed[:EVAL_VIDEOS_TRACKED]:
            path = self.video(self.run_dir / "videos" / f"eval_{tag}_{i:02d}_{media_slug(texts[i])}.mp4", videos[i])
            self.trackers.log_video(f"{prefix}/video_{i:02d}", path, step,
                                    caption=f"{texts[i]} ({float(aggregate[i]):.3f})")
        metrics = _mean_std("eval/reward", aggregate)
        metrics.update({f"eval/{name}/mean": _mean_std("x", values)["x/mean"] for name, values in scores.raw.items()})
        return metrics

    def video(self, path: Path, video_TCHW: torch.Tensor) -> Path | None:
        """An mp4 (an optional artefact): None when this machine has no encoder (reported once) or the write fails."""
        return self.artefact("video", media.write_mp4, path, video_TCHW, fps=4, layout="TCHW") if self.mp4 else None

    def artefact(self, what: str, write, *args, **kwargs):
        """Write an optional artefact (video, sheet, plot): a failure is a warning and an event, never the end of
        the run. Returns what ``write`` returned, or None."""
        try:
            return write(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- any failure of an optional file must not stop training
            message = f"could not write the {what}: {type(error).__name__}: {error}"
            notice(message, log=self.log, kind="artefact_failed", what=what, error=f"{type(error).__name__}: {error}")
            return None

    def report(self, iteration: int, metrics: dict[str, float]) -> None:
        """Every metrics column to the trackers; the console line when stdout is not a terminal."""
        self.trackers.log_scalars(metrics, step=iteration)
        if self.trackers.trackers and self.eval_due(iteration):  # the reward curve so far, with the evaluation
            self.trackers.log_image("reward_curve", self.artefact("reward curve", self.plot), iteration)
        if self.console and ((iteration + 1) % self.console == 0 or iteration + 1 == self.cfg.train.iterations):
            print(console_line(metrics, total=self.cfg.train.iterations), flush=True)

    def _tracker_failed(self, name: str, error: BaseException) -> None:
        message = warn_tracker_failure(name, error)
        self.log.event("tracker_failed", tracker=name, error=f"{type(error).__name__}: {error}", message=message)

    def plot(self) -> Path:
        from mixgrpo.results.plots import plot_reward_curves
        from mixgrpo.results.analysis import load_run

        return plot_reward_curves([load_run(self.run_dir)], self.run_dir / "reward_curve.png")

    def close(self) -> None:
        """Free the workers, close the trackers, release the run directory (also for a half-built trainer)."""
        if hasattr(self, "workers"):
            self.workers.shutdown()
        if hasattr(self, "trackers"):
            self.trackers.close()
        self.log.close()


def _mean_std(prefix: str, values: torch.Tensor) -> dict[str, float]:
    finite = values[~values.isnan()]
    return {f"{prefix}/mean": float(finite.mean()) if finite.numel() else float("nan"),
            f"{prefix}/std": float(finite.std()) if finite.numel() > 1 else 0.0}


def stop_on_sigterm() -> None:
    """Make SIGTERM (``ray job stop``, a cluster scheduler) interrupt the run like Ctrl-C, so it ends within seconds
    and cleanly (workers freed, files closed). Installed when the run starts, after Ray (which puts its own
    handler in place at ``ray.init``) was initialised."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def eval_prompt_set(cfg: ExperimentConfig) -> list[Prompt]:
    """The scored evaluation's prompts: the toy world's held-out captions, or a prompt file."""
    from mixgrpo.config import PromptConfig

    if cfg.eval.prompts == "toy":
        prompts = load_prompts(PromptConfig(source="toy"), eval=True)
    else:
        prompts = load_prompts(PromptConfig(source=cfg.eval.prompts))
    return prompts[: cfg.eval.max_prompts] if cfg.eval.max_prompts else prompts


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
    from mixgrpo.results.runlog import slugify

    return slugify(prompt)


def train(cfg: ExperimentConfig, *, run_dir: Path, resume: bool = False) -> Path:
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume)
    print(f"run directory: {trainer.run_dir}")
    return trainer.run()


def sample_videos(cfg: ExperimentConfig, *, prompts: list[str], checkpoint: str | None, out_dir: Path,
                  num_per_prompt: int = 1, seed: int = 0) -> list[Path]:
    """``mixgrpo sample``: mp4s of the policy (the base, or a checkpoint's weights; EMA weights when present)."""
    device = resolve_device(cfg.train.device)
    policy = build_policy(cfg, device=device, checkpoint=checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    expanded = [p for p in prompts for _ in range(num_per_prompt)]
    videos = generate(policy, cfg, expanded, seed=seed, device=device)
    paths = []
    for index, (prompt, video) in enumerate(zip(expanded, videos)):
        paths.append(media.write_mp4(out_dir / f"{index:02d}_{media_slug(prompt)}.mp4", video, fps=4, layout="TCHW"))
    return paths
