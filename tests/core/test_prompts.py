"""Prompt files: plain text and JSONL, whose extra fields reach TRL-style reward functions as keyword arguments."""

from __future__ import annotations

import json
import math

import pytest
import torch

import rewards
from mixgrpo.algo.advantages import advantages_from_scores
from mixgrpo.config import PromptConfig
from mixgrpo.driver.prompts import Prompt, field_names, load_prompts, prompt_metadata, read_prompt_file
from policies.toy import world
from rewards import registry
from rewards.ensemble import RewardSet


def test_text_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog  \n")
    assert read_prompt_file(path) == [Prompt("a cat"), Prompt("a dog")]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="no such prompt file.*jsonl"):
        read_prompt_file(tmp_path / "missing.txt")


def test_jsonl_file_keeps_the_extra_fields(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a red circle", "colour": "red", "level": 2}\n\n{"prompt": "a square"}\n')
    assert read_prompt_file(path) == [Prompt("a red circle", {"colour": "red", "level": 2}), Prompt("a square")]


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "a cat",}', r"line 2 is not valid JSON \(.* at column \d+\); write one JSON object per line"),
    ('["a cat"]', r"line 2 holds a JSON list, not an object"),
    ('{"text": "a cat"}', r"line 2 has no \"prompt\" string \(keys: \['text'\]\); give each object a non-empty"),
    ('{"prompt": ""}', r"line 2 has no \"prompt\" string"),
    ('{"prompt": "a cat", "completions": 1}', r"line 2 has fields \['completions'\].*rename them"),
])
def test_a_bad_jsonl_line_is_named_with_its_fix(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"prompts: '{path}' " + problem):
        read_prompt_file(path)


def test_a_prompt_file_that_is_not_utf8_is_named_with_its_fix(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("a caf\u00e9 scene\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"prompts: '{path}' is not UTF-8 text \\(byte 5\\); save it as UTF-8"):
        read_prompt_file(path)


def test_load_prompts_from_the_config(tmp_path):
    assert load_prompts(PromptConfig()) == [Prompt(p) for p in world.train_prompts()]
    assert load_prompts(PromptConfig(), eval=True) == [Prompt(p) for p in world.eval_prompts()]
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a cat", "id": 7}\n')
    config = PromptConfig(source=str(path), eval_source=str(path))
    assert load_prompts(config, eval=True) == [Prompt("a cat", {"id": 7})]


def test_prompt_metadata_aligns_fields_with_samples():
    prompts = [Prompt("a", {"x": 1}), Prompt("a", {"x": 1}), Prompt("b", {"y": "z"})]
    assert prompt_metadata(prompts) == {"x": [1, 1, None], "y": [None, None, "z"]}
    assert prompt_metadata([Prompt("a")]) == {}
    assert prompt_metadata([Prompt("a")], field_names(prompts)) == {"x": [None], "y": [None]}  # the set's fields


def test_jsonl_fields_reach_a_trl_reward_end_to_end(tmp_path, monkeypatch):
    """A JSONL file -> prompts -> GRPO groups -> RewardSet metadata -> a TRL-style function reading a field."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))

    @rewards.register_reward("near_brightness", style="trl")
    def near_brightness(prompts, completions=None, target=None, **kwargs):
        # TRL style: one value per sample in each keyword; None where the field does not apply
        return [None if t is None else -abs(float(video.mean()) - t) for video, t in zip(completions, target)]

    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a dim scene", "target": 0.2}, {"prompt": "a bright scene", "target": 0.8},
             {"prompt": "any scene"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    drawn = load_prompts(PromptConfig(source=str(path)))
    group_size = 2
    per_sample = [p for p in drawn for _ in range(group_size)]  # each group's prompt repeated for its members
    group_ids = [g for g in range(len(drawn)) for _ in range(group_size)]
    videos = torch.rand(len(per_sample), 2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    specs = [{"name": "near_brightness"}, {"name": "temporal_flicker"}]
    with RewardSet(specs, on_error="drop") as rs:
        table = rs.score(videos, [p.text for p in per_sample], sample_ids=list(range(6)), group_ids=group_ids,
                         metadata=prompt_metadata(per_sample))
    means = videos.mean(dim=(1, 2, 3, 4))
    expected = [-abs(float(means[i]) - t) for i, t in enumerate([0.2, 0.2, 0.8, 0.8])]
    torch.testing.assert_close(table.raw["near_brightness"][:4], torch.tensor(expected))
    assert math.isnan(table.raw["near_brightness"][4]) and table.nan_ids == {"near_brightness": [4, 5],
                                                                              "temporal_flicker": []}
    report = advantages_from_scores(table.raw, group_ids, weights=table.weights, dropped=table.drop_reasons)
    assert report.keep.all() and report.dropped == []  # the third group is trained on temporal_flicker alone
