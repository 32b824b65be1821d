"""The ``mixgrpo`` command line.

    mixgrpo train [CONFIG] [key=value ...] [--run-dir DIR] [--resume]
    mixgrpo config [CONFIG] [key=value ...]
    mixgrpo sample [CONFIG] --prompt "..." [--checkpoint RUN_OR_CHECKPOINT] [--out DIR] [key=value ...]
    mixgrpo report RUN [RUN ...] [--out DIR]
    mixgrpo export RUN_OR_CHECKPOINT --format peft|diffusers --out DIR
    mixgrpo toy-pretrain [--out FILE] [--steps N]
    mixgrpo --version

CONFIG is a shipped config's name (``quickstart``, ``osp_next_14b_videoalign``, ...; see ``mixgrpo/configs/``) or a
YAML file. With no CONFIG, ``train`` and ``sample`` use ``quickstart``: the embedded toy world on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mixgrpo.config import ConfigError, load_config, resolve_config, shipped_configs


def quickstart_path() -> Path:
    """The quickstart config shipped inside the package."""
    return resolve_config("quickstart")


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    config = None
    if items and "=" not in items[0]:
        config, items = items[0], items[1:]
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config, got {bad}; e.g. train.iterations=10")
    return config, items


def _train(args: argparse.Namespace) -> int:
    from mixgrpo.driver.trainer import train

    config, overrides = _split_config_and_overrides(args.items)
    if args.resume and config is None and args.run_dir is not None and (Path(args.run_dir) / "config.yaml").is_file():
        config = str(Path(args.run_dir) / "config.yaml")  # resume the run with the config it was started with
    cfg = load_config(config or "quickstart", overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    train(cfg, run_dir=run_dir, resume=args.resume)
    return 0


def _config(args: argparse.Namespace) -> int:
    from mixgrpo.config_doc import annotated_yaml

    config, overrides = _split_config_and_overrides(args.items)
    print(annotated_yaml(load_config(config or "quickstart", overrides)), end="")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from mixgrpo.engine.checkpoint import resolve_checkpoint
    from mixgrpo.driver.trainer import sample_videos
    from mixgrpo.results.outputs import check_output

    config, overrides = _split_config_and_overrides(args.items)
    checkpoint = None
    if args.checkpoint:
        checkpoint = resolve_checkpoint(args.checkpoint)
        print(f"checkpoint: {checkpoint}", file=sys.stderr)
        run_config = checkpoint.parent.parent / "config.yaml"
        if config is None and run_config.is_file():
            config = str(run_config)  # the run's own policy and LoRA settings
    cfg = load_config(config or "quickstart", overrides)
    check_output(args.out, force=args.force, replaces=None)  # not in a run's folders; a used folder only with --force
    paths = sample_videos(cfg, prompts=args.prompt, checkpoint=checkpoint, out_dir=Path(args.out),
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
    from mixgrpo.results.report import run

    return run(args)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mixgrpo")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


CONFIG_HELP = ("CONFIG: a shipped config ({names}) or a YAML file; default quickstart. key=value overrides set any "
               "field (section.key=value, list items by index: rewards.0.weight=2). `mixgrpo config [CONFIG]` prints "
               "every key with its value and what it does.")


def build_parser() -> argparse.ArgumentParser:
    from mixgrpo.results.report import add_arguments as add_report_arguments

    parser = argparse.ArgumentParser(prog="mixgrpo", description="Mix-GRPO post-training for sparse video DiTs")
    parser.add_argument("--version", action="version", version=f"mixgrpo {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = CONFIG_HELP.format(names=", ".join(shipped_configs()))

    train = sub.add_parser("train", help="post-train a policy with Mix-GRPO", description=config_help)
    train.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]", help="config and overrides")
    train.add_argument("--run-dir", default=None, help="run directory (default: runs/<name>)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    train.set_defaults(func=_train)

    config = sub.add_parser("config", help="print the resolved configuration (every key, its value and its doc)",
                            description=config_help)
    config.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]", help="config and overrides")
    config.set_defaults(func=_config)

    sample = sub.add_parser("sample", help="write sample videos of a policy as mp4", description=config_help)
    sample.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]", help="config and overrides")
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    sample.add_argument("--checkpoint", default=None,
                        help="a run directory (its newest intact checkpoint is used), its checkpoints/ folder, or "
                             "one checkpoint folder; default: the untrained base")
    sample.add_argument("--out", default="samples", help="output folder (default: samples)")
    sample.add_argument("--force", action="store_true", help="write into an --out folder that is not empty")
    sample.add_argument("--num", type=positive_int, default=1, help="videos per prompt (default 1)")
    sample.add_argument("--seed", type=int, default=0, help="initial-noise seed of the first video (default 0)")
    sample.set_defaults(func=_sample)

    report = sub.add_parser("report", help="summarise runs: a table in the terminal, plots on disk")
    add_report_arguments(report)
    report.set_defaults(func=_report)

    from mixgrpo.results.export import add_parser as add_export_parser

    add_export_parser(sub)

    pre = sub.add_parser("toy-pretrain", help="pretrain the toy world's base model (flow matching)")
    pre.add_argument("--out", default=None, help="safetensors file to write (default: the user cache)")
    pre.add_argument("--steps", type=positive_int, default=None,
                     help="optimizer steps (default: the shipped base's, see policies/toy/pretrain.py)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    pre.add_argument("--colour-noise", type=float, default=None,
                     help="fraction of captions shown with a random colour word (default: the shipped base's)")
    pre.set_defaults(func=_toy_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the trainer already freed its workers
        how = f" ({interrupt})" if str(interrupt) else ""
        print(f"mixgrpo: interrupted{how}; continue with --resume and the same --run-dir", file=sys.stderr)
        return 130
    except ConfigError as error:
        print(f"mixgrpo: config error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad input found while building (a prompt, a path, a checkpoint): say it plainly
        return _one_line(error, status=2)
    except (RuntimeError, OSError, ImportError) as error:  # the run could not go on: resources, a lock, a reward
        return _one_line(error, status=1)


def _one_line(error: BaseException, *, status: int) -> int:
    """Print an expected failure as one line (its traceback with MIXGRPO_DEBUG=1) and return the exit status."""
    if os.environ.get("MIXGRPO_DEBUG"):
        raise error
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"mixgrpo: error: {text}\n(set MIXGRPO_DEBUG=1 for the traceback)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
