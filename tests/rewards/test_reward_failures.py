"""Failure semantics of the scoring service: events, timeouts, Ctrl-C, Ray actors replaced after a timeout."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import rewards
from mixgrpo.algo.advantages import advantages_from_scores
from rewards import registry
from rewards.ensemble import RewardError, RewardFailure, RewardSet
from reward_fixtures import random_videos

REPO = Path(__file__).resolve().parents[2]
GROUPS = [0, 0, 1, 1]


@pytest.fixture
def release(monkeypatch):
    """Registers 'boom' (raises on the prompt 'boom'), 'always' (always raises), 'maybe' (None for 'skip') and
    'sleepy' (waits for this event, up to 30 s, when a prompt is 'sleep'); set at teardown so no thread lingers."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    event = threading.Event()

    @rewards.register_reward("boom", style="function")
    def boom(videos, prompts):
        if "boom" in prompts:
            raise RuntimeError("model exploded")
        return videos.mean(dim=(1, 2, 3, 4))

    @rewards.register_reward("always", style="function")
    def always(videos, prompts):
        raise RuntimeError("no model here")

    @rewards.register_reward("maybe", style="trl")
    def maybe(prompts, completions=None, **kwargs):
        return [None if p == "skip" else float(len(p)) for p in prompts]

    @rewards.register_reward("sleepy", style="function")
    def sleepy(videos, prompts):
        if "sleep" in prompts:
            event.wait(timeout=30)
        return videos.mean(dim=(1, 2, 3, 4))

    yield event
    event.set()


def score_and_advantages(specs, prompts, **kwargs):
    with RewardSet(specs, on_error="drop", **kwargs) as rs:
        table = rs.score(random_videos(len(prompts)), prompts, sample_ids=[f"s{i}" for i in range(len(prompts))],
                         group_ids=GROUPS)
    report = advantages_from_scores(table.raw, GROUPS, weights=table.weights, dropped=table.drop_reasons)
    return table, report


def test_events_of_one_reward_failing_under_drop(release):
    table, report = score_and_advantages([{"name": "boom", "args": {"batch_size": 1}}, {"name": "maybe"}],
                                         ["ok", "boom", "okay", "ok!"])
    reason = "reward 'boom' failed for sample 's1' under on_error=drop"
    assert table.events() + report.events() == [
        ("reward_failed", {"reward": "boom", "samples": ["s1"], "error": "RuntimeError: model exploded",
                           "timed_out": False,
                           "message": "reward 'boom' failed on samples ['s1']: RuntimeError: model exploded"}),
        ("group_dropped", {"group": 0, "reason": reason, "samples": 2,
                           "message": f"group 0 (2 samples) dropped: {reason}"}),
    ]
    assert report.keep.tolist() == [False, False, True, True]


def test_events_of_a_reward_returning_none_keep_the_group(release):
    table, report = score_and_advantages([{"name": "boom"}, {"name": "maybe"}], ["ok", "skip", "okay", "ok!"])
    assert table.events() + report.events() == [
        ("reward_nan", {"reward": "maybe", "count": 1, "samples": ["s1"],
                        "message": "reward 'maybe' returned None/NaN for 1 sample ['s1']; they keep the other "
                                   "rewards' scores"}),
    ]
    assert report.keep.all() and report.dropped == []  # the old rule dropped group 0 whole, silently
    assert report.advantages[1] != 0  # s1 still gets boom's part of the advantage


def test_events_of_every_reward_failing(release):
    table, report = score_and_advantages([{"name": "always", "args": {"batch_size": 2}}], ["a", "b", "c", "d"])
    reasons = ["reward 'always' failed for samples 's0', 's1' under on_error=drop",
               "reward 'always' failed for samples 's2', 's3' under on_error=drop"]
    assert table.events() + report.events() == [
        ("reward_failed", {"reward": "always", "samples": ["s0", "s1"], "error": "RuntimeError: no model here",
                           "timed_out": False,
                           "message": "reward 'always' failed on samples ['s0', 's1']: RuntimeError: no model here"}),
        ("reward_failed", {"reward": "always", "samples": ["s2", "s3"], "error": "RuntimeError: no model here",
                           "timed_out": False,
                           "message": "reward 'always' failed on samples ['s2', 's3']: RuntimeError: no model here"}),
        ("group_dropped", {"group": 0, "reason": reasons[0], "samples": 2,
                           "message": f"group 0 (2 samples) dropped: {reasons[0]}"}),
        ("group_dropped", {"group": 1, "reason": reasons[1], "samples": 2,
                           "message": f"group 1 (2 samples) dropped: {reasons[1]}"}),
        ("no_trainable_group", {"groups": 2, "dropped_groups": 2, "zero_std_groups": 0,
                                "reason": f"2 of 2 groups dropped (group 0: {reasons[0]})",
                                "message": f"no group could be trained in this iteration: 2 of 2 groups dropped "
                                           f"(group 0: {reasons[0]})"}),
    ]
    assert not report.trainable


def test_a_timeout_under_raise_names_the_reward_and_the_fix(release):
    with RewardSet([{"name": "sleepy"}], timeout_s=1) as rs:
        start = time.perf_counter()
        with pytest.raises(RewardError, match=r"reward 'sleepy' timed out after 1 s on samples \[0, 1\]; raise the "
                                              r"limit .*train\.reward_timeout_s.*0 = no limit") as info:
            rs.score(random_videos(2), ["sleep", "ok"], sample_ids=[0, 1])
        assert time.perf_counter() - start < 2.5
    assert info.value.event() == ("reward_failed", {
        "reward": "sleepy", "samples": [0, 1], "error": "TimeoutError: no scores after 1 s", "timed_out": True,
        "message": "reward 'sleepy' timed out on samples [0, 1]: TimeoutError: no scores after 1 s"})


def test_a_timeout_under_drop_drops_the_group_and_the_next_call_is_not_queued_behind_it(release):
    videos = random_videos(4)
    specs = [{"name": "sleepy", "args": {"batch_size": 2}}, {"name": "temporal_flicker"}]
    with RewardSet(specs, on_error="drop", timeout_s=1) as rs:
        start = time.perf_counter()
        table = rs.score(videos, ["sleep", "ok", "ok", "ok"], sample_ids=[0, 1, 2, 3], group_ids=GROUPS)
        assert time.perf_counter() - start < 2.5  # one timeout; the other calls ran on at once
        assert not release.is_set()  # the stuck call is still sleeping in its abandoned thread
    assert table.failures == [RewardFailure(reward="sleepy", sample_ids=[0, 1], error="TimeoutError: no scores after "
                                            "1 s", timed_out=True)]
    torch.testing.assert_close(table.raw["sleepy"][2:], videos[2:].mean(dim=(1, 2, 3, 4)))
    assert table.raw["temporal_flicker"].isfinite().all()
    assert table.drop_reasons == {0: "reward 'sleepy' timed out for samples 0, 1 under on_error=drop"}
    report = advantages_from_scores(table.raw, GROUPS, weights=table.weights, dropped=table.drop_reasons)
    assert report.keep.tolist() == [False, False, True, True]


def test_timeout_must_be_a_non_negative_number():
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds >= 0 \(0: no limit\)"):
        RewardSet([{"name": "temporal_flicker"}], timeout_s=-1)


SCORE_FOREVER = textwrap.dedent("""
    import time
    import torch
    from rewards import RewardSet, register_reward

    @register_reward("stuck", style="function")
    def stuck(videos, prompts):
        time.sleep(120)
        return videos.mean(dim=(1, 2, 3, 4))

    with RewardSet([{"name": "stuck"}]) as reward_set:  # no timeout: only Ctrl-C ends the wait
        print("scoring", flush=True)
        reward_set.score(torch.rand(2, 1, 3, 4, 4), ["a", "b"], sample_ids=[0, 1])
""")


def test_ctrl_c_stops_a_scoring_call_within_seconds():
    proc = subprocess.Popen([sys.executable, "-c", SCORE_FOREVER], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "scoring"
        time.sleep(1.0)  # the reward is now sleeping in its thread
        start = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        elapsed = time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
    assert elapsed < 5, f"Ctrl-C took {elapsed:.1f} s"
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr.read()


def test_ray_backend_needs_ray_initialised():
    import ray

    if ray.is_initialized():
        pytest.skip("another test left Ray running in this process")
    with pytest.raises(RuntimeError, match=r"rewards \['temporal_flicker'\] have backend 'ray' but Ray is not "
                                           r"initialised; call ray.init\(\)"):
        RewardSet([{"name": "temporal_flicker", "backend": "ray"}])


PLUGIN = textwrap.dedent('''
    import time
    from rewards import Reward

    class Sleepy(Reward):
        """Sleeps for a minute when a prompt is 'sleep': a reward stuck on its actor."""

        def score(self, videos, prompts, **metadata):
            if "sleep" in prompts:
                time.sleep(60)
            return videos.mean(dim=(1, 2, 3, 4))
''')


@pytest.fixture(scope="module")
def ray_with_plugin(tmp_path_factory):
    """A local Ray cluster whose workers find a reward plugin (a module + dist-info entry point) on PYTHONPATH."""
    import os

    import ray

    root = tmp_path_factory.mktemp("plugin")
    (root / "sleepy_reward_plugin.py").write_text(PLUGIN)
    info = root / "sleepy_reward_plugin-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sleepy-reward-plugin\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[mixgrpo.rewards]\nsleepy_actor = sleepy_reward_plugin:Sleepy\n")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(root))
    registry.refresh_entry_points()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    monkeypatch.undo()
    registry.refresh_entry_points()


@pytest.mark.ray
def test_ray_reward_over_the_timeout_gets_a_new_actor(ray_with_plugin):
    videos = random_videos(4, h=16, w=16)
    specs = [{"name": "sleepy_actor", "backend": "ray", "num_cpus": 0.5, "args": {"batch_size": 2}},
             {"name": "temporal_flicker"}]  # a set may mix backends: this one runs in-process
    with RewardSet(specs, on_error="drop", timeout_s=3) as rs:
        start = time.perf_counter()
        table = rs.score(videos, ["sleep", "ok", "ok", "ok"], sample_ids=[0, 1, 2, 3], group_ids=GROUPS)
        first = time.perf_counter() - start
        again = rs.score(videos, ["ok"] * 4, sample_ids=[0, 1, 2, 3], group_ids=GROUPS)
    assert [(f.reward, f.sample_ids, f.timed_out) for f in table.failures] == [("sleepy_actor", [0, 1], True)]
    # the second chunk ran on the rebuilt actor; a stuck actor would have held it for a minute
    assert first < 40, f"scoring took {first:.1f} s"
    torch.testing.assert_close(table.raw["sleepy_actor"][2:], videos[2:].mean(dim=(1, 2, 3, 4)))
    torch.testing.assert_close(again.raw["sleepy_actor"], videos.mean(dim=(1, 2, 3, 4)))
    flicker = rewards.build("temporal_flicker")(videos, ["ok"] * 4)
    torch.testing.assert_close(table.raw["temporal_flicker"], flicker)
    assert again.failures == [] and table.drop_reasons == {
        0: "reward 'sleepy_actor' timed out for samples 0, 1 under on_error=drop"}
