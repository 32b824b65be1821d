"""Weight-free rewards order synthetic videos the way their definitions say."""

from __future__ import annotations

import torch

import rewards


def _smooth_and_noise(t: int = 4) -> torch.Tensor:
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 1, 64).expand(1, t, 3, 64, 64)
    noise = torch.rand(1, t, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return torch.cat([ramp, noise]).contiguous()


def test_jpeg_compressibility_prefers_smooth_frames():
    scores = rewards.build("jpeg_compressibility")(_smooth_and_noise(), ["a", "b"])
    assert scores[0] > scores[1]
    assert scores[1] < -5.0  # 64x64x3 noise at quality 95 is several kB; DDPO's unit is kB
    incompressible = rewards.build("jpeg_compressibility", sign=1)(_smooth_and_noise(), ["a", "b"])
    torch.testing.assert_close(incompressible, -scores)


def test_temporal_flicker_prefers_static_video():
    g = torch.Generator().manual_seed(0)
    static = torch.rand(1, 1, 3, 16, 16, generator=g).expand(1, 6, 3, 16, 16)
    flicker = torch.rand(1, 6, 3, 16, 16, generator=g)
    scores = rewards.build("temporal_flicker")(torch.cat([static, flicker]), ["a", "b"])
    assert scores[0].item() == 1.0
    assert 0.0 < scores[1].item() < 0.8  # uniform noise: E|x - y| = 1/3
    alternating = torch.zeros(1, 4, 3, 8, 8)
    alternating[:, 1::2] = 1.0
    assert rewards.build("temporal_flicker")(alternating, ["c"]).item() == 0.0
