"""The real-size benchmark policy's code path at tiny sizes: real diffusers Wan VAE and transformers UMT5 classes."""

import torch

from policies.realsize import UMT5_XXL, build_realsize_policy, build_umt5

TINY_TEXT = dict(vocab_size=1000, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
TINY_DIT = dict(in_channels=4, out_channels=4, dim=24, ffn_dim=48, freq_dim=16, text_dim=16, text_len=16,
                num_heads=2, num_layers=2, rope_max_seq_len=64)


def test_umt5_xxl_architecture_numbers():
    assert (UMT5_XXL["d_model"], UMT5_XXL["num_layers"], UMT5_XXL["num_heads"], UMT5_XXL["d_ff"],
            UMT5_XXL["vocab_size"], UMT5_XXL["d_kv"]) == (4096, 24, 64, 10240, 256384, 64)


def test_tiny_realsize_policy_encodes_samples_and_decodes():
    policy = build_realsize_policy(preset="tiny", num_frames=5, height=32, width=32, dtype=torch.float32,
                                   text_overrides=TINY_TEXT, vae_overrides=TINY_VAE, text_len=16,
                                   transformer_overrides=TINY_DIT)
    states = policy.encode_text(["a red fox runs", "a boat"])
    assert states.shape == (2, 16, 16) and torch.isfinite(states).all()
    assert (states[1, 3:] == 0).all() and (states[1, :3] != 0).any()  # 2 words + </s>, zero past them
    again = build_umt5(dtype=torch.float32, max_length=16, seed=1, **TINY_TEXT)(["a red fox runs", "a boat"])
    assert torch.equal(states, again)  # seeded (the policy gives its encoder seed + 1): every process builds the same one
    assert policy.latent_shape() == (4, 2, 4, 4)
    latents = torch.randn(1, *policy.latent_shape())
    v = policy.velocity(latents, torch.tensor([0.5]), states[:1])
    assert v.shape == latents.shape
    videos = policy.decode(latents)
    assert videos.shape == (1, 5, 3, 32, 32) and videos.min() >= 0 and videos.max() <= 1
