"""The update sees each sample with its own prompt: the learner's recompute of a rollout step, through the
worker's own update batch, equals the rollout's log-prob for every sample, and moves when the prompts are
permuted across groups (so the check can fail)."""

import dataclasses

import torch

from mixgrpo.cli import quickstart_path
from mixgrpo.config import load_config
from mixgrpo.driver.trainer import Trainer

SMALL = [
    "sampler.num_steps=4", "window.size=2", "rollout.prompts_per_iteration=3", "rollout.group_size=2",
    "train.num_videos=0", "train.iterations=1", "train.device=cpu", "sampler.guidance_scale=2.0",
]


def test_recomputed_log_prob_matches_each_sample_with_its_own_prompt_only(tmp_path):
    trainer = Trainer(load_config(quickstart_path(), SMALL), run_dir=tmp_path / "run")
    request = trainer.request(0)
    assert len(set(request.prompts)) == 3, "the check needs distinct prompts per group"
    worker = trainer.workers.worker
    worker.rollout(request)
    num = len(request.sample_prompts)
    batch = worker.batch
    batch.advantages_B = torch.linspace(-1.0, 1.0, num)
    # Encoded once per prompt (not per sample), and these are the states the rollout was conditioned on.
    traj = batch.trajectory
    assert traj.text_states_NLD.shape[0] == len(request.prompts)
    assert torch.equal(traj.text_states_NLD, worker.policy.encode_text(request.prompts))
    # The other groups' prompts, sample by sample: rolling by one group moves every sample to another prompt.
    rolled = traj.text_states_NLD.roll(1, dims=0)
    permuted = dataclasses.replace(batch, trajectory=dataclasses.replace(traj, text_states_NLD=rolled))
    worker.learner.transformer.train()  # the update's mode
    rows = torch.arange(num)
    with torch.no_grad():
        for step in range(batch.trajectory.num_steps):
            stored_B = batch.trajectory.log_prob[:, step]
            own_B = worker.learner._step_terms(batch, step, rows)[0]
            other_B = worker.learner._step_terms(permuted, step, rows)[0]
            torch.testing.assert_close(own_B, stored_B, rtol=0.0, atol=1e-6)
            assert ((other_B - stored_B).abs() > 1e-5).all(), f"step {step}: the prompt does not reach the update"
