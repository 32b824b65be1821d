"""How much do policy gradients from independent rollout batches agree? (a signal-to-noise check of a reward)

Builds the quickstart trainer, then for ``--reps`` batches of the same 4 prompts x ``--group`` videos with different
seeds computes the Mix-GRPO policy gradient (the learner's own loss on the stored window steps, no optimizer step)
and prints the pairwise cosine similarities. Cosines near 0 mean the update is mostly noise for this reward and
policy; ``--reward brightness`` (mean pixel value, prompt-independent) is a control that should agree well.

    python experiments/bench/gradient_agreement.py                              # toy_fidelity, quickstart settings
    python experiments/bench/gradient_agreement.py --reward brightness
    python experiments/bench/gradient_agreement.py sampler.guidance_scale=2.0  # any quickstart override
"""

from __future__ import annotations

import argparse
import itertools
import tempfile

import torch

from mixgrpo.cli import quickstart_path
from mixgrpo.config import load_config
from mixgrpo.engine.rollout import RolloutRequest, group_seed
from mixgrpo.driver.trainer import Trainer
from rewards import register_reward

PROMPTS = ["a red square moving right", "a blue circle moving up", "a green triangle moving left",
           "a yellow square moving down"]


@register_reward("brightness", style="function")
def brightness(videos, prompts, **metadata):
    return videos.mean(dim=(1, 2, 3, 4))


def policy_gradient(trainer: Trainer, seed: int, group: int) -> tuple[torch.Tensor, float]:
    request = RolloutRequest(iteration=0, prompts=PROMPTS, group_seeds=[group_seed(seed, 0, g) for g in range(4)],
                             group_size=group, sde_steps=list(trainer.window.sde_steps()))
    worker = trainer.workers.worker  # the local backend's one in-process worker
    rollouts = worker.rollout(request)
    scores, _ = trainer.score(rollouts)
    advantages, _, _ = trainer.advantages(rollouts, scores)
    batch = worker.batch
    batch.advantages_B = advantages
    learner = worker.learner
    learner.transformer.train()
    learner.optimizer.zero_grad(set_to_none=True)
    samples, steps = len(PROMPTS) * group, batch.trajectory.num_steps
    for step in range(steps):
        for rows in torch.arange(samples).split(16):
            learner._micro_step(batch, step, rows, scale=rows.numel() / (steps * samples))
    grad = torch.cat([p.grad.flatten() for p in learner.params.values()])
    return grad, float(scores.aggregate.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="toy_fidelity")
    parser.add_argument("--group", type=int, default=16, help="videos per prompt")
    parser.add_argument("--reps", type=int, default=3, help="independent batches")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(quickstart_path(), [*args.overrides, f"rewards=[{{name: {args.reward}}}]", "train.num_videos=0"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir=run_dir)
        grads = []
        for rep in range(args.reps):
            grad, reward = policy_gradient(trainer, seed=5 + rep, group=args.group)
            grads.append(grad)
            print(f"batch {rep}: mean reward {reward:.4f}", flush=True)
    for i, j in itertools.combinations(range(len(grads)), 2):
        cosine = torch.nn.functional.cosine_similarity(grads[i], grads[j], dim=0)
        print(f"cos(batch {i}, batch {j}) = {float(cosine):+.3f}")


if __name__ == "__main__":
    main()
