"""The ``mixgrpo`` command line.

    mixgrpo train [CONFIG] [key=value ...] [--run-dir DIR] [--resume]
    mixgrpo sample [CONFIG] --prompt "..." [--checkpoint DIR] [--out DIR] [key=value ...]
    mixgrpo toy-pretrain [--out FILE] [--steps N]
    mixgrpo report RUN [RUN ...] [--out DIR]

CONFIG is a shipped config's name (``quickstart``, ``osp_next_14b_videoalign``, ...; see ``mixgrpo/configs/``) or a
YAML file. With no CONFIG, ``train`` and ``sample`` use ``quickstart``: the embedded toy world on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mixgrpo.config import ConfigError, load_config, resolve_config

def quickstart_path() -> Path:
    """The quickstart config shipped inside the package."""
    return resolve_config("quickstart")


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    config = None
    if items and "=" not in items[0]:
        config, items = items[0], items[1:]
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config file, got {bad}; e.g. train.iterations=10")
    return config, items


def _train(args: argparse.Namespace) -> int:
    from mixgrpo.trainer import train

    config, overrides = _split_config_and_overrides(args.items)
    if args.resume and config is None and args.run_dir is not None and (Path(args.run_dir) / "config.yaml").is_file():
        config = str(Path(args.run_dir) / "config.yaml")  # resume the run with the config it was started with
    cfg = load_config(config or quickstart_path(), overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    train(cfg, run_dir=run_dir, resume=args.resume)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from mixgrpo.trainer import sample_videos

    config, overrides = _split_config_and_overrides(args.items)
    if config is None and args.checkpoint and (Path(args.checkpoint).parent.parent / "config.yaml").is_file():
        config = str(Path(args.checkpoint).parent.parent / "config.yaml")
    cfg = load_config(config or quickstart_path(), overrides)
    paths = sample_videos(cfg, prompts=args.prompt, checkpoint=args.checkpoint, out_dir=Path(args.out),
                          num_per_prompt=args.num, seed=args.seed)
    for path in paths:
        print(path)
    return 0


def _toy_pretrain(args: argparse.Namespace) -> int:
    from policies.toy.pretrain import pretrain_toy

    path = pretrain_toy(out_path=args.out, steps=args.steps, seed=args.seed, colour_noise=args.colour_noise)
    print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from mixgrpo.report import main as report_main

    return report_main(args.rest)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixgrpo", description="Mix-GRPO post-training for sparse video DiTs")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="post-train a policy with Mix-GRPO")
    train.add_argument("items", nargs="*", help="[CONFIG] [key=value ...]")
    train.add_argument("--run-dir", default=None, help="run directory (default: runs/<name>)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    train.set_defaults(func=_train)

    sample = sub.add_parser("sample", help="write sample videos of a policy as mp4")
    sample.add_argument("items", nargs="*", help="[CONFIG] [key=value ...]")
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    sample.add_argument("--checkpoint", default=None, help="a checkpoint folder runs/<name>/checkpoints/iter_NNNNNN")
    sample.add_argument("--out", default="samples", help="output folder")
    sample.add_argument("--num", type=positive_int, default=1, help="videos per prompt")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_sample)

    pre = sub.add_parser("toy-pretrain", help="pretrain the toy world's base model (flow matching)")
    pre.add_argument("--out", default=None, help="safetensors file to write (default: the user cache)")
    pre.add_argument("--steps", type=positive_int, default=None)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--colour-noise", type=float, default=None,
                     help="fraction of captions shown with a random colour word (default: the shipped base's)")
    pre.set_defaults(func=_toy_pretrain)

    report = sub.add_parser("report", help="summarise runs: a table in the terminal, plots on disk", add_help=False)
    report.add_argument("rest", nargs=argparse.REMAINDER)
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"mixgrpo: config error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad input found while building (a prompt, a path, a checkpoint): say it plainly
        if os.environ.get("MIXGRPO_DEBUG"):
            raise
        print(f"mixgrpo: error: {error}\n(set MIXGRPO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
