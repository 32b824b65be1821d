"""Model-based rewards end to end on tiny random models loaded through the real loading code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rewards
from reward_fixtures import random_videos

PROMPTS = ["a red cat", "a blue dog"]


def test_clip_score_loads_checkpoint_and_matches_manual_cosine(tiny_open_clip):
    import open_clip

    args = {"arch": tiny_open_clip["arch"], "checkpoint": tiny_open_clip["checkpoint"]}
    reward = rewards.build("clip_score", **args, num_frames=2)
    videos = random_videos(2, t=5, h=32, w=32)
    scores = reward(videos, PROMPTS)
    saved = torch.load(tiny_open_clip["checkpoint"], weights_only=True)["state_dict"]
    for key, value in reward.model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    # Independent path: open_clip's own tokenizer and encoders on the two sampled frames (32 px: no resize).
    model, tok = reward.model, open_clip.get_tokenizer("tiny-clip-test")
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image((videos[:, [0, 4]].flatten(0, 1) - mean) / std, normalize=True).view(2, 2, -1)
        txt = model.encode_text(tok(PROMPTS), normalize=True)
    torch.testing.assert_close(scores, (img * txt[:, None]).sum(-1).mean(1), rtol=1e-5, atol=1e-6)
    assert scores.abs().max() <= 1.0


def test_hpsv2_uses_same_loading_path_and_rejects_missing_file(tiny_open_clip, tmp_path):
    args = {"arch": tiny_open_clip["arch"], "checkpoint": tiny_open_clip["checkpoint"]}
    videos = random_videos(2, h=40, w=56)  # non-square: exercises resize + center crop
    hps, clip = rewards.build("hpsv2", **args), rewards.build("clip_score", **args)
    torch.testing.assert_close(hps(videos, PROMPTS), clip(videos, PROMPTS))
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(ValueError, match=r"checkpoint=.*HPS_v2.1_compressed.pt.*not an existing file"):
        rewards.build("hpsv2", checkpoint=str(missing))
    with pytest.raises(ValueError, match="arch='ViT-Nope'"):
        rewards.build("hpsv2", arch="ViT-Nope", checkpoint=args["checkpoint"])(videos, PROMPTS)


def test_aesthetic_is_mlp_on_normalised_image_embedding(tiny_open_clip):
    reward = rewards.build("aesthetic", **tiny_open_clip, num_frames=1)
    videos = random_videos(2, t=1, h=32, w=32)
    scores = reward(videos, PROMPTS)
    emb = reward.encode_images(videos[:, 0])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(scores, reward.mlp(emb))
    saved = torch.load(tiny_open_clip["mlp_checkpoint"], weights_only=True)
    torch.testing.assert_close(reward.mlp.state_dict()["layers.7.weight"], saved["layers.7.weight"])


def test_pickscore_matches_transformers_processor_pipeline(tiny_pickscore):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    videos_u8 = (random_videos(2, t=1, h=32, w=32) * 255).round().to(torch.uint8)
    videos = videos_u8.float() / 255
    raw = rewards.build("pickscore", model_path=tiny_pickscore, normalize=False, num_frames=1)(videos, PROMPTS)
    normalised = rewards.build("pickscore", model_path=tiny_pickscore, num_frames=1)(videos, PROMPTS)
    torch.testing.assert_close(normalised, (raw - 18) / 8)
    # Reference: the stock processor on PIL images and CLIPModel's logits (= logit_scale * cos).
    processor = CLIPProcessor.from_pretrained(tiny_pickscore)
    model = CLIPModel.from_pretrained(tiny_pickscore).eval()
    images = [Image.fromarray(v[0].permute(1, 2, 0).numpy()) for v in videos_u8]
    inputs = processor(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**inputs).logits_per_image.diagonal()
    torch.testing.assert_close(raw, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="model_path="):
        rewards.build("pickscore", model_path=tiny_pickscore + "_missing")
