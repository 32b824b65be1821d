"""Round 3 of the adversarial pass (issue 16): parser limits, outputs that never replace a run's files, reward
argument types, prompt files as editors save them, warnings as one line. Each case through `mixgrpo` as a user runs
it: the exact line, the exit status, the files left untouched, the event. Named in docs/reliability.md."""

import contextlib
import io
import json
import time
from pathlib import Path

import pytest

from mixgrpo.cli import main

TINY = ["sampler.num_steps=4", "window.size=2", "rollout.prompts_per_iteration=2", "rollout.group_size=2",
        "train.num_videos=1", "learner.micro_batch_size=4", "train.device=cpu", "train.threads=1",
        "train.sample_videos_per_iteration=0"]


def cli(*argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        status = main(list(argv))
    return status, err.getvalue()


def one_config_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixgrpo: config error: "), err
    return lines[0]


BOMB = "\n".join([f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]" for i in range(1, 9)])


def test_an_alias_bomb_or_a_duplicate_key_is_one_line_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + BOMB + "\n")
    start = time.monotonic()
    status, err = cli("train", str(bomb), "--run-dir", str(tmp_path / "run"))
    assert status == 2 and time.monotonic() - start < 10
    assert one_config_line(err) == (f"mixgrpo: config error: config file '{bomb}': its aliases expand to more than "
                                    "100,000 values (an alias-expansion bomb, or a config far larger than any mixgrpo "
                                    "reads); write the values out without nested anchors (&) and aliases (*)")
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  iterations: 3\n  seed: 1\n  iterations: 5\n")
    status, err = cli("train", str(twice), "--run-dir", str(tmp_path / "run"))
    assert status == 2 and one_config_line(err) == (
        f"mixgrpo: config error: config file '{twice}' line 4: key 'iterations' appears twice in one mapping (first "
        "at line 2); keep one of them (YAML would silently use the later)")
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [*a]\n")
    status, err = cli("train", str(loop), "--run-dir", str(tmp_path / "run"))
    assert status == 2 and "a recursive alias" in one_config_line(err)
    status, err = cli("train", *TINY, "rewards=[&r {name: toy_fidelity}, *r]", "--run-dir", str(tmp_path / "run"))
    assert status == 2 and "names must be unique" in one_config_line(err)  # an alias in an override still works
    assert not (tmp_path / "run").exists()


BAD_FIELDS = [
    ("rewards.0.args.colour_sigma=abc", "mixgrpo: config error: rewards.0.args.colour_sigma must be a number, got "
                                        "'abc' (reward toy_fidelity)"),
    ("window.stride=0", "mixgrpo: config error: window.stride must be >= 1 (steps per move); for a window that stays "
                        "put use window.kind=frozen, got 0"),
    ("train.seed=-1", "mixgrpo: config error: train.seed must be >= 0 (seeds of torch and numpy are unsigned), got -1"),
]


@pytest.mark.parametrize("override, line", BAD_FIELDS, ids=[o for o, _ in BAD_FIELDS])
def test_wrong_reward_argument_types_and_silent_fields_are_one_line(tmp_path, override, line):
    status, err = cli("train", *TINY, override, "--run-dir", str(tmp_path / "run"))
    assert status == 2 and one_config_line(err) == line
    assert not (tmp_path / "run").exists()


def test_prompt_files_with_crlf_or_a_bom_are_read_and_a_bad_caption_is_refused_at_load(tmp_path):
    from mixgrpo.driver.prompts import read_prompt_file

    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfa red circle moving left\r\na blue square moving up\r\n")
    assert [p.text for p in read_prompt_file(bom)] == ["a red circle moving left", "a blue square moving up"]
    old_mac = tmp_path / "cr.txt"
    old_mac.write_bytes(b"a red circle moving left\ra blue square moving up\r")
    assert len(read_prompt_file(old_mac)) == 2
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a red circle moving left\r\nblue square moving up\r\n")
    status, err = cli("train", *TINY, f"prompts.source={bad}", "--run-dir", str(tmp_path / "run"))
    assert status == 2 and one_config_line(err) == (
        f"mixgrpo: config error: prompts: '{bad}' line 2: toy caption 'blue square moving up' has 4 words; write it "
        "as 'a <colour> <shape> moving <direction>' (the toy_fidelity reward scores toy captions only)")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    status, err = cli("train", *TINY, "train.iterations=2", "train.checkpoint_every=1", "--run-dir", str(run_dir))
    assert status == 0, err
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_export_sample_and_report_never_write_over_a_run(finished_run, tmp_path):
    run = finished_run
    before = snapshot(run)
    own = f"is inside run directory {run}'s own files"
    cases = [
        (["export", str(run), "--format", "diffusers", "--force", "--out", str(run / "checkpoints" / "iter_000001")],
         own + " (checkpoints)"),
        (["export", str(run), "--format", "diffusers", "--force", "--out", str(run / "videos")], own + " (videos)"),
        (["export", str(run), "--format", "diffusers", "--force", "--out", str(run)], "is a run directory"),
        (["export", str(run), "--format", "diffusers", "--force", "--out", str(run.parent)], "holds a run's files"),
        (["sample", "--prompt", "a red circle moving left", "train.device=cpu", "--force", "--out",
          str(run / "videos")], own + " (videos)"),
        (["report", str(run), "--force", "--out", str(run / "checkpoints")], own + " (checkpoints)"),
        (["report", str(run), "--force", "--out", str(run)], "is a run directory"),
    ]
    for argv, text in cases:
        status, err = cli(*argv)
        assert status == 2 and text in err and err.count("\n") <= 2, (argv, err)
        assert "Errno" not in err and "Traceback" not in err
    assert snapshot(run) == before


def test_an_existing_output_is_kept_without_force_in_one_line(finished_run, tmp_path):
    a_file = tmp_path / "mine.txt"
    a_file.write_text("mine")
    status, err = cli("report", str(finished_run), "--out", str(a_file))
    assert (status, err.strip()) == (2, f"mixgrpo report: error: --out {a_file} is a file; give the path of a "
                                         "folder to write")
    status, err = cli("sample", "--prompt", "a red circle moving left", "train.device=cpu", "--out", str(a_file))
    assert status == 2 and f"mixgrpo: error: --out {a_file} is a file; give the path of a folder to write" in err
    assert a_file.read_text() == "mine"
    out = tmp_path / "report"
    assert cli("report", str(finished_run), "--out", str(out))[0] == 0
    first = snapshot(out)
    status, err = cli("report", str(finished_run), "--out", str(out))
    assert (status, err.strip()) == (2, f"mixgrpo report: error: --out {out} already holds summary.csv; pick another "
                                         "folder or pass --force to write over its files")
    assert snapshot(out) == first
    assert cli("report", str(finished_run), "--out", str(out), "--force")[0] == 0


def test_resume_without_a_checkpoint_is_one_line_and_an_event(tmp_path):
    run_dir = tmp_path / "run"
    assert cli("train", *TINY, "train.iterations=1", "--run-dir", str(run_dir))[0] == 0
    for checkpoint in (run_dir / "checkpoints").iterdir():
        for path in sorted(checkpoint.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        checkpoint.rmdir()
    (run_dir / "metrics.parquet").unlink()  # no logged iterations: a resume from nothing
    status, err = cli("train", *TINY, "train.iterations=1", "--run-dir", str(run_dir), "--resume")
    line = f"mixgrpo: --resume: {run_dir / 'checkpoints'} holds no checkpoint yet; starting from iteration 0"
    assert status == 0 and line in err.splitlines() and "UserWarning" not in err and ".py:" not in err, err
    kinds = [json.loads(l)["kind"] for l in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "resume_without_checkpoint" in kinds


def test_fp8_without_torchao_is_refused_before_the_run_directory_exists(tmp_path, capsys):
    import importlib.util

    from mixgrpo.cli import main

    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed here: the refusal cannot happen")
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "policy.quantization=fp8", "train.iterations=1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mixgrpo: config error: policy.quantization=fp8 needs torchao: pip install 'mixgrpo[fp8]', or set "
        "policy.quantization=none or hif8"]
    assert not run_dir.exists()
