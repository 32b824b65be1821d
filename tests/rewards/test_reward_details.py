"""Component scores: Reward.score_with_details, their checks, and ScoreTable.details through the scoring service."""

from __future__ import annotations

import math

import pytest
import torch

import rewards
import rewards.toy_fidelity  # noqa: F401  (registers the reward)
from policies.toy.world import all_scenes, render_videos
from rewards import registry
from rewards.base import Reward, validate_details
from rewards.ensemble import RewardError, RewardSet
from reward_fixtures import random_videos

CAPTIONS = [s.caption for s in all_scenes()][:6]
GROUPS = [0, 0, 1, 1, 2, 2]


@pytest.fixture(scope="module")
def toy_videos() -> torch.Tensor:
    return render_videos(CAPTIONS, list(range(len(CAPTIONS))), num_frames=4, height=16, width=16)


class Parts(Reward):
    """Brightness with two components; raises on the prompt 'boom'; ``bad_shape`` returns a [B, 1] component."""

    def __init__(self, *, bad_shape: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_shape = bad_shape

    def score(self, videos_BTCHW, prompts, **metadata):
        return self.score_with_details(videos_BTCHW, prompts)[0]

    def score_with_details(self, videos_BTCHW, prompts, **metadata):
        if "boom" in prompts:
            raise RuntimeError("model exploded")
        red_B, green_B = videos_BTCHW[:, :, 0].mean(dim=(1, 2, 3)), videos_BTCHW[:, :, 1].mean(dim=(1, 2, 3))
        details = {"red": red_B[:, None] if self.bad_shape else red_B, "green": green_B}
        return (red_B + green_B) / 2, details


@pytest.fixture
def parts_reward(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    rewards.register_reward("parts")(Parts)


def test_toy_fidelity_details_equal_breakdown(toy_videos):
    reward = rewards.build("toy_fidelity")
    total, details = reward.score_with_details(toy_videos, CAPTIONS)
    parts = reward.breakdown(toy_videos, CAPTIONS)
    assert list(details) == ["colour", "shape", "direction"]
    for name, values in {"total": total, **details}.items():
        torch.testing.assert_close(values, parts[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank 5"):  # inputs are checked as by __call__
        reward.score_with_details(toy_videos[0], CAPTIONS[:1])


def test_reward_without_override_gives_no_details():
    reward = rewards.build("temporal_flicker")
    videos = random_videos(3)
    scores, details = reward.score_with_details(videos, ["a", "b", "c"])
    assert details == {} and torch.equal(scores, reward(videos, ["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # the default goes through __call__'s checks
        reward.score_with_details(videos * 2, ["a", "b", "c"])


def test_reward_set_gathers_details_and_rows(toy_videos):
    specs = [{"name": "toy_fidelity", "args": {"batch_size": 4}}, {"name": "temporal_flicker"}]
    with RewardSet(specs) as rs:  # 6 samples in chunks of 4 and 2
        table = rs.score(toy_videos, CAPTIONS, sample_ids=list(range(6)))
    parts = rewards.build("toy_fidelity").breakdown(toy_videos, CAPTIONS)
    assert set(table.details) == {"toy_fidelity", "temporal_flicker"} and table.details["temporal_flicker"] == {}
    for name in ("colour", "shape", "direction"):
        assert table.details["toy_fidelity"][name].dtype == torch.float32
        torch.testing.assert_close(table.details["toy_fidelity"][name], parts[name])
    row = table.rows()[5]
    assert row["toy_fidelity/shape"] == pytest.approx(float(parts["shape"][5]))
    assert list(row) == ["sample_id", "toy_fidelity", "temporal_flicker", "toy_fidelity/colour",
                         "toy_fidelity/shape", "toy_fidelity/direction", "dropped"]


def test_failed_chunk_leaves_nan_details_under_drop(parts_reward):
    videos, prompts = random_videos(6), ["ok", "ok", "boom", "ok", "ok", "ok"]
    with RewardSet([{"name": "parts", "args": {"batch_size": 2}}], on_error="drop") as rs:
        table = rs.score(videos, prompts, sample_ids=list(range(6)), group_ids=GROUPS)
    assert table.failed_ids == {"parts": [2, 3]} and table.keep_B.tolist() == [True, True, False, False, True, True]
    for name, channel in (("red", 0), ("green", 1)):
        values = table.details["parts"][name]
        assert values[2:4].isnan().all() and not values[[0, 1, 4, 5]].isnan().any()
        torch.testing.assert_close(values[[0, 1, 4, 5]], videos[[0, 1, 4, 5], :, channel].mean(dim=(1, 2, 3)))
    assert math.isnan(table.rows()[2]["parts/red"])


def test_bad_component_is_refused_naming_the_reward(parts_reward):
    with pytest.raises(ValueError, match=r"reward 'parts' component 'red' returned shape \(3, 1\)"):
        validate_details({"red": torch.zeros(3, 1)}, 3, "parts")
    with pytest.raises(ValueError, match=r"reward 'parts' returned component name 'a/b'.*identifier"):
        validate_details({"a/b": torch.zeros(3)}, 3, "parts")
    with pytest.raises(ValueError, match=r"reward 'parts' returned details of type list"):
        validate_details([torch.zeros(3)], 3, "parts")
    # Through the scoring service the bad output fails its call like any other error of the reward.
    with RewardSet([{"name": "parts", "args": {"bad_shape": True}}]) as rs, pytest.raises(
        RewardError, match=r"'parts' failed on samples \[0, 1\].*ValueError: reward 'parts' component 'red'"
    ):
        rs.score(random_videos(2), ["a", "b"], sample_ids=[0, 1])

