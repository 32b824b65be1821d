"""Bad input and faults an adversarial user tried (issue 12), each through `mixgrpo` as a user runs it: the exact
error line, the exit status, the files left untouched, the event written. docs/reliability.md is the table of
these cases; tests/core/test_reliability_doc.py keeps the two in step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mixgrpo.cli import main
from rewards import register_reward

TINY = ["sampler.num_steps=4", "window.size=2", "rollout.prompts_per_iteration=2", "rollout.group_size=2",
        "train.num_videos=1", "learner.micro_batch_size=4", "train.device=cpu", "train.threads=1",
        "train.sample_videos_per_iteration=0"]


@register_reward("always_fails", style="function")
def always_fails(videos, prompts, **metadata):
    raise RuntimeError("the reward server is down")


@register_reward("nan_for_first_group", style="function")
def nan_for_first_group(videos, prompts, **metadata):
    scores = videos.mean(dim=(1, 2, 3, 4))
    scores[:2] = float("nan")  # the whole first group (group_size 2)
    return scores


def run(tmp_path, *args, run_dir="run"):
    """`mixgrpo train` in-process; returns (exit status, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["train", *TINY, *args, "--run-dir", str(tmp_path / run_dir)])
    return status, err.getvalue()


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


BAD_VALUES = [
    ("learner.grad_clip=-1", "learner.grad_clip must be > 0 (the max gradient norm), got -1.0"),
    ("advantages.eps=-1", "advantages.eps must be > 0 (it keeps the std denominator positive), got -1.0"),
    ("sampler.eta=5", "sampler.eta must be in (0, 1]"),
    ("sampler.eta=1e6", "sampler.eta must be in (0, 1]"),
    ("sampler.eta=0", "sampler.eta must be in (0, 1]"),
    ("train.threads=-4", "train.threads must be >= 0"),
    ("train.num_videos=-1", "train.num_videos must be >= 0"),
    ("learner.lr=inf", "learner.lr must be a finite number, got inf"),
    ("train.iterations=2.5", "train.iterations must be an integer, got 2.5"),
    ("train.device=bogus", "train.device 'bogus' is not a device; use auto, cpu, cuda or cuda:N"),
    ("learner.weight_decay=-1", "learner.weight_decay must be >= 0, got -1.0"),
    ("learner.betas=[2,3]", "learner.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got [2, 3]"),
    ("name=../..", "name '../..' must be letters, digits, '.', '_' or '-'"),
    ("policy.weights=/nonexistent/toy.safetensors", "policy.weights: no such file '/nonexistent/toy.safetensors'"),
    ("rewards=[{name: no_such_reward}]", "rewards[0] (no_such_reward): unknown reward 'no_such_reward'; available:"),
    ("rewards=[{name: clip_score}]", "rewards[0] (clip_score): give exactly one of checkpoint (a local weights file) "
                                     "and random_init=true"),
    ("rewards=[{name: toy_fidelity, args: {bogus: 1}}]", "got an unexpected keyword argument 'bogus'"),
    ("prompts.source=nope.txt", "prompts.source: no such prompt file 'nope.txt'; give a text file"),
    ("learner.sharding=fsdp", "learner.sharding=fsdp shards over the ranks of the Ray worker groups; set "
                              "rollout.backend=ray with rollout.num_workers x rollout.sp_size > 1"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_are_one_line_before_anything_is_made(tmp_path, override, message):
    status, err = run(tmp_path, override)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixgrpo: config error: ") and message in lines[0], err
    assert not (tmp_path / "run").exists() and not list(tmp_path.parent.glob("*/runs"))


def test_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, err = run(tmp_path, "train.device=cuda")
    assert status == 2 and "train.device=cuda but this machine has no visible GPU; use train.device=cpu" in err
    assert not (tmp_path / "run").exists()


def test_a_yaml_syntax_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iterations: [3\n")
    assert main(["train", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mixgrpo: config error: config file '{bad}' is not valid YAML") and "line" in err


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("mine")
    status, err = run(tmp_path, "train.iterations=1")
    assert status == 2 and "is a file; give --run-dir a folder" in err
    assert (tmp_path / "run").read_text() == "mine"


def test_a_folder_that_is_not_a_run_directory_is_never_written_into(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("my own: file\n")
    status, err = run(tmp_path, "train.iterations=1")
    assert status == 2 and "is not empty and is not a mixgrpo run directory" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
    assert (tmp_path / "run" / "config.yaml").read_text() == "my own: file\n"


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path):
    assert run(tmp_path, "train.iterations=1")[0] == 0
    before = (tmp_path / "run" / "metrics.parquet").read_bytes()
    status, err = run(tmp_path, "train.iterations=1")
    assert status == 2 and "already holds a run's iterations; continue it with --resume" in err
    assert (tmp_path / "run" / "metrics.parquet").read_bytes() == before


def test_a_second_process_on_the_same_run_directory_exits_saying_who_holds_it(tmp_path):
    from mixgrpo.results.runlog import RunLog

    log = RunLog(tmp_path / "run")  # this process holds the lock, as a running `mixgrpo train` would
    try:
        done = subprocess.run([sys.executable, "-m", "mixgrpo", "train", *TINY, "train.iterations=1", "--run-dir",
                               str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 1
        assert f"run directory {tmp_path / 'run'} is in use by pid {os.getpid()} on host" in done.stderr
        assert not (tmp_path / "run" / "metrics.parquet").read_bytes() == b""  # ours, untouched
    finally:
        log.close()
    # A lock left by a process that died is taken over: flock dies with its process.
    assert run(tmp_path, "train.iterations=1", run_dir="run")[0] == 0


def test_resume_refuses_an_edited_config(tmp_path):
    assert run(tmp_path, "train.iterations=2", "train.checkpoint_every=1")[0] == 0
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.0006", "lr: 0.06"))
    status, err = run(tmp_path, "--resume")
    assert status == 2 and "was edited after the run started (it no longer matches config.sha256)" in err


def test_resume_deletes_only_inside_the_run_directory(tmp_path):
    assert run(tmp_path, "train.iterations=2", "train.checkpoint_every=1", "train.sample_videos_per_iteration=1")[0] == 0
    outside, absolute = tmp_path / "precious.mp4", tmp_path / "also_precious.mp4"
    outside.write_bytes(b"x")
    absolute.write_bytes(b"y")
    samples_path = tmp_path / "run" / "samples.parquet"
    samples = pd.read_parquet(samples_path)
    last = samples["iteration"] == 1
    inside = samples.loc[last & (samples["video_path"] != ""), "video_path"].tolist()
    samples.loc[last, "video_path"] = ["../precious.mp4", str(absolute)] + [""] * (int(last.sum()) - 2)
    samples.to_parquet(samples_path)
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "iter_000002")  # resume from iteration 1: row 1 is redone
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--resume"]) == 0
    assert outside.read_bytes() == b"x" and absolute.read_bytes() == b"y"
    assert inside  # (the run's own iteration-1 video was rewritten by the redo)


def test_a_reward_that_always_fails_under_drop_stops_the_run_with_the_reason(tmp_path):
    status, err = run(tmp_path, "train.iterations=6", "train.on_reward_error=drop", "train.max_failed_iterations=2",
                      "rewards=[{name: always_fails}]")
    assert status == 1
    assert "no group could be trained in 2 iterations in a row" in err
    training = [e["kind"] for e in events(tmp_path / "run") if e.get("phase") != "eval"]
    assert training.count("reward_failed") == 2 and training.count("no_trainable_group") == 2
    evaluation = [e for e in events(tmp_path / "run") if e.get("phase") == "eval"]
    assert evaluation and {(e["kind"], e["iteration"]) for e in evaluation} == {("reward_failed", -1)}  # the base's
    assert "the reward server is down" in json.dumps(events(tmp_path / "run"))


def test_nan_rewards_drop_their_group_with_an_event(tmp_path):
    assert run(tmp_path, "train.iterations=1", "rewards=[{name: nan_for_first_group}]")[0] == 0
    dropped = [e for e in events(tmp_path / "run") if e["kind"] == "group_dropped"]
    assert len(dropped) == 1 and "no reward scored" in dropped[0]["message"]


def test_a_missing_mp4_encoder_is_reported_once_and_the_run_completes(tmp_path, monkeypatch):
    import mixgrpo.results.media as media

    monkeypatch.setattr(media, "mp4_writer_missing", lambda: "imageio's ffmpeg plugin is not installed")
    status, err = run(tmp_path, "train.iterations=1", "train.sample_videos_per_iteration=1")
    assert status == 0
    assert [line for line in err.splitlines() if "contact sheets only" in line] == [
        "mixgrpo: videos are written as contact sheets only: imageio's ffmpeg plugin is not installed"]
    assert [e["kind"] for e in events(tmp_path / "run")].count("artefact_skipped") == 1
    assert not list((tmp_path / "run").rglob("*.mp4")) and (tmp_path / "run" / "videos" / "end_sheet.png").is_file()


def test_a_failed_optional_write_is_a_warning_and_an_event(tmp_path, monkeypatch):
    import mixgrpo.results.media as media

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(media, "contact_sheet", full_disk)
    status, err = run(tmp_path, "train.iterations=1")
    assert status == 0
    assert "mixgrpo: could not write the contact sheet: OSError: [Errno 28] No space left on device" in err.splitlines()
    assert "contact sheet" in [e["what"] for e in events(tmp_path / "run") if e["kind"] == "artefact_failed"]


@pytest.mark.parametrize("damage", ["empty_manifest", "pickle_in_safetensors"])
def test_a_damaged_checkpoint_is_one_line_and_nothing_is_executed(tmp_path, damage):
    assert run(tmp_path, "train.iterations=1")[0] == 0
    ckpt = tmp_path / "run" / "checkpoints" / "iter_000001"
    if damage == "empty_manifest":
        (ckpt / "manifest.json").write_text(json.dumps({"iteration": 1, "files": {}}))
        expected = "manifest.json lists no files"
    else:
        import hashlib
        import pickle

        marker = tmp_path / "executed"
        payload = pickle.dumps(_Exploit(str(marker)))
        (ckpt / "model.safetensors").write_bytes(payload)
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"]["model.safetensors"] = hashlib.sha256(payload).hexdigest()
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
        expected = "is not a safetensors file"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["sample", "--prompt", "a red circle moving left", "--checkpoint", str(ckpt), "--out",
                       str(tmp_path / "out")])
    errors = [line for line in err.getvalue().splitlines() if line.startswith("mixgrpo:")]
    assert status == 2 and len(errors) == 1 and expected in errors[0], err.getvalue()
    assert not (tmp_path / "executed").exists()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_checkpoint_files_all_have_one_mode(tmp_path):
    assert run(tmp_path, "train.iterations=1")[0] == 0
    ckpt = tmp_path / "run" / "checkpoints" / "iter_000001"
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpt.iterdir()}
    assert set(modes.values()) == {0o644}, modes


@register_reward("sleeps", style="function")
def sleeps(videos, prompts, **metadata):
    time.sleep(120)
    return videos.mean(dim=(1, 2, 3, 4))


def test_ctrl_c_stops_a_run_stuck_in_a_reward_within_seconds(tmp_path):
    code = ("import sys, time; from tests.core.test_reliability import sleeps; from mixgrpo.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *TINY, "train.iterations=5", "train.num_videos=0",
                             "rewards=[{name: sleeps}]", "--run-dir", str(tmp_path / "run")],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "config.yaml").is_file():  # written once the trainer is built
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        time.sleep(3.0)  # the toy rollout takes well under a second: the run is now waiting on the reward
        tick = time.time()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.time() - tick < 5, f"Ctrl-C took {time.time() - tick:.1f} s"
    assert proc.returncode == 130 and "interrupted; continue with --resume" in err
    assert events(tmp_path / "run")[-1]["kind"] == "interrupted"


def test_resume_without_an_intact_checkpoint_keeps_the_logged_iterations(tmp_path):
    assert run(tmp_path, "train.iterations=2", "train.checkpoint_every=1")[0] == 0
    for ckpt in (tmp_path / "run" / "checkpoints").iterdir():
        (ckpt / "manifest.json").unlink()  # every checkpoint damaged
    before = (tmp_path / "run" / "metrics.parquet").read_bytes()
    status, err = run(tmp_path, "--resume")
    assert status == 2 and "holds no intact checkpoint, but the run logged iterations up to 1; nothing was deleted" in err
    assert (tmp_path / "run" / "metrics.parquet").read_bytes() == before
