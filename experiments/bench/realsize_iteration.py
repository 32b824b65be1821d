"""One Mix-GRPO iteration's phases at real size on one GPU: the real-size policy (Wan2.1 VAE, UMT5-XXL, an OSP-Next
transformer with random weights), LoRA + a KL reference forward, timed phase by phase.

    python experiments/bench/realsize_iteration.py --mode 14b-720p     # OSP-Next-14B, 720P / 81 frames, 1 x 2
    python experiments/bench/realsize_iteration.py --mode 1.3b-480p    # Wan2.1-1.3B, 480P / 81 frames, 8 x 4
    python experiments/bench/realsize_iteration.py --tiny              # CPU smoke test of the same code path

Prints one JSON line: seconds per phase (text, rollout, decode, reward, update), peak GPU memory, the bytes that
would reach a driver (pickled scores + one uint8 sample video), model FLOPs and MFU per phase (GPU only).
The rollout is ``steps`` guided no-grad forwards; the update differentiates ``window`` steps per video (LoRA
r32 on the attention projections) plus a no-grad reference forward per step (KL). The reward defaults to
``jpeg_compressibility`` (CPU); ``--reward NAME`` picks another registered reward.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time

import torch

from policies.lora import adapters_disabled, apply_lora
from mixgrpo.engine.mfu import current_device_name, mfu_metrics, peak_flops
from policies.osp_next.flops import rollout_flops, update_flops
from policies.realsize import build_realsize_policy

MODES = {
    "14b-720p": dict(preset="osp-next-14b", layout="dual_end", frames=81, height=720, width=1280, prompts=1, group=2),
    "1.3b-480p": dict(preset="wan2.1-t2v-1.3b", layout="full", frames=81, height=480, width=832, prompts=8, group=4),
}
TINY = dict(preset="tiny", layout="dual_end", full_blocks=2, frames=5, height=32, width=32, prompts=1, group=2,
            text=dict(vocab_size=1000, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
            vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
            dit=dict(in_channels=4, out_channels=4, text_len=16, num_layers=4, rope_max_seq_len=64), text_len=16)
LORA_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"]


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    mode = TINY if args.tiny else MODES[args.mode]
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    policy = build_realsize_policy(preset=mode["preset"], num_frames=mode["frames"], height=mode["height"],
                                   width=mode["width"], layout=mode["layout"],
                                   num_full_blocks=mode.get("full_blocks", 8), dtype=dtype, device=device,
                                   text_overrides=mode.get("text"), vae_overrides=mode.get("vae"),
                                   text_len=mode.get("text_len", 512), transformer_overrides=mode.get("dit"))
    transformer = apply_lora(policy.transformer, rank=32, alpha=64.0, targets=LORA_TARGETS)
    num = mode["prompts"] * mode["group"]
    prompts = [f"prompt number {i // mode['group']} of a benchmark, a fox runs through snow" for i in range(num)]
    shape = policy.latent_shape()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    text, t_text = _timed(lambda: torch.cat([policy.encode_text(prompts), policy.encode_text([""] * num)]), device)
    cond, uncond = text[:num], text[num:]
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(num, *shape, generator=g, device=device, dtype=dtype)

    def velocity(x, sigma, row):
        v = transformer(torch.cat([x, x]), torch.full((2,), 1000.0 * sigma, device=device),
                        torch.cat([cond[row:row + 1], uncond[row:row + 1]]))
        v_c, v_u = v.chunk(2)
        return v_u + 5.0 * (v_c - v_u)

    def rollout():
        x = latents
        with torch.no_grad():
            for step in range(args.steps):
                sigma, nxt = 1 - step / args.steps, 1 - (step + 1) / args.steps
                for row in range(num):  # one video at a time, as micro_batch_size 1
                    x[row:row + 1] = x[row:row + 1] + (nxt - sigma) * velocity(x[row:row + 1], sigma, row)
        return x

    final, t_rollout = _timed(rollout, device)
    videos, t_decode = _timed(lambda: torch.cat([policy.decode(final[i:i + 1]) for i in range(num)]), device)
    import rewards

    reward = rewards.build(args.reward)
    scores, t_reward = _timed(lambda: reward(videos.float(), prompts), device)

    def update():
        for row in range(num):
            for _ in range(args.window):
                x = latents[row:row + 1]
                with torch.no_grad(), adapters_disabled(transformer):
                    ref = velocity(x, 0.5, row)
                loss = (velocity(x, 0.5, row).float() - ref.float()).square().mean()
                loss.backward()

    _, t_update = _timed(update, device)
    sample = (videos[0] * 255).round().to(torch.uint8).cpu()
    driver_bytes = len(pickle.dumps(scores.cpu())) + len(pickle.dumps(sample))
    config = transformer.config
    latent_thw = tuple(shape[1:])
    flops = {"rollout": rollout_flops(config, latent_thw, num_videos=num, num_steps=args.steps, cfg=True),
             "update": update_flops(config, latent_thw, num_samples=num, trained_steps=args.window, cfg=True,
                                    lora=True, reference_forward=True)}
    seconds = {"text": t_text, "rollout": t_rollout, "decode": t_decode, "reward": t_reward, "update": t_update}
    peak = peak_flops(current_device_name()) if device.type == "cuda" else None
    out = {"mode": "tiny" if args.tiny else args.mode, "device": current_device_name() or "cpu",
           "videos": num, "steps": args.steps, "window": args.window, "reward": args.reward,
           "time": seconds, "driver_bytes": driver_bytes,
           "flops": flops, "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                               if device.type == "cuda" else None),
           "mfu": mfu_metrics(flops=flops, seconds={**seconds, "iteration": sum(seconds.values())}, ranks=1,
                              peak=peak)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="14b-720p")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (smoke test)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--reward", default="jpeg_compressibility")
    result = run(parser.parse_args(argv))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
