"""Seconds per Mix-GRPO iteration, speed-up and GPU busy share of the colocated learner on 1, 2, 4 ... GPUs.

Every row runs the real trainer (``Trainer.step``: rollout on the worker groups, rewards on the driver, advantages,
the update on the worker groups with gradients summed over all ranks) with the SAME total work per iteration:
``--prompts`` x ``--group`` videos. Only the number of ranks changes: ``GPUs / --sp`` worker groups of ``--sp``
ranks. The policy is ``policy.kind=synthetic`` (OSP-Next at ``--preset`` shapes, seeded random weights, built on
the meta device and materialised on the GPUs), the reward ``jpeg_compressibility``.

Per row: seconds per iteration (median of ``--iters`` timed iterations after ``--warmup``), the phases as the
trainer logs them (time/rollout, time/reward, time/update), the share of GPU time busy, and the peak memory per
GPU. Busy share = GPU activity summed over GPUs / (GPUs x wall) over the timed iterations, where a GPU's activity
is the union of the intervals in which it ran a kernel, memcpy or memset, recorded by torch.profiler (CUPTI) inside
every rank. NCCL kernels count as busy (as nvidia-smi would), including time they wait for a peer.

    python experiments/bench/iteration_scaling.py --gpus 4,2,1                      # 1.3B, 480P, 33 frames
    python experiments/bench/iteration_scaling.py --preset wan2.1-t2v-14b --gpus 4 --sp 4 --prompts 1 --group 2 \\
        --steps 12 --window 4 --config osp_next_14b_hif8_videoalign                 # the 14B baseline setup
    python experiments/bench/iteration_scaling.py --device cpu --tiny --gpus 2,1    # smoke test (CPU, gloo)

Positional ``key=value`` arguments are config overrides applied last (they win over the ones the script sets),
e.g. ``policy.compile=true policy.quantization=hif8`` (or ``fp8``); each row records the compile and quantization
it ran with. MFU per phase (``perf/mfu/rollout``, ``perf/mfu/update``) is printed where the trainer's metrics row
has it, else from ``policies.osp_next.flops`` where that module exists, else as ``-``.

Joins the cluster in RAY_ADDRESS when set, else starts a local Ray instance. One JSON line per row, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mixgrpo.config import load_config
from mixgrpo.driver.trainer import Trainer


def overrides(args, gpus: int, prompts_file: Path) -> list[str]:
    workers = gpus // args.sp
    return [
        "policy.kind=synthetic", f"policy.preset={args.preset}", f"policy.layout={args.layout}",
        f"policy.num_full_blocks={args.full_blocks}", f"policy.num_frames={args.frames}",
        f"policy.height={args.height}", f"policy.width={args.width}",
        f"policy.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
        f"policy.gradient_checkpointing={'true' if args.checkpointing else 'false'}",
        f"prompts.source={prompts_file}", "rewards=[{name: jpeg_compressibility}]",
        f"sampler.num_steps={args.steps}", f"sampler.guidance_scale={args.cfg}", "window.kind=frozen",
        "window.start=0", f"window.size={args.window}", "rollout.backend=ray", f"rollout.num_workers={workers}",
        f"rollout.sp_size={args.sp}", f"rollout.prompts_per_iteration={args.prompts}",
        f"rollout.group_size={args.group}", f"rollout.batch_size={args.batch}",
        f"learner.micro_batch_size={args.micro_batch}", f"learner.optimizer_steps={args.optimizer_steps}",
        f"train.device={args.device}", "train.num_videos=0", "eval.every=0",  # timed: the iterations alone
        f"train.iterations={args.warmup + args.iters}",
        *args.extra,
    ]


# ---- run inside every rank through Ray's __ray_call__: the library itself carries no profiling code ----

def _start_busy(actor) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.synchronize()
    actor._busy = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    actor._busy.__enter__()
    return True


def _stop_busy(actor) -> float | None:
    """Seconds in which this rank's GPU ran anything, as the union of its activity intervals."""
    import torch
    from torch.autograd import DeviceType

    prof = getattr(actor, "_busy", None)
    if prof is None:
        return None
    torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
                   if e.device_type() == DeviceType.CUDA)
    busy, end = 0, None
    for lo, hi in spans:
        if end is None or lo > end:
            busy += hi - lo
            end = hi
        elif hi > end:
            busy += hi - end
            end = hi
    return busy / 1e9


def _peak_memory(actor) -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {"allocated_gib": 0.0, "reserved_gib": 0.0}
    return {"allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


MFU_KEYS = ("perf/mfu/rollout", "perf/mfu/update")


def phase_mfu(rows: list[dict], cfg, gpus: int) -> dict[str, float | None]:
    """Median MFU per phase: the trainer's own metric where it logs one, else from the model's FLOP count."""
    out: dict[str, float | None] = {}
    for key in MFU_KEYS:
        values = [m[key] for m in rows if m.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    if all(v is not None for v in out.values()):
        return out
    try:
        from policies.osp_next import flops as model_flops  # not every checkout has the FLOP counter
    except ImportError:
        return out
    phase_flops = getattr(model_flops, "iteration_phase_flops", None)
    peak = getattr(model_flops, "peak_flops_per_second", None)
    if phase_flops is None or peak is None:
        return out
    per_phase = phase_flops(cfg)  # {"rollout": FLOPs, "update": FLOPs} of one iteration
    for phase, key in zip(("rollout", "update"), MFU_KEYS):
        if out[key] is None and phase in per_phase:
            out[key] = per_phase[phase] / (statistics.median(m[f"time/{phase}"] for m in rows) * gpus * peak())
    return out


def run_row(args, gpus: int, prompts_file: Path, out_dir: Path) -> dict:
    import ray

    cfg = load_config(args.config or "quickstart", overrides(args, gpus, prompts_file))
    tick = time.perf_counter()
    trainer = Trainer(cfg, run_dir=out_dir / f"gpus{gpus}")
    startup = time.perf_counter() - tick
    actors = trainer.workers.actors
    rows, walls = [], []
    try:
        for iteration in range(args.warmup + args.iters):
            if iteration == args.warmup:
                ray.get([a.__ray_call__.remote(_start_busy) for a in actors])
            tick = time.perf_counter()
            metrics, _ = trainer.workers.attempt(lambda: trainer.step(iteration), iteration)
            wall = time.perf_counter() - tick
            trainer.window.advance()
            print(f"  gpus={gpus} iteration {iteration}: {wall:.1f} s (rollout {metrics['time/rollout']:.1f}, "
                  f"update {metrics['time/update']:.1f})", flush=True)
            if iteration >= args.warmup:
                rows.append(metrics)
                walls.append(wall)
        busy = ray.get([a.__ray_call__.remote(_stop_busy) for a in actors])
        memory = ray.get([a.__ray_call__.remote(_peak_memory) for a in actors])
    finally:
        trainer.close()
    timed = sum(walls)
    mfu = phase_mfu(rows, cfg, gpus)
    busy_share = None if None in busy else sum(busy) / (len(busy) * timed)
    return {
        "gpus": gpus, "workers": gpus // args.sp, "sp": args.sp, "seconds_per_iteration": statistics.median(walls),
        "rollout_s": statistics.median(m["time/rollout"] for m in rows),
        "reward_s": statistics.median(m["time/reward"] for m in rows),
        "update_s": statistics.median(m["time/update"] for m in rows),
        "busy_share": busy_share, "busy_s_per_gpu": busy, "timed_wall_s": timed,
        "peak_allocated_gib": max(m["allocated_gib"] for m in memory),
        "peak_reserved_gib": max(m["reserved_gib"] for m in memory),
        "world_size": rows[-1]["learner/world_size"], "ratio_first_step": rows[-1]["ratio/first_step"],
        "mfu_rollout": mfu["perf/mfu/rollout"], "mfu_update": mfu["perf/mfu/update"],
        "compile": cfg.policy.compile, "quantization": cfg.policy.quantization,
        "startup_s": startup, "videos": args.prompts * args.group, "preset": args.preset,
        "video": f"{args.frames}x{args.height}x{args.width}", "steps": args.steps, "window": args.window,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="4,2,1", help="comma-separated GPU counts (run in this order)")
    parser.add_argument("--sp", type=int, default=1, help="ranks per worker group (rollout.sp_size)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny preset and video, few steps (CPU smoke test)")
    parser.add_argument("--config", default=None, help="a shipped config name or file to start from (default: "
                                                        "the quickstart, whose learner settings are plain)")
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--layout", default="dual_end")
    parser.add_argument("--full-blocks", type=int, default=8)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=6, help="sampler steps")
    parser.add_argument("--window", type=int, default=2, help="SDE (trained) steps, a frozen window at 0")
    parser.add_argument("--cfg", type=float, default=5.0, help="guidance scale (1 = no CFG)")
    parser.add_argument("--prompts", type=int, default=8, help="prompt groups per iteration")
    parser.add_argument("--group", type=int, default=4, help="videos per prompt")
    parser.add_argument("--batch", type=int, default=4, help="videos per sampler call (rollout.batch_size)")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per learner forward/backward")
    parser.add_argument("--optimizer-steps", type=int, default=1)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--table", nargs="+", default=None, metavar="JSON",
                        help="print the table of rows saved by earlier runs (--out files) and exit")
    parser.add_argument("extra", nargs="*", help="more key=value config overrides")
    args = parser.parse_intermixed_args()  # key=value overrides may come before, between or after the options
    if args.table:
        print_table([row for path in args.table for row in json.loads(Path(path).read_text())])
        return
    if args.tiny:
        args.preset, args.full_blocks, args.frames, args.height, args.width = "tiny", 2, 5, 64, 64
        args.steps, args.window, args.prompts, args.group, args.batch, args.micro_batch = 4, 2, 4, 2, 2, 2
    if args.sp < 1 or args.iters < 1 or args.warmup < 0:
        parser.error(f"need --sp >= 1, --iters >= 1 and --warmup >= 0; got {args.sp}, {args.iters}, {args.warmup}")
    counts = [int(g) for g in args.gpus.split(",") if g.strip().isdigit() and int(g) > 0]
    if len(counts) != len(args.gpus.split(",")):
        parser.error(f"--gpus must be comma-separated positive integers, e.g. 4,2,1; got {args.gpus!r}")
    bad = [g for g in counts if g % args.sp]
    if bad:
        parser.error(f"--gpus {bad} are not multiples of --sp {args.sp}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.txt"
        prompts_file.write_text("\n".join(f"synthetic prompt {i}" for i in range(64)) + "\n")
        for gpus in counts:
            rows.append(run_row(args, gpus, prompts_file, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    base = min(rows, key=lambda r: r["gpus"])
    first = rows[0]
    print(f"preset={first['preset']} video={first['video']} steps={first['steps']} window={first['window']} "
          f"videos/iteration={first['videos']}")
    print(f"{'GPUs':>4} {'groups x sp':>11} {'s/iter':>8} {'vs 1 GPU':>8} {'rollout':>8} {'reward':>7} {'update':>7} "
          f"{'busy':>6} {'peak GiB':>8} {'MFU roll':>8} {'MFU upd':>7}  compile/quant")
    for r in rows:
        busy = "-" if r["busy_share"] is None else f"{100 * r['busy_share']:.0f}%"
        mfu = ["-" if r.get(k) is None else f"{100 * r[k]:.1f}%" for k in ("mfu_rollout", "mfu_update")]
        speedup = base["seconds_per_iteration"] / r["seconds_per_iteration"] if base["gpus"] == 1 else float("nan")
        print(f"{r['gpus']:>4} {r['workers']:>5} x {r['sp']:<3} {r['seconds_per_iteration']:>8.2f} {speedup:>7.2f}x "
              f"{r['rollout_s']:>8.2f} {r['reward_s']:>7.2f} {r['update_s']:>7.2f} {busy:>6} "
              f"{r['peak_allocated_gib']:>8.1f} {mfu[0]:>8} {mfu[1]:>7}  "
              f"{r.get('compile', '-')}/{r.get('quantization', '-')}")


if __name__ == "__main__":
    main()
