"""The scoring service: config validation, failure policy, NaN reporting, non-blocking submit, Ray actors."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch

import rewards
from rewards import registry
from rewards.ensemble import RewardError, RewardSet, RewardSetConfig, chunk_bounds
from reward_fixtures import random_videos

PROMPTS = ["ok", "ok", "boom", "ok", "skip", "ok"]
GROUPS = [0, 0, 1, 1, 2, 2]
IDS = [f"s{i}" for i in range(6)]


@pytest.fixture
def test_rewards(monkeypatch):
    """'boom' raises on the prompt 'boom'; 'maybe' returns NaN for 'skip'."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))

    @rewards.register_reward("boom", style="function")
    def boom(videos, prompts, **metadata):
        if "boom" in prompts:
            raise RuntimeError("model exploded")
        return videos.mean(dim=(1, 2, 3, 4))

    @rewards.register_reward("maybe", style="trl")
    def maybe(prompts, completions=None, **kwargs):
        return [None if p == "skip" else 1.0 for p in prompts]


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="more than once"):
        RewardSetConfig(rewards=[{"name": "temporal_flicker"}, {"name": "temporal_flicker"}])
    with pytest.raises(ValueError, match="not registered.*mixgrpo.rewards"):
        RewardSetConfig(rewards=[{"name": "nope"}])
    with pytest.raises(ValueError, match="finite"):
        RewardSetConfig(rewards=[{"name": "temporal_flicker", "weight": math.inf}])
    with pytest.raises(ValueError, match="positive sum"):
        RewardSetConfig(rewards=[{"name": "temporal_flicker", "weight": 0.0}])
    with pytest.raises(ValueError, match="group_ids"):
        with RewardSet([{"name": "temporal_flicker"}], on_error="drop") as rs:
            rs.score(random_videos(6), PROMPTS, sample_ids=IDS)
    @dataclasses.dataclass
    class TrainerSpec:  # the trainer's own config dataclass with the same fields
        name: str
        weight: float = 1.0
        args: dict = dataclasses.field(default_factory=dict)

    config = RewardSetConfig(rewards=[TrainerSpec(name="temporal_flicker", weight=2.0)], device=torch.device("cpu"))
    with RewardSet.from_config(config) as rs:
        assert rs.weights == {"temporal_flicker": 2.0} and rs.config.device == "cpu"
    assert chunk_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)] and chunk_bounds(3, None) == [(0, 3)]


def test_raise_policy_names_reward_and_samples(test_rewards):
    expected = r"'boom' failed on samples \['s2', 's3'\].*model exploded"
    with RewardSet([{"name": "boom", "args": {"batch_size": 2}}]) as rs, pytest.raises(RewardError, match=expected):
        rs.score(random_videos(6), PROMPTS, sample_ids=IDS)


def test_drop_policy_drops_whole_groups_and_counts_nan(test_rewards):
    specs = [{"name": "boom", "weight": 2.0, "args": {"batch_size": 1}}, {"name": "maybe"}]
    videos = random_videos(6)
    with RewardSet(specs, on_error="drop") as rs:
        table = rs.score(videos, PROMPTS, sample_ids=IDS, group_ids=GROUPS)
    assert table.failed_ids == {"boom": ["s2"], "maybe": []}
    assert table.dropped_ids == ["s2", "s3"] and table.dropped_groups == [1]  # s3 shares s2's group
    assert table.keep_B.tolist() == [True, True, False, False, True, True]
    assert "model exploded" in table.errors["boom"]
    assert math.isnan(table.raw["boom"][2]) and not math.isnan(table.raw["boom"][3])
    torch.testing.assert_close(table.raw["boom"][[0, 1, 3]], videos[[0, 1, 3]].mean(dim=(1, 2, 3, 4)))
    assert table.nan_counts == {"boom": 0, "maybe": 1}  # failures are not counted as NaN returns
    assert table.weights == {"boom": 2.0, "maybe": 1.0}
    torch.testing.assert_close(table.aggregate[0], (2 * table.raw["boom"][0] + 1.0) / 3)
    # 'maybe' did not score sample 4: it keeps boom's share of the weighted sum (TRL's rule), nothing re-weighted
    torch.testing.assert_close(table.aggregate[4], 2 * table.raw["boom"][4] / 3)
    torch.testing.assert_close(table.aggregate[2], torch.tensor(1.0 / 3))  # boom failed there: maybe's share only
    assert table.nan_ids == {"boom": [], "maybe": ["s4"]}
    assert table.drop_reasons == {1: "reward 'boom' failed for sample 's2' under on_error=drop"}
    assert table.rows()[2]["dropped"] and table.rows()[0]["maybe"] == 1.0


def test_submit_does_not_block_the_caller(test_rewards, monkeypatch):
    release = threading.Event()

    @rewards.register_reward("slow", style="function")
    def slow(videos, prompts, **metadata):
        release.wait(timeout=30)
        return torch.zeros(videos.shape[0])

    with RewardSet([{"name": "slow"}, {"name": "temporal_flicker"}]) as rs:
        handle = rs.submit(random_videos(2), ["a", "b"], sample_ids=[0, 1])
        assert not handle.done()  # the caller is free to roll out the next batch here
        release.set()
        table = handle.result(timeout=30)
    assert handle.done() and table.raw["slow"].tolist() == [0.0, 0.0]


def test_config_rewards_are_the_scoring_service_specs():
    from mixgrpo.config import ConfigError, load_config

    cfg = load_config(None, ["rewards=[{name: temporal_flicker, weight: 2, backend: ray, num_gpus: 0.5}]"])
    assert cfg.rewards == [rewards.RewardSpec(name="temporal_flicker", weight=2.0, backend="ray", num_gpus=0.5)]
    for override, message in [
        ("rewards=[{name: temporal_flicker, weight: abc}]", r"^rewards\[0\]\.weight must be a number, got 'abc'$"),
        ("rewards=[{name: a, weight: .inf}]", r"^rewards\[0\]\.weight must be a finite number, got inf$"),
        ("rewards=[{name: a, backend: gpu}]", r"^rewards\[0\]\.backend must be one of \['local', 'ray'\], got 'gpu'$"),
        ("rewards=[{name: a, wieght: 1}]", r"^unknown config key rewards\[0\]\.wieght; did you mean "
         r"rewards\[0\]\.weight"),
        ("rewards=[{name: a, num_cpus: -1}]", r"^rewards\[0\]: rewards\['a'\]\.num_gpus and num_cpus must be >= 0"),
        ("train.reward_timeout_s=-1", r"^train\.reward_timeout_s must be >= 0 seconds \(0: no limit\), got -1"),
        ("train.max_failed_iterations=0", r"^train\.max_failed_iterations must be >= 1, got 0$"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    defaults = load_config(None, []).train
    assert defaults.reward_timeout_s == 600 and defaults.max_failed_iterations == 3


def test_metadata_reaches_the_rewards_that_accept_it(test_rewards):
    seen = {}

    @rewards.register_reward("plain", style="function")
    def plain(videos, prompts):  # takes no metadata: the fields are not forced on it
        return torch.zeros(videos.shape[0])

    @rewards.register_reward("named", style="function")
    def named(videos, prompts, *, level):
        seen["named"] = list(level)
        return torch.tensor([float(x) for x in level])

    @rewards.register_reward("declares")
    class Declares(rewards.Reward):
        def score(self, videos, prompts, colour=None):
            seen["declares"] = list(colour)
            return torch.tensor([float(c == "red") for c in colour])

    @rewards.register_reward("takes_all", style="function")
    def takes_all(videos, prompts, **fields):
        seen["takes_all"] = sorted(fields)
        return videos.float().mean(dim=(1, 2, 3, 4))

    # "videos" is also the name of the functions' first parameter, filled by position: it is not forced on them,
    # not even on a function that takes **kwargs
    metadata = {"level": [1, 2, 3], "colour": ["red", "blue", "red"], "videos": ["x", "y", "z"]}
    specs = [{"name": n} for n in ("plain", "named", "declares", "takes_all", "temporal_flicker")]
    with RewardSet(specs) as rs:
        table = rs.score(random_videos(3), ["a", "b", "c"], sample_ids=[0, 1, 2], metadata=metadata)
        with pytest.raises(ValueError, match=r"metadata field 'prompts' clashes.*rename that field"):
            rs.score(random_videos(3), ["a", "b", "c"], sample_ids=[0, 1, 2], metadata={"prompts": [1, 2, 3]})
    assert table.failures == [] and seen == {"named": [1, 2, 3], "declares": ["red", "blue", "red"],
                                             "takes_all": ["colour", "level"]}
    assert table.raw["named"].tolist() == [1.0, 2.0, 3.0] and table.raw["declares"].tolist() == [1.0, 0.0, 1.0]


def test_metadata_sliced_per_chunk(test_rewards):
    seen = []

    @rewards.register_reward("meta", style="trl")
    def meta(prompts, completions=None, level=None, **kwargs):
        seen.append(list(level))
        return [float(x) for x in level]

    with RewardSet([{"name": "meta", "args": {"batch_size": 2}}]) as rs:
        table = rs.score(random_videos(3), ["a", "b", "c"], sample_ids=[0, 1, 2], metadata={"level": [5, 6, 7]})
        with pytest.raises(ValueError, match=r"metadata\['level'\]"):
            rs.score(random_videos(3), ["a", "b", "c"], sample_ids=[0, 1, 2], metadata={"level": [5]})
    assert seen == [[5, 6], [7]] and table.raw["meta"].tolist() == [5.0, 6.0, 7.0]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_ray_actors_match_in_process(ray_cluster, tiny_open_clip):
    clip_args = {"arch": tiny_open_clip["arch"], "checkpoint": tiny_open_clip["checkpoint"], "batch_size": 2}
    specs = [
        {"name": "clip_score", "weight": 0.5, "args": clip_args, "num_cpus": 0.5},
        {"name": "toy_fidelity", "args": {"batch_size": 3}, "num_cpus": 0.5},  # reports component scores
    ]  # two actors only: each is a process importing torch, on a 2-core machine
    videos, ids = random_videos(5, h=32, w=32), list(range(5))
    prompts = [f"a {c} {s} moving {d}" for c, s, d in
               [("red", "square", "left"), ("blue", "circle", "up"), ("green", "triangle", "right"),
                ("yellow", "square", "down"), ("red", "circle", "right")]]
    # Ray runs a fractional-CPU actor with one torch thread; a matmul split over another number of threads sums in
    # another order (last-bit differences), so the in-process reference uses one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with RewardSet(specs) as local:
            want = local.score(videos, prompts, sample_ids=ids)
    finally:
        torch.set_num_threads(threads)
    with RewardSet([{**spec, "backend": "ray"} for spec in specs]) as remote:
        handle = remote.submit(videos, prompts, sample_ids=ids)
        got = handle.result(timeout=120)
    for name in want.names:
        torch.testing.assert_close(got.raw[name], want.raw[name], rtol=0, atol=0)
    assert got.nan_counts == want.nan_counts == {n: 0 for n in want.names}
    assert list(got.details["toy_fidelity"]) == ["colour", "shape", "direction"] and got.details["clip_score"] == {}
    for component, values in want.details["toy_fidelity"].items():
        torch.testing.assert_close(got.details["toy_fidelity"][component], values, rtol=0, atol=0)


def test_the_python_api_names_a_bad_spec_field():
    for spec, message in [
        ({"name": "toy_fidelity", "weight": "1"}, r"^rewards\['toy_fidelity'\]\.weight must be a number, got '1'$"),
        ({"name": "toy_fidelity", "num_gpus": None}, r"^rewards\['toy_fidelity'\]\.num_gpus must be a number"),
        ({"name": "toy_fidelity", "args": {"colour_sigmaa": 1}},
         r"^reward 'toy_fidelity' cannot take args \['colour_sigmaa'\].*it takes \['colour_sigma'"),
    ]:
        with pytest.raises(ValueError, match=message):
            RewardSet([spec])
