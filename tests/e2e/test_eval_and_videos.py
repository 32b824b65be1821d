"""What a researcher watches: scored evaluation every N iterations, training-sample videos linked from
samples.parquet, and TRL's rule for a reward that does not score some samples (the group keeps the other rewards)."""

import json

import pandas as pd
import pytest
import torch

from mixgrpo.results.analysis import load_run
from mixgrpo.cli import main
from rewards import register_reward

TINY = ["sampler.num_steps=4", "window.size=2", "window.shift_interval=1", "rollout.prompts_per_iteration=2",
        "rollout.group_size=2", "train.num_videos=1", "learner.optimizer_steps=1", "learner.micro_batch_size=4",
        "train.device=cpu", "train.threads=1"]


@register_reward("every_other_sample", style="trl")
def every_other_sample(prompts, completions=None, **kwargs):
    """A TRL-style reward that does not apply to every second sample (returns None there)."""
    return [None if i % 2 else 1.0 + 0.1 * i for i in range(len(prompts))]


def train(run_dir, *overrides):
    assert main(["train", *TINY, *overrides, "--run-dir", str(run_dir)]) == 0
    return load_run(run_dir)


def test_scored_evaluation_writes_eval_parquet_and_metrics_columns(tmp_path):
    run = train(tmp_path / "run", "train.iterations=2", "eval.every=1", "eval.seeds=[3, 4]", "eval.max_prompts=3")
    evaluation = pd.read_parquet(tmp_path / "run" / "eval.parquet")
    # the base (-1) and after each of the 2 iterations: 3 prompts x 2 seeds each
    assert evaluation.groupby("iteration").size().to_dict() == {-1: 6, 0: 6, 1: 6}
    assert sorted(evaluation["seed"].unique()) == [3, 4]
    assert evaluation["reward/toy_fidelity/colour"].notna().all()
    for iteration in (0, 1):
        rows = evaluation[evaluation["iteration"] == iteration]
        metrics = run.metrics.set_index("iteration").loc[iteration]
        assert metrics["eval/reward/mean"] == pytest.approx(rows["reward"].mean(), rel=1e-6)
        assert metrics["eval/toy_fidelity/mean"] == pytest.approx(rows["reward/toy_fidelity"].mean(), rel=1e-6)
    # Deterministic samples: the same prompt and seed give the same score in the base evaluation of another run.
    other = train(tmp_path / "other", "train.iterations=1", "eval.every=1", "eval.seeds=[3, 4]", "eval.max_prompts=3")
    base = pd.read_parquet(tmp_path / "other" / "eval.parquet").query("iteration == -1")
    pd.testing.assert_frame_equal(base.reset_index(drop=True), evaluation.query("iteration == -1").reset_index(drop=True))
    assert (tmp_path / "run" / "videos" / "eval_iter000002_sheet.png").is_file()
    assert (tmp_path / "run" / "videos" / "eval_base_sheet.png").is_file()
    assert "eval/reward/mean" not in other.metrics or other.metrics["eval/reward/mean"].notna().all()


def test_training_sample_videos_exist_and_are_linked(tmp_path):
    run = train(tmp_path / "run", "train.iterations=2", "train.sample_videos_per_iteration=2")
    linked = run.samples[run.samples["video_path"] != ""]
    assert len(linked) == 2 * 2  # 2 per iteration: the first member of each of the first two groups
    assert (linked["sample"] == 0).all()
    for relative in linked["video_path"]:
        assert not relative.startswith("/") and (tmp_path / "run" / relative).stat().st_size > 0
    none = train(tmp_path / "none", "train.iterations=1", "train.sample_videos_per_iteration=0")
    assert (none.samples["video_path"] == "").all()


def test_a_reward_that_skips_samples_keeps_the_group_with_the_other_rewards(tmp_path):
    rewards = "rewards=[{name: toy_fidelity}, {name: every_other_sample, weight: 0.5}]"
    run = train(tmp_path / "run", "train.iterations=1", rewards)
    assert run.metrics["dropped_groups"].tolist() == [0.0]  # every group kept: toy_fidelity scored them all
    samples = run.samples
    skipped = samples["reward/every_other_sample"].isna()
    assert skipped.sum() == 2 and samples.loc[skipped, "reward"].notna().all()
    # TRL's rule: a sample's aggregate is the weighted sum over the rewards that scored it
    torch.testing.assert_close(torch.tensor(samples.loc[skipped, "reward"].values),
                               torch.tensor(samples.loc[skipped, "reward/toy_fidelity"].values) / 1.5,
                               rtol=1e-6, atol=1e-7)
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    nan_events = [e for e in events if e["kind"] == "reward_nan"]
    assert [(e["reward"], e["count"]) for e in nan_events if "phase" not in e] == [("every_other_sample", 2)]
    evaluation = pd.read_parquet(tmp_path / "run" / "eval.parquet")
    for iteration, rows in evaluation.groupby("iteration"):  # the scored evaluation reports its None scores too
        skipped = int(rows["reward/every_other_sample"].isna().sum())
        assert [(e["reward"], e["count"]) for e in nan_events
                if e.get("phase") == "eval" and e["iteration"] == iteration] == [("every_other_sample", skipped)]
    assert not [e for e in events if e["kind"] == "group_dropped"]


@register_reward("asked_colour_known", style="trl")
def asked_colour_known(prompts, completions=None, colour=None, **kwargs):
    """Reads the JSONL field ``colour`` of each sample (None where its prompt has none)."""
    return [None if c is None else 1.0 for c in colour]


def test_a_field_no_prompt_of_a_batch_carries_still_reaches_the_reward(tmp_path):
    # Only one of four prompts carries the field, and the held-out evaluation (toy captions) carries none.
    lines = [{"prompt": "a red circle moving left", "colour": "red"}, {"prompt": "a green square moving up"},
             {"prompt": "a blue triangle moving down"}, {"prompt": "a yellow circle moving right"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rewards = "rewards=[{name: toy_fidelity}, {name: asked_colour_known, weight: 0.1}]"
    run = train(tmp_path / "run", "train.iterations=3", f"prompts.source={path}", rewards, "eval.every=1",
                "eval.max_prompts=2")
    assert len(run.metrics) == 3
    scored = run.samples["reward/asked_colour_known"].notna()
    assert (run.samples.loc[scored, "prompt"] == "a red circle moving left").all()
    assert pd.read_parquet(tmp_path / "run" / "eval.parquet")["reward/asked_colour_known"].isna().all()


def test_the_sample_videos_reuse_the_evaluation_samples_of_the_same_weights(tmp_path, monkeypatch):
    from mixgrpo.engine.worker import PolicyWorker

    generated = []
    real = PolicyWorker.generate

    def counting(self, prompts, seeds):
        generated.extend(zip(prompts, seeds))
        return real(self, prompts, seeds)

    monkeypatch.setattr(PolicyWorker, "generate", counting)
    train(tmp_path / "run", "train.iterations=1", "train.num_videos=2", "eval.every=1", "eval.max_prompts=3",
          "eval.seeds=[0, 1]", "train.seed=0")
    # The sample videos are (prompt 0, seed 0) and (prompt 1, seed 1), both in the evaluation's 3 x 2: the base
    # evaluation and the final one each sample their 6 pairs once, and the start and end videos reuse them.
    assert len(generated) == 2 * 3 * 2
    assert (tmp_path / "run" / "videos" / "start_sheet.png").is_file()
    assert (tmp_path / "run" / "videos" / "end_sheet.png").is_file()
