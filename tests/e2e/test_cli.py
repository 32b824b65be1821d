"""The command line as a user meets it: help everywhere, --version, shipped configs by name, `mixgrpo config`, and
`mixgrpo sample --checkpoint RUN`."""

import subprocess
import sys

import pytest
import yaml

from mixgrpo.cli import build_parser, main
from mixgrpo.config import dump_config, load_config, shipped_configs
from mixgrpo.config_doc import field_docs

TINY = ["sampler.num_steps=4", "window.size=2", "rollout.prompts_per_iteration=2", "rollout.group_size=2",
        "train.num_videos=0", "learner.micro_batch_size=4", "train.device=cpu", "train.threads=1"]


def subcommands():
    return list(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_has_a_working_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: mixgrpo {command}")
    if command in ("train", "config", "sample"):
        assert "quickstart" in text and "mixgrpo config" in text  # says which configs exist and how to see keys


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mixgrpo {version('mixgrpo')}"


def test_shipped_configs_are_addressed_by_name_and_a_wrong_name_lists_them(capsys):
    assert {"quickstart", "osp_next_14b_videoalign", "osp_next_14b_hif8_videoalign", "wan1.3b_mixgrpo"} <= \
        set(shipped_configs())
    assert load_config("quickstart").name == "quickstart"
    assert main(["config", "quickstrat"]) == 2
    error = capsys.readouterr().err
    assert "'quickstrat' is neither a file nor a shipped config" in error and "osp_next_14b_videoalign" in error


@pytest.mark.parametrize("name", shipped_configs())
def test_config_prints_every_shipped_config_before_its_paths_are_filled_in(name, capsys):
    assert main(["config", name]) == 0  # model_dir and prompt files are a run's preflight, not the config's
    assert yaml.safe_load(capsys.readouterr().out)["name"]


def test_config_prints_every_key_with_its_value_and_doc_as_valid_yaml(tmp_path, capsys):
    assert main(["config", "quickstart", "learner.mixed_precision=no", "rewards.0.weight=2"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("- ") or ":" in line]
    undocumented = [line for line in lines if "#" not in line]
    assert not undocumented, f"keys without a doc: {undocumented}"
    assert "mixed_precision: 'no'  # " in text  # the string, quoted as YAML needs, not false
    # The printout is the resolved configuration itself: loaded back, it is the same experiment.
    (tmp_path / "printed.yaml").write_text(text)
    printed = load_config(tmp_path / "printed.yaml")
    assert dump_config(printed) == dump_config(load_config("quickstart", ["learner.mixed_precision=no",
                                                                         "rewards.0.weight=2"]))
    assert yaml.safe_load(text)["rewards"][0]["weight"] == 2.0


def test_field_docs_cover_inherited_wan_fields():
    from mixgrpo.config import PolicyConfig

    docs = field_docs(PolicyConfig)
    assert docs["vae_tiling"].startswith("Encode/decode in spatial tiles") and docs["kind"].startswith("``toy``")


def test_sample_takes_a_run_directory_and_uses_its_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "train.iterations=2", "train.checkpoint_every=1", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "videos"
    assert main(["sample", "--prompt", "a red circle moving left", "--checkpoint", str(run), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint: {run / 'checkpoints' / 'iter_000002'}" in captured.err
    videos = list(out.glob("*.mp4"))
    assert len(videos) == 1 and videos[0].name.startswith("00_a-red-circle-moving-left")
    assert captured.out.strip() == str(videos[0])
    assert main(["sample", "--prompt", "x", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "no such checkpoint, checkpoints folder or run directory" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command_line():
    done = subprocess.run([sys.executable, "-m", "mixgrpo", "config", "quickstart", "train.iterations=3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "iterations: 3  # " in done.stdout


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["trian"]])
def test_version_help_and_a_typo_answer_without_the_heavy_imports(argv):
    import time

    code = ("import sys, runpy; sys.argv = ['mixgrpo', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('mixgrpo', run_name='__main__')\n"
            "except SystemExit as done:\n"
            "    heavy = [m for m in ('transformers', 'diffusers', 'torch') if m in sys.modules]\n"
            "    print('HEAVY', heavy, done.code)\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert "HEAVY [] " in done.stdout, done.stdout + done.stderr
    assert elapsed < 3, f"mixgrpo {' '.join(argv)} took {elapsed:.1f} s"


@pytest.mark.parametrize("command", ["report", "toy-pretrain"])
def test_report_and_toy_pretrain_help_say_what_they_do(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert len(capsys.readouterr().out.split("\n\n")[1]) > 40  # a description paragraph after the usage
