"""The toy world: one coloured shape moving in a straight line on a dark background.

Captions follow a fixed grammar, ``"a <colour> <shape> moving <direction>"``, e.g. ``"a red circle moving
left"``. ``render_videos`` draws them procedurally (anti-aliased by supersampling) with a seed that jitters
the object's size and path, so the same caption yields many videos. Everything is pure torch and vectorised
over the batch: rendering 64 videos of 8 x 16 x 16 takes a few milliseconds.

Shape legend: B = videos, T = frames, C = RGB channels, H, W = pixels, S = supersampled pixels per pixel.

Geometry (pixel units, origin at the top-left corner, y pointing down). Every shape is placed by its
centroid and scaled by a half-extent ``size``, so the reward can fit templates at a measured centroid:

- square: ``max(|dx|, |dy|) <= size``  (fills its bounding box)
- circle: ``dx^2 + dy^2 <= size^2``    (fills pi/4 of it)
- triangle: upright equilateral of height ``2 * size``, apex up (fills 1/2 of it)

The object travels ``travel_fraction * min(H, W)`` pixels in a straight line from the first to the last frame.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    # Pairwise RGB distances are >= 0.7, so colour is unambiguous from a mean pixel.
    "red": (0.92, 0.12, 0.12),
    "green": (0.12, 0.85, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {
    # Unit vectors (dx, dy) in image coordinates: y grows downwards, so "up" is -y.
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
BACKGROUND: tuple[float, float, float] = (0.04, 0.04, 0.06)
ARTICLE = "a"
VERB = "moving"
VOCABULARY: tuple[str, ...] = (ARTICLE, VERB, *COLOURS, *SHAPES, *DIRECTIONS)

# Half-extent and travel as fractions of min(H, W); chosen so the biggest triangle can make its whole trip
# inside the frame.
SIZE_RANGE: tuple[float, float] = (0.15, 0.21)
TRAVEL_FRACTION = 0.35
_TRIANGLE_HALF_WIDTH = 2.0 / math.sqrt(3.0)  # equilateral: half base = height / sqrt(3), height = 2 * size
_EXTENT_ABOVE = 4.0 / 3.0  # the triangle's apex is 2/3 of its height above its centroid (in units of size)
SHAPE_AREA: dict[str, float] = {"square": 4.0, "circle": math.pi, "triangle": 2.0 * _TRIANGLE_HALF_WIDTH}
"""Area of each shape divided by size^2."""


@dataclass(frozen=True)
class Scene:
    """One caption of the grammar."""

    colour: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        for field, allowed in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"Scene.{field} = {value!r} is not in the toy grammar; use one of {list(allowed)}")

    @property
    def caption(self) -> str:
        return f"{ARTICLE} {self.colour} {self.shape} {VERB} {self.direction}"


def parse_caption(caption: str) -> Scene:
    """Inverse of ``Scene.caption``; case and surrounding whitespace are ignored.

    Raises ValueError naming the first word that does not fit the grammar.
    """
    words = caption.lower().split()
    template = f"'{ARTICLE} <colour> <shape> {VERB} <direction>'"
    if len(words) != 5:
        raise ValueError(f"toy caption {caption!r} has {len(words)} words; write it as {template}")
    slots = ((ARTICLE,), tuple(COLOURS), SHAPES, (VERB,), tuple(DIRECTIONS))
    for position, (word, allowed) in enumerate(zip(words, slots)):
        if word not in allowed:
            raise ValueError(
                f"toy caption {caption!r}: word {position + 1} is {word!r}, expected one of {list(allowed)}; "
                f"write it as {template}"
            )
    return Scene(colour=words[1], shape=words[2], direction=words[4])


def all_scenes() -> list[Scene]:
    """Every caption of the grammar (4 colours x 3 shapes x 4 directions = 48), in a fixed order."""
    return [Scene(colour=c, shape=s, direction=d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


def _is_held_out(scene: Scene) -> bool:
    # A diagonal through the (colour, shape, direction) grid: 12 combinations, and every single attribute
    # value still appears in training, so evaluation tests composition rather than unseen words.
    i = list(COLOURS).index(scene.colour) + SHAPES.index(scene.shape) + list(DIRECTIONS).index(scene.direction)
    return i % 4 == 0


def train_prompts() -> list[str]:
    """The 36 captions used for pretraining and RL."""
    return [s.caption for s in all_scenes() if not _is_held_out(s)]


def eval_prompts() -> list[str]:
    """The 12 held-out captions: new combinations of known colours, shapes and directions."""
    return [s.caption for s in all_scenes() if _is_held_out(s)]


def shape_coverage(
    shape_ids: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    size: torch.Tensor,
    *,
    height: int,
    width: int,
    supersample: int = 4,
) -> torch.Tensor:
    """Fraction of each pixel covered by a shape, in [0, 1].

    Args:
        shape_ids, cx, cy, size: broadcastable tensors of any shape ``[*]``: index into ``SHAPES``, centroid
            (pixels) and half-extent (pixels).
        supersample: sub-samples per pixel side; coverage is the fraction of sub-samples inside the shape.

    Returns:
        coverage ``[*, H, W]`` float.
    """
    shape_ids, cx, cy, size = torch.broadcast_tensors(shape_ids, cx.float(), cy.float(), size.float())
    sub = (torch.arange(supersample, dtype=torch.float32) + 0.5) / supersample
    ys = (torch.arange(height, dtype=torch.float32)[:, None] + sub).reshape(-1)  # [H*S]
    xs = (torch.arange(width, dtype=torch.float32)[:, None] + sub).reshape(-1)  # [W*S]
    dy = ys.view(*([1] * cx.ndim), -1, 1) - cy[..., None, None]
    dx = xs.view(*([1] * cx.ndim), 1, -1) - cx[..., None, None]
    s = size[..., None, None]
    square = torch.maximum(dx.abs(), dy.abs()) <= s
    circle = dx * dx + dy * dy <= s * s
    # Upright triangle: below the apex line y >= -4/3 s, above the base y <= 2/3 s, and inside the sides,
    # whose half-width grows linearly from 0 at the apex to half_base at the base.
    depth = (dy + _EXTENT_ABOVE * s) / (2.0 * s)
    triangle = (dy <= (2.0 - _EXTENT_ABOVE) * s) & (depth >= 0) & (dx.abs() <= _TRIANGLE_HALF_WIDTH * s * depth)
    ids = shape_ids[..., None, None]
    inside = torch.where(ids == 0, square, torch.where(ids == 1, circle, triangle))
    inside = inside.float().unflatten(-2, (height, supersample)).unflatten(-1, (width, supersample))
    return inside.mean(dim=(-3, -1))


def expected_travel(height: int, width: int) -> float:
    """Pixels the object travels from the first to the last frame."""
    return TRAVEL_FRACTION * min(height, width)


def size_bounds(height: int, width: int) -> tuple[float, float]:
    """Smallest and largest half-extent (pixels) the renderer draws."""
    return SIZE_RANGE[0] * min(height, width), SIZE_RANGE[1] * min(height, width)


def sample_paths(
    scenes: Sequence[Scene], seeds: Sequence[int], *, num_frames: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-seed jittered size and straight path of each scene.

    Returns:
        cx_BT, cy_BT: centroid per frame (pixels); size_B: half-extent (pixels).
    """
    travel = expected_travel(height, width)
    lo_size, hi_size = size_bounds(height, width)
    cx_rows, cy_rows, sizes = [], [], []
    t = torch.linspace(0.0, 1.0, num_frames) if num_frames > 1 else torch.zeros(1)
    for scene, seed in zip(scenes, seeds):
        gen = torch.Generator().manual_seed(int(seed))
        u = torch.rand(3, generator=gen)
        size = lo_size + (hi_size - lo_size) * u[0].item()
        # The largest extent from the centroid is the triangle's apex; keep it inside the frame for all shapes.
        margin = _EXTENT_ABOVE * size
        ux, uy = DIRECTIONS[scene.direction]
        start, end = [], []
        for axis_len, along, r in ((width, ux, u[1].item()), (height, uy, u[2].item())):
            span = travel * abs(along)
            mid = margin + span / 2 + r * max(axis_len - 2 * margin - span, 0.0)
            start.append(mid - along * travel / 2)
            end.append(mid + along * travel / 2)
        cx_rows.append(start[0] + (end[0] - start[0]) * t)
        cy_rows.append(start[1] + (end[1] - start[1]) * t)
        sizes.append(size)
    return torch.stack(cx_rows), torch.stack(cy_rows), torch.tensor(sizes)


def render_videos(
    prompts: Sequence[str], seeds: Sequence[int], *, num_frames: int = 8, height: int = 16, width: int = 16
) -> torch.Tensor:
    """Render one video per caption.

    Args:
        prompts: captions of the grammar (see ``parse_caption``).
        seeds: one int per caption; same (caption, seed) -> bit-identical video.

    Returns:
        videos_BTCHW float in [0, 1].
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"render_videos got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed per prompt")
    for field, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if value < 1:
            raise ValueError(f"render_videos {field} must be >= 1, got {value}")
    if min(height, width) < 12:
        raise ValueError(f"render_videos needs height and width >= 12 pixels to draw shapes, got {height}x{width}")
    scenes = [parse_caption(p) for p in prompts]
    cx_BT, cy_BT, size_B = sample_paths(scenes, seeds, num_frames=num_frames, height=height, width=width)
    shape_B = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    alpha_BTHW = shape_coverage(shape_B[:, None], cx_BT, cy_BT, size_B[:, None], height=height, width=width)
    colour_BC = torch.tensor([COLOURS[s.colour] for s in scenes])
    background_C = torch.tensor(BACKGROUND)
    alpha_BT1HW = alpha_BTHW[:, :, None]
    return alpha_BT1HW * colour_BC[:, None, :, None, None] + (1 - alpha_BT1HW) * background_C[:, None, None]
