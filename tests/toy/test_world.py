"""Toy world: grammar, deterministic rendering, attributes distinguishable from pixels."""

import pytest
import torch

from policies.toy.world import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    Scene,
    all_scenes,
    eval_prompts,
    parse_caption,
    render_videos,
    train_prompts,
)


def test_captions_parse_back_and_splits_cover_every_word():
    scenes = all_scenes()
    assert len(scenes) == 48 and len(set(scenes)) == 48
    assert [parse_caption(s.caption) for s in scenes] == scenes
    assert parse_caption("  A Red Circle moving LEFT ") == Scene(colour="red", shape="circle", direction="left")
    train, held_out = train_prompts(), eval_prompts()
    assert not set(train) & set(held_out) and len(train) + len(held_out) == 48
    for prompts in (train, held_out):
        words = {w for p in prompts for w in p.split()}
        assert set(COLOURS) | set(SHAPES) | {"left", "right", "up", "down"} <= words


@pytest.mark.parametrize(
    "caption, fragment",
    [("a purple circle moving left", "'purple'"), ("a red circle moving", "4 words"), ("a red circle going up", "'going'")],
)
def test_bad_captions_name_the_problem(caption, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_caption(caption)


def test_rendering_is_deterministic_per_seed_and_jittered_across_seeds():
    prompts = ["a red circle moving left"] * 3
    a = render_videos(prompts, [0, 0, 1], num_frames=6, height=16, width=16)
    b = render_videos(prompts, [0, 0, 1], num_frames=6, height=16, width=16)
    assert a.shape == (3, 6, 3, 16, 16)
    assert torch.equal(a, b) and torch.equal(a[0], a[1])
    assert not torch.equal(a[0], a[2])
    assert a.min() >= 0 and a.max() <= 1


def _alpha_and_centroid(video_TCHW):
    diff = (video_TCHW - torch.tensor(BACKGROUND)[:, None, None]).norm(dim=1)  # [T, H, W]
    mask = (diff > 0.3).float()
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    mass = mask.sum(dim=(1, 2))
    return mask, (mask * xs).sum(dim=(1, 2)) / mass, (mask * ys).sum(dim=(1, 2)) / mass


@pytest.mark.parametrize("direction, sign_x, sign_y", [("left", -1, 0), ("right", 1, 0), ("up", 0, -1), ("down", 0, 1)])
def test_objects_move_in_the_asked_direction(direction, sign_x, sign_y):
    video = render_videos([f"a green square moving {direction}"], [3], num_frames=8)[0]
    _, cx, cy = _alpha_and_centroid(video)
    dx, dy = (cx[-1] - cx[0]).item(), (cy[-1] - cy[0]).item()
    for moved, sign in ((dx, sign_x), (dy, sign_y)):
        assert (moved > 3) if sign > 0 else (moved < -3) if sign < 0 else abs(moved) < 0.5


def test_colours_and_shapes_are_distinguishable_from_pixels():
    prompts = [f"a {c} {s} moving up" for c in COLOURS for s in SHAPES]
    videos = render_videos(prompts, [7] * len(prompts), num_frames=2)
    for video, prompt in zip(videos, prompts):
        colour, shape = prompt.split()[1:3]
        mask, _, _ = _alpha_and_centroid(video)
        frame = video[0].flatten(1)  # [C, H*W]
        core = frame[:, (frame - torch.tensor(BACKGROUND)[:, None]).norm(dim=0).argmax()]  # a fully covered pixel
        assert torch.allclose(core, torch.tensor(COLOURS[colour]), atol=1e-6)
        rows, cols = mask[0].nonzero(as_tuple=True)
        fill = mask[0].sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
        # Fill of the bounding box: square ~1, circle ~pi/4, triangle ~1/2 (coarse at 16 px).
        expected = {"square": (0.9, 1.01), "circle": (0.65, 0.85), "triangle": (0.35, 0.62)}[shape]
        assert expected[0] <= fill <= expected[1], (prompt, fill)


def test_render_rejects_mismatched_seeds_and_tiny_frames():
    with pytest.raises(ValueError, match="one seed per prompt"):
        render_videos(["a red circle moving left"], [0, 1])
    with pytest.raises(ValueError, match=">= 12 pixels"):
        render_videos(["a red circle moving left"], [0], height=8, width=8)
