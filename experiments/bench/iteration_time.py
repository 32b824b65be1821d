"""Seconds per Mix-GRPO iteration and NFE for the sampler/trainer variants, on one policy.

Rows (25 sampler steps, the same policy, prompts, seeds and group size for all):
  dance_grpo   SDE on every step, train a random 60% of them (DanceGRPO)
  mixgrpo      progressive window of 4 SDE steps, Euler elsewhere (MixGRPO)
  flash        progressive window of 4, DPM-Solver++ 2M after the window on 40% of the steps (MixGRPO-Flash)
  flash_star   frozen window at 0 of 4, DPM-Solver++ 2M after it on 20% of the steps (MixGRPO-Flash*)

Progressive windows move during training; their cost depends on where the window is, so they are timed at several
window starts and averaged (the frozen ones sit at 0). Rewards are random numbers: scoring costs the same for every
row and is not what differs. The policy is OSP-Next at Wan2.1-1.3B shapes with random bf16 weights.

    python experiments/bench/iteration_time.py                      # GPU, 1.3B shapes
    python experiments/bench/iteration_time.py --device cpu --tiny  # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mixgrpo.config import load_config
from mixgrpo.engine.learner import Learner, UpdateBatch, plan_update
from mixgrpo.engine.rollout import LocalRolloutEngine, RolloutRequest, group_seed
from mixgrpo.algo.window import build_window_scheduler
from policies.base import Policy
from policies.synthetic import build_synthetic_policy

VARIANTS = {
    "dance_grpo": dict(window_kind="frozen", size="all", train_fraction=0.6, post_window="euler", ratio=1.0),
    "mixgrpo": dict(window_kind="progressive", size=4, train_fraction=1.0, post_window="euler", ratio=1.0),
    "flash": dict(window_kind="progressive", size=4, train_fraction=1.0, post_window="dpm2m", ratio=0.4),
    "flash_star": dict(window_kind="frozen", size=4, train_fraction=1.0, post_window="dpm2m", ratio=0.2),
}


def build_policy(args, device, dtype) -> Policy:
    """The synthetic policy (seeded random OSP-Next, stand-in encoders) that the Ray throughput bench uses too."""
    if args.tiny:
        return build_synthetic_policy(preset="tiny", num_frames=5, height=64, width=64, layout=args.layout,
                                      dtype=dtype, device=device)
    return build_synthetic_policy(preset="wan2.1-t2v-1.3b", num_frames=4 * (args.latent_frames - 1) + 1,
                                  height=8 * args.latent_height, width=8 * args.latent_width, layout=args.layout,
                                  num_full_blocks=args.full_blocks, dtype=dtype, device=device)


def time_variant(name, spec, policy, args, device) -> dict:
    steps = args.steps
    size = steps - 1 if spec["size"] == "all" else spec["size"]
    overrides = [f"sampler.num_steps={steps}", f"sampler.post_window={spec['post_window']}",
                 f"sampler.post_window_ratio={spec['ratio']}", f"sampler.guidance_scale={args.cfg}",
                 f"window.kind={spec['window_kind']}", f"window.size={size}", f"window.train_fraction={spec['train_fraction']}",
                 f"rollout.group_size={args.group}", "rollout.prompts_per_iteration=1", "learner.optimizer_steps=1",
                 f"learner.micro_batch_size={args.micro_batch}", "learner.lr=1e-6"]
    cfg = load_config(None, overrides)
    engine = LocalRolloutEngine(policy, cfg.sampler, device=device, batch_groups=1)
    learner = Learner(policy.transformer, cfg.learner, cfg.sampler,
                      autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"))
    starts = [0] if spec["window_kind"] == "frozen" else list(range(0, steps - 1 - size + 1, args.start_stride))
    per_start, nfes = [], []
    for start in starts:
        window = build_window_scheduler(kind="frozen", start=start, size=size, num_steps=steps - 1,
                                        train_fraction=spec["train_fraction"])
        times = []
        for it in range(args.warmup + args.iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            tick = time.perf_counter()
            request = RolloutRequest(iteration=it, prompts=["a prompt"], group_seeds=[group_seed(0, it, 0)],
                                     group_size=args.group, sde_steps=list(window.sde_steps()))
            rollout = engine.rollout(request)
            batch = UpdateBatch(trajectory=rollout.trajectory, advantages_B=torch.randn(args.group, device=device))
            plan = plan_update(window.train_mask(args.group), optimizer_steps=1, micro_batch_size=args.micro_batch,
                               generator=torch.Generator().manual_seed(it))
            if args.profile and it == args.warmup and start == starts[0]:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    learner.update(batch, plan)
                print(f"[{name}] one learner update, top CUDA kernels:")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
            else:
                learner.update(batch, plan)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if it >= args.warmup:
                times.append(time.perf_counter() - tick)
            nfes.append(rollout.nfe)
        per_start.append(statistics.median(times))
    return {"variant": name, "seconds": statistics.mean(per_start), "nfe": statistics.mean(nfes),
            "trained_steps": max(1, int(spec["train_fraction"] * size + 1e-9)), "window_starts": starts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and grid (CPU smoke test)")
    parser.add_argument("--layout", default="full", help="OSP-Next layout of the policy (full or dual_end)")
    parser.add_argument("--full-blocks", type=int, default=8)
    parser.add_argument("--latent-frames", type=int, default=5)
    parser.add_argument("--latent-height", type=int, default=40)
    parser.add_argument("--latent-width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--start-stride", type=int, default=6, help="progressive windows: time every Nth start")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per learner forward/backward")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one learner update")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep all activations (more memory)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.steps, args.group, args.iters, args.warmup = min(args.steps, 6), 2, 1, 0
    policy = build_policy(args, device, dtype)
    policy.transformer.gradient_checkpointing = not args.no_checkpointing
    rows = [time_variant(n, VARIANTS[n], policy, args, device) for n in args.variants.split(",")]
    base = next((r for r in rows if r["variant"] == "dance_grpo"), rows[0])
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} steps={args.steps} "
          f"group={args.group} cfg={args.cfg} layout={args.layout}")
    print(f"{'variant':<12} {'s/iter':>8} {'vs dance':>9} {'NFE':>6} {'trained':>8}")
    for r in rows:
        print(f"{r['variant']:<12} {r['seconds']:8.3f} {100 * (r['seconds'] / base['seconds'] - 1):8.1f}% "
              f"{r['nfe']:6.1f} {r['trained_steps']:8d}")


if __name__ == "__main__":
    main()
