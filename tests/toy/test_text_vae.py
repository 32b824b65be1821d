"""Toy text encoder and pixel VAE."""

import pytest
import torch

from policies.toy.text import ToyTextEncoder, ToyTextEncoderConfig
from policies.toy.vae import ToyPixelVAE
from policies.toy.world import render_videos


def test_text_encoder_is_deterministic_and_distinguishes_prompts():
    torch.manual_seed(0)
    enc = ToyTextEncoder(ToyTextEncoderConfig(dim=16, max_words=6)).eval()
    prompts = ["a red circle moving left", "a red circle moving right", ""]
    a = enc(prompts)
    assert a.shape == (3, 6, 16) and a.dtype == torch.float32
    assert torch.equal(a, enc(prompts))
    # Case-insensitive; a batch of one may differ from a row of a batch of three in the last float32 bit (the matmul
    # kernel depends on the batch size on some CPUs), so equality is to rounding.
    torch.testing.assert_close(enc(["A RED circle moving left"]), a[:1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[0], a[2])
    # The empty prompt is all pad tokens: a real, finite state for CFG's negative branch.
    assert enc.token_ids([""]).eq(0).all() and a[2].isfinite().all()


def test_text_encoder_errors_name_the_word_and_the_fix():
    enc = ToyTextEncoder()
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        enc(["a purple circle moving left"])
    with pytest.raises(ValueError, match="shorten the prompt"):
        enc(["a red red red red red red circle"])
    with pytest.raises(ValueError, match=r"wrap it as \[prompt\]"):
        enc("a red circle moving left")
    with pytest.raises(ValueError, match="ToyTextEncoderConfig.num_heads"):
        ToyTextEncoderConfig(dim=10, num_heads=3)


def test_pixel_vae_round_trip_and_shapes():
    vae = ToyPixelVAE()
    videos = render_videos(["a blue triangle moving down", "a yellow square moving up"], [0, 1], num_frames=4)
    latents = vae.encode(videos)
    assert latents.shape == (2, 3, 4, 16, 16) == (2, *vae.latent_shape(4, 16, 16))
    assert latents.min() >= -1 and latents.max() <= 1
    assert torch.allclose(vae.decode(latents), videos, atol=1e-6)
    with pytest.raises(ValueError, match="C = 3"):
        vae.decode(latents.transpose(1, 2))
