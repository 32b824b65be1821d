"""Videos per second of the scoring service (``rewards.RewardSet``) for CLIP-score- and HPSv2-shaped models.

Random weights with the real architectures: ``clip_score`` on open_clip ViT-H-14-378-quickgelu (the shape of
MixGRPO's DFN5B CLIP-H/14-384) and ``hpsv2`` on ViT-H-14 (224 px), each saved to a temporary checkpoint and
loaded through the same code a real checkpoint uses. Videos are 81 frames at 480x832 (Wan 480P), 4 frames
sampled per video. Each reward is timed alone and then the two together.

    python experiments/bench/reward_throughput.py --device cuda                 # on a GPU
    python experiments/bench/reward_throughput.py --device cpu --tiny           # smoke test (seconds)

Prints one JSON line per measurement: reward(s), backend, device, precision, batch, videos_per_s, s_per_batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from rewards import RewardSet

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FULL_ARCHS = {"clip_score": "ViT-H-14-378-quickgelu", "hpsv2": "ViT-H-14"}


def save_random_checkpoint(arch: str, folder: Path) -> str:
    """Random-init ``arch`` saved as an HPS-style ``{"state_dict": ...}`` file; returns its path."""
    import open_clip

    name = Path(arch).stem if arch.endswith(".json") else arch
    if arch.endswith(".json"):
        open_clip.add_model_config(arch)
    path = folder / f"{name}.pt"
    torch.save({"state_dict": open_clip.create_model(name).state_dict()}, path)
    return str(path)


def time_scoring(reward_set: RewardSet, videos: torch.Tensor, prompts: list[str], iters: int, device: str) -> float:
    """Seconds per batch, after one warm-up call (kernel selection, lazy allocations)."""
    ids = list(range(videos.shape[0]))
    reward_set.score(videos, prompts, sample_ids=ids)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        reward_set.score(videos, prompts, sample_ids=ids)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and 9x64x96 videos (CPU smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="videos per scoring call (default 8, tiny 2)")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default 81, tiny 9)")
    parser.add_argument("--sampled-frames", type=int, default=4)
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 5, tiny 1)")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="default bf16 on cuda")
    parser.add_argument("--backend", default="local", choices=["local", "ray"])
    parser.add_argument("--num-gpus", type=float, default=0.5, help="GPU fraction per Ray reward actor")
    args = parser.parse_args()

    batch = args.batch or (2 if args.tiny else 8)
    frames = args.frames or (9 if args.tiny else 81)
    height, width = (64, 96) if args.tiny else (480, 832)
    iters = args.iters or (1 if args.tiny else 5)
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.backend == "ray":
        import ray

        ray.init(num_gpus=1 if args.device.startswith("cuda") else 0, include_dashboard=False)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.tiny:
            config = folder / "tiny-bench-clip.json"
            config.write_text(json.dumps(TINY_CONFIG))
            archs = {name: str(config) for name in FULL_ARCHS}
        else:
            archs = dict(FULL_ARCHS)
        checkpoints = {name: save_random_checkpoint(arch, folder) for name, arch in archs.items()}
        specs = {
            name: {
                "name": name,
                "args": {"arch": archs[name], "checkpoint": checkpoints[name], "precision": precision,
                         "num_frames": args.sampled_frames, "batch_size": batch},
                "num_gpus": args.num_gpus if args.backend == "ray" and args.device.startswith("cuda") else 0.0,
                "num_cpus": 0.5,
                "backend": args.backend,
            }
            for name in archs
        }
        generator = torch.Generator().manual_seed(0)
        videos = torch.rand(batch, frames, 3, height, width, generator=generator).to(args.device)
        prompts = [f"a photo of a cat number {i}" for i in range(batch)]
        for chosen in [["clip_score"], ["hpsv2"], ["clip_score", "hpsv2"]]:
            with RewardSet([specs[n] for n in chosen], device=args.device) as reward_set:
                seconds = time_scoring(reward_set, videos, prompts, iters, args.device)
            print(json.dumps({
                "rewards": "+".join(chosen), "backend": args.backend, "device": args.device, "precision": precision,
                "batch": batch, "video_shape": [frames, 3, height, width], "sampled_frames": args.sampled_frames,
                "videos_per_s": round(batch / seconds, 3), "s_per_batch": round(seconds, 4),
            }), flush=True)


if __name__ == "__main__":
    main()
