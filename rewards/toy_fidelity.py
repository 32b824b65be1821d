"""``toy_fidelity``: a weight-free reward that checks a toy-world video against its caption.

Each caption ``"a <colour> <shape> moving <direction>"`` (grammar in ``policies.toy.world``) is checked from
pixels on three attributes, each scored in [0, 1] with partial credit so that RL has a slope to climb:

- colour: the object's fitted colour vs the asked colour, ``exp(-d^2 / (2 * colour_sigma^2))``.
- shape: per frame, the foreground alpha is compared (soft IoU) with a template of every shape placed at the
  measured centroid with the measured area; score = softmax probability of the asked shape over the IoUs
  (temperature ``shape_temperature``) times how well its template fits (IoU ramp from 0.2 to 0.8).
- direction: centroid motion (least-squares slope over frames) projected on the asked direction, as a fraction
  of the world's travel distance (full credit from ``direction_full_credit``), damped by sideways motion.

The total is the mean of the three. The foreground is measured colour-agnostically (distance from the known
background, then alpha by projection onto the estimated object colour), so a wrong colour does not blur the
shape or direction scores. Empty or pure-noise videos score near 0 on all three.

Shape legend: B = videos, T = frames, C = RGB, H, W = pixels, S = shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from policies.toy.world import (
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    SHAPE_AREA,
    SHAPES,
    expected_travel,
    parse_caption,
    shape_coverage,
    size_bounds,
)
from rewards.base import Reward, validate_details, validate_scores, validate_videos
from rewards.registry import register_reward

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "direction")


def background_checkerboard(videos_BTCHW: torch.Tensor, *, object_distance: float = 0.3) -> torch.Tensor:
    """``[B]`` strength of a 2x2 checkerboard on the background (the artefact of a pixel-space DiT with 2x2
    patches that drifts from its data): the mean absolute checkerboard coefficient ``(x00 + x11 - x01 - x10) / 4``
    of the 2x2 blocks whose pixels all stay within ``object_distance`` of the background colour. A clean rendered
    video scores ~0 (its background is flat, and its objects' edges are excluded)."""
    validate_videos(videos_BTCHW, [""] * videos_BTCHW.shape[0])
    videos = videos_BTCHW.float()
    b, t, c, h, w = videos.shape
    blocks = videos[..., : h - h % 2, : w - w % 2].reshape(b, t, c, h // 2, 2, w // 2, 2)
    coefficient = (blocks[..., 0, :, 0] + blocks[..., 1, :, 1] - blocks[..., 0, :, 1] - blocks[..., 1, :, 0]) / 4
    background = torch.tensor(BACKGROUND, dtype=videos.dtype)[:, None, None, None, None]
    distance = (blocks - background).norm(dim=2).amax(dim=(-1, -3))  # [B, T, H/2, W/2]: the block's farthest pixel
    mask = distance < object_distance
    strength = coefficient.abs().mean(dim=2)  # over colour channels
    return (strength * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1)


def foreground_alpha(videos_BTCHW: torch.Tensor, *, alpha_floor: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate the object's colour and per-pixel opacity.

    Returns:
        colour_BC: object colour, fitted by least squares to the alpha-composited pixels (the background
            colour when nothing stands out).
        alpha_BTHW: in [0, 1], 1 where the pixel is the object colour, 0 where it is background.
    """
    background_C = torch.tensor(BACKGROUND, dtype=videos_BTCHW.dtype, device=videos_BTCHW.device)
    diff_BTCHW = videos_BTCHW - background_C[:, None, None]
    # A rough mask first (distance from the background, ramped so faint noise counts little), squared so that
    # anti-aliased edge pixels, which mix in background, barely move the first colour estimate.
    rough_BTHW = ((diff_BTCHW.norm(dim=2) - 0.15) / 0.3).clamp(0.0, 1.0)
    weight_BTHW = rough_BTHW.square()
    for _ in range(3):
        offset_BC = (diff_BTCHW * weight_BTHW[:, :, None]).sum(dim=(1, 3, 4))
        offset_BC = offset_BC / weight_BTHW.square().sum(dim=(1, 2, 3)).clamp_min(1e-6)[:, None]
        # Alpha compositing: pixel = alpha * colour + (1 - alpha) * background, so alpha is the projection of
        # the pixel's offset onto the colour's offset; refitting the colour by least squares given alpha
        # removes the pull of edge pixels towards the background.
        norm_sq_B = offset_BC.square().sum(dim=1).clamp_min(1e-6)
        alpha_BTHW = torch.einsum("btchw,bc->bthw", diff_BTCHW, offset_BC) / norm_sq_B[:, None, None, None]
        weight_BTHW = alpha_BTHW.clamp(0.0, 1.0) * (rough_BTHW > 0)
    # Projections below alpha_floor are treated as background: sampling noise on a dark background would
    # otherwise add a haze of small alphas that inflates the area and blurs the shape.
    alpha_BTHW = ((alpha_BTHW - alpha_floor) / (1.0 - alpha_floor)).clamp(0.0, 1.0)
    return background_C + offset_BC, alpha_BTHW


def centroid_track(alpha_BTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centroid (pixel units, pixel centres at i + 0.5) and mass per frame: cx_BT, cy_BT, mass_BT."""
    h, w = alpha_BTHW.shape[-2:]
    ys = torch.arange(h, dtype=alpha_BTHW.dtype, device=alpha_BTHW.device) + 0.5
    xs = torch.arange(w, dtype=alpha_BTHW.dtype, device=alpha_BTHW.device) + 0.5
    mass_BT = alpha_BTHW.sum(dim=(2, 3))
    safe_BT = mass_BT.clamp_min(1e-6)
    cx_BT = (alpha_BTHW.sum(dim=2) * xs).sum(dim=-1) / safe_BT
    cy_BT = (alpha_BTHW.sum(dim=3) * ys).sum(dim=-1) / safe_BT
    return cx_BT, cy_BT, mass_BT


def shape_ious(
    alpha_BTHW: torch.Tensor, cx_BT: torch.Tensor, cy_BT: torch.Tensor, mass_BT: torch.Tensor
) -> torch.Tensor:
    """Soft IoU of the foreground with a template of each shape, averaged over frames: ``ious_BS``.

    Each template sits at the frame's centroid and has the frame's foreground area (clamped to the renderer's
    size range widened by 30% both ways, so a frame-filling smear cannot match a frame-filling square).
    """
    h, w = alpha_BTHW.shape[-2:]
    lo, hi = size_bounds(h, w)
    area_per_size_sq_S = torch.tensor([SHAPE_AREA[s] for s in SHAPES], dtype=alpha_BTHW.dtype)
    size_BTS = (mass_BT.cpu()[..., None] / area_per_size_sq_S).sqrt().clamp(0.7 * lo, 1.3 * hi)
    templates_BTSHW = shape_coverage(
        torch.arange(len(SHAPES)), cx_BT[..., None].cpu(), cy_BT[..., None].cpu(), size_BTS, height=h, width=w
    ).to(alpha_BTHW)
    a_BT1HW = alpha_BTHW[:, :, None]
    inter_BTS = torch.minimum(a_BT1HW, templates_BTSHW).sum(dim=(-2, -1))
    union_BTS = torch.maximum(a_BT1HW, templates_BTSHW).sum(dim=(-2, -1)).clamp_min(1e-6)
    return (inter_BTS / union_BTS).mean(dim=1)


def motion_displacement(cx_BT: torch.Tensor, cy_BT: torch.Tensor, mass_BT: torch.Tensor) -> torch.Tensor:
    """Least-squares straight-line displacement from first to last frame, ``[B, 2]`` (dx, dy) pixels.

    Frames are weighted by how much foreground they hold, so an empty frame cannot fake a jump.
    """
    t = cx_BT.shape[1]
    if t < 2:
        return cx_BT.new_zeros(cx_BT.shape[0], 2)
    w_BT = mass_BT / mass_BT.sum(dim=1, keepdim=True).clamp_min(1e-6)
    time_T = torch.linspace(0.0, 1.0, t, dtype=cx_BT.dtype, device=cx_BT.device)
    t_mean_B1 = (w_BT * time_T).sum(dim=1, keepdim=True)
    dt_BT = time_T - t_mean_B1
    var_B = (w_BT * dt_BT.square()).sum(dim=1).clamp_min(1e-6)
    slopes = [(w_BT * dt_BT * c_BT).sum(dim=1) / var_B for c_BT in (cx_BT, cy_BT)]
    return torch.stack(slopes, dim=1)


@register_reward("toy_fidelity")
class ToyFidelityReward(Reward):
    """Caption fidelity of toy-world videos; ``breakdown`` returns the per-attribute scores.

    ``score_with_details`` reports the attributes (keys ``ATTRIBUTES``) as component scores, so a run logs
    ``reward/toy_fidelity/colour/mean`` and the like next to the total.
    """

    name = "toy_fidelity"

    def __init__(
        self,
        *,
        colour_sigma: float = 0.2,
        shape_temperature: float = 0.025,
        direction_full_credit: float = 0.8,
        name: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        for field, value in (
            ("colour_sigma", colour_sigma),
            ("shape_temperature", shape_temperature),
            ("direction_full_credit", direction_full_credit),
        ):
            if not value > 0:
                raise ValueError(f"ToyFidelityReward {field} must be > 0, got {value}")
        self.colour_sigma = colour_sigma
        self.shape_temperature = shape_temperature
        self.direction_full_credit = direction_full_credit

    def breakdown(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Scores ``[B]`` in [0, 1] per attribute (keys ``ATTRIBUTES``) plus ``"total"`` (their mean)."""
        validate_videos(videos_BTCHW, prompts)
        videos_BTCHW = videos_BTCHW.float()
        scenes = [parse_caption(p) for p in prompts]
        device = videos_BTCHW.device
        h, w = videos_BTCHW.shape[-2:]

        colour_BC, alpha_BTHW = foreground_alpha(videos_BTCHW)
        target_BC = torch.tensor([COLOURS[s.colour] for s in scenes], device=device)
        colour_B = torch.exp(-(colour_BC - target_BC).square().sum(dim=1) / (2 * self.colour_sigma**2))

        cx_BT, cy_BT, mass_BT = centroid_track(alpha_BTHW)
        ious_BS = shape_ious(alpha_BTHW, cx_BT, cy_BT, mass_BT)
        shape_idx_B = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device)
        prob_B = torch.softmax(ious_BS / self.shape_temperature, dim=1).gather(1, shape_idx_B[:, None])[:, 0]
        fit_B = ((ious_BS.gather(1, shape_idx_B[:, None])[:, 0] - 0.2) / 0.6).clamp(0.0, 1.0)
        shape_B = prob_B * fit_B

        direction_B2 = torch.tensor([DIRECTIONS[s.direction] for s in scenes], device=device)
        move_B2 = motion_displacement(cx_BT, cy_BT, mass_BT) / expected_travel(h, w)
        along_B = (move_B2 * direction_B2).sum(dim=1)
        across_B = move_B2[:, 0] * direction_B2[:, 1] - move_B2[:, 1] * direction_B2[:, 0]
        direction_B = (along_B / self.direction_full_credit).clamp(0.0, 1.0) * torch.exp(-2.0 * across_B.square())

        scores = {"colour": colour_B, "shape": shape_B, "direction": direction_B}
        scores["total"] = torch.stack([scores[a] for a in ATTRIBUTES]).mean(dim=0)
        return scores

    def score(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        return self.breakdown(videos_BTCHW, prompts)["total"]

    def score_with_details(
        self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # One breakdown gives both the total and its parts; going through __call__ would compute it twice.
        validate_videos(videos_BTCHW, prompts)  # before .to(): a non-tensor must fail with the clear message
        if not self._is_setup:
            self.setup(self.device)
        with torch.no_grad():
            parts = self.breakdown(videos_BTCHW.to(self.device), list(prompts))
        b = videos_BTCHW.shape[0]
        total_B = validate_scores(parts["total"], b, self.name)
        return total_B, validate_details({a: parts[a] for a in ATTRIBUTES}, b, self.name)
