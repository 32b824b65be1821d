"""Rollout throughput (videos/s) of the Ray engine with 1, 2 and 4 worker groups, one GPU each.

Same policy, prompts, seeds and sampler settings for every row; only ``rollout.num_workers`` changes. The policy
is ``policy.kind=synthetic``: OSP-Next at Wan2.1-1.3B shapes with seeded random bf16 weights, which every worker
builds from the config (no checkpoint, nothing pickled by the driver), with stand-in text encoder and decoder
(their cost is not what is compared). Each rollout is one iteration's prompt groups spread over the workers, as
the trainer does; the time includes moving the videos back to the driver (trajectories stay on the workers).

    python experiments/bench/rollout_throughput.py --workers 1,2,4          # GPU host, 1 GPU per worker
    python experiments/bench/rollout_throughput.py --device cpu --tiny      # smoke test (CPU, tiny preset)

Joins the cluster in RAY_ADDRESS when set, else starts a local Ray instance. One JSON line per row, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mixgrpo.config import load_config
from mixgrpo.driver.ray_workers import RayWorkers, ensure_ray
from mixgrpo.engine.rollout import RolloutRequest, group_seed
from mixgrpo.algo.window import build_window_scheduler


def overrides(args, workers: int) -> list[str]:
    return [
        "policy.kind=synthetic", f"policy.preset={args.preset}", f"policy.layout={args.layout}",
        f"policy.num_full_blocks={args.full_blocks}",
        f"policy.num_frames={args.frames}", f"policy.height={args.height}", f"policy.width={args.width}",
        f"policy.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
        f"sampler.num_steps={args.steps}", f"sampler.guidance_scale={args.cfg}", f"window.size={args.window}",
        "window.kind=frozen", "rollout.backend=ray", f"rollout.num_workers={workers}",
        f"rollout.prompts_per_iteration={args.prompts}", f"rollout.group_size={args.group}",
        f"rollout.batch_size={args.group}", f"train.device={args.device}",
    ]


def request(cfg, iteration: int) -> RolloutRequest:
    window = build_window_scheduler(cfg.window, num_steps=cfg.sampler.num_steps - 1)
    groups = cfg.rollout.prompts_per_iteration
    return RolloutRequest(iteration=iteration, prompts=[f"prompt {g}" for g in range(groups)],
                          group_seeds=[group_seed(0, iteration, g) for g in range(groups)],
                          group_size=cfg.rollout.group_size, sde_steps=list(window.sde_steps()))


def time_workers(args, workers: int) -> dict:
    cfg = load_config(None, overrides(args, workers))
    tick = time.perf_counter()
    engine = RayWorkers(cfg)
    startup = time.perf_counter() - tick
    try:
        seconds = []
        for it in range(args.warmup + args.iters):
            result = engine.rollout(request(cfg, it))
            if it >= args.warmup:
                seconds.append(result.seconds)
    finally:
        engine.shutdown()
    videos = cfg.samples_per_iteration
    median = statistics.median(seconds)
    return {"workers": workers, "videos": videos, "seconds_per_rollout": median, "videos_per_s": videos / median,
            "startup_s": startup, "nfe": result.nfe, "video_shape": list(result.videos_BTCHW.shape[1:]),
            "device": args.device, "preset": args.preset}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny preset, tiny video, few steps (CPU smoke test)")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker-group counts")
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--layout", default="full", help="OSP-Next layout (full or dual_end)")
    parser.add_argument("--full-blocks", type=int, default=8, help="full blocks of the dual_end layout")
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--prompts", type=int, default=8, help="prompt groups per rollout (spread over workers)")
    parser.add_argument("--group", type=int, default=4, help="videos per prompt group")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.tiny:
        args.preset, args.full_blocks, args.frames, args.height, args.width = "tiny", 2, 5, 64, 64
        args.steps, args.window, args.prompts, args.group, args.iters, args.warmup = 4, 2, 4, 2, 1, 0
    ensure_ray()
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        rows.append(time_workers(args, workers))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    name = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else args.device
    print(f"device={name} preset={args.preset} video={args.frames}x{args.height}x{args.width} steps={args.steps} "
          f"cfg={args.cfg} window={args.window} groups={args.prompts}x{args.group}")
    print(f"{'workers':>7} {'s/rollout':>10} {'videos/s':>9} {'speedup':>8} {'efficiency':>10} {'startup s':>9}")
    for r in rows:
        speedup = r["videos_per_s"] / base["videos_per_s"]
        print(f"{r['workers']:>7} {r['seconds_per_rollout']:>10.3f} {r['videos_per_s']:>9.3f} {speedup:>8.2f} "
              f"{speedup * base['workers'] / r['workers']:>10.2f} {r['startup_s']:>9.1f}")


if __name__ == "__main__":
    main()
