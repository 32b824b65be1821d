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

# mixgrpo.config (and what it imports: torch, transformers, diffusers) loads only when a command runs, so --version,
# --help and a mistyped command answer at once.
COMMANDS = {
    "train": "post-train a policy with Mix-GRPO",
    "config": "print the resolved configuration (every key, its value and its doc)",
    "sample": "write sample videos of a policy as mp4",
    "report": "summarise runs: a table in the terminal, plots on disk",
    "export": "write a run's weights as a PEFT LoRA adapter or a diffusers transformer folder",
    "toy-pretrain": "pretrain the toy world's base model (flow matching)",
}


def load_config(*args, **kwargs):
    from mixgrpo.config import load_config as load

    return load(*args, **kwargs)


def shipped_configs() -> list[str]:
    """Names of the shipped configs (the same as mixgrpo.config.shipped_configs, without importing it)."""
    return sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.yaml"))


def quickstart_path() -> Path:
    """The quickstart config shipped inside the package."""
    from mixgrpo.config import resolve_config

    return resolve_config("quickstart")


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    config = None
    if items and "=" not in items[0]:
        config, items = items[0], items[1:]
    bad = [item for item in items if "=" not in item]
    if bad:
        from mixgrpo.config import ConfigError

        raise ConfigError(f"expected key=value overrides after the config, got {bad}; e.g. train.iterations=10")
    return config, items


def _train(args: argparse.Namespace) -> int:
    from mixgrpo.driver.trainer import train

    config, overrides = _split_config_and_overrides(args.items)
    if args.resume:  # the run's own config.yaml, whichever way the run directory is named
        from mixgrpo.driver.resume import finished_line, resume_config, resume_run_dir

        run_dir = resume_run_dir(args.run_dir, config)
        cfg = resume_config(run_dir, config, overrides)
        from mixgrpo.driver.trainer import check_resume_config

        check_resume_config(cfg, run_dir)  # a changed setting is refused even when the run is finished
        done = finished_line(run_dir, cfg)
        if done is not None:
            print(done)
            return 0
    else:
        cfg = load_config(config or "quickstart", overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    train(cfg, run_dir=run_dir, resume=args.resume)
    from mixgrpo.results.summary import write_summary

    print("\n".join(write_summary(run_dir)))  # the last lines: what changed, and the files that show it
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


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="mixgrpo", description="Mix-GRPO post-training for sparse video DiTs")
    parser.add_argument("--version", action="version", version=f"mixgrpo {_version()}")
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def light_parser() -> argparse.ArgumentParser:
    """The commands by name only: enough for --version, --help and a mistyped command, importing nothing heavy."""
    parser, sub = _top_parser()
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from mixgrpo.results.report import add_arguments as add_report_arguments

    parser, sub = _top_parser()
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

    report = sub.add_parser("report", help=COMMANDS["report"],
                            description="Summarise run directories: the reward table in the terminal, and reward "
                                        "curves, diagnostics, per-prompt tables and the training-sample sheet on "
                                        "disk (default RUN/report).")
    add_report_arguments(report)
    report.set_defaults(func=_report)

    from mixgrpo.results.export import add_parser as add_export_parser

    add_export_parser(sub)

    pre = sub.add_parser("toy-pretrain", help=COMMANDS["toy-pretrain"],
                         description="Pretrain the toy world's base model by flow matching on procedural videos and "
                                     "noisy captions, and write it as one safetensors file (the shipped base was "
                                     "made this way).")
    pre.add_argument("--out", default=None, help="safetensors file to write (default: the user cache)")
    pre.add_argument("--steps", type=positive_int, default=None,
                     help="optimizer steps (default: the shipped base's, see policies/toy/pretrain.py)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    pre.add_argument("--colour-noise", type=float, default=None,
                     help="fraction of captions shown with a random colour word (default: the shipped base's)")
    pre.set_defaults(func=_toy_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:  # --version, --help, a typo: answered (and exited) without the imports
        light_parser().parse_args(argv)
    args = build_parser().parse_args(argv)
    from mixgrpo.config import ConfigError

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
