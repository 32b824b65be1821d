"""build_wan_policy on a tiny diffusers-format Wan2.1 folder saved to tmp (random weights, no downloads)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from policies.base import FlowPolicy
from policies.text import WAN_NEGATIVE_PROMPT
from policies.wan import WanPolicyConfig, build_wan_policy
from tests.policies.test_text_vae import save_tiny_tokenizer, tiny_umt5, tiny_wan_vae

TEXT_DIM = 32
VIDEO = dict(num_frames=5, height=32, width=32)  # latents [16, 2, 4, 4] -> a 2 x 2 x 2 patch grid


def tiny_wan_transformer(num_layers: int, head_dim: int = 12) -> WanTransformer3DModel:
    torch.manual_seed(1)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32,
    ).eval()


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """What a diffusers Wan2.1 model folder holds, at toy size."""
    root = tmp_path_factory.mktemp("wan_model")
    tiny_wan_transformer(num_layers=4).save_pretrained(root / "transformer")
    tiny_umt5(d_model=TEXT_DIM).save_pretrained(root / "text_encoder")
    save_tiny_tokenizer(root / "tokenizer")
    tiny_wan_vae().save_pretrained(root / "vae")
    return root


def test_model_dir_gives_a_working_policy_with_wans_weights(wan_folder):
    policy = build_wan_policy(model_dir=str(wan_folder), layout="full", dtype="float32", text_len=16, **VIDEO)
    assert isinstance(policy, FlowPolicy) and policy.negative_prompt == WAN_NEGATIVE_PROMPT
    assert policy.text_encoder.dim == policy.transformer.config.text_dim == TEXT_DIM
    assert policy.latent_shape() == (16, 2, 4, 4)

    text_states = policy.encode_text(["a red fox runs in the snow", WAN_NEGATIVE_PROMPT])
    assert text_states.shape == (2, 16, TEXT_DIM)
    latents = torch.randn(2, *policy.latent_shape(), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.3])
    velocity = policy.velocity(latents, sigma, text_states)
    assert velocity.shape == latents.shape and torch.isfinite(velocity).all()
    # The loaded transformer carries the folder's weights: it agrees with diffusers' own model on that folder.
    reference = WanTransformer3DModel.from_pretrained(wan_folder / "transformer").eval()
    # OSPNext zero-pads the text to its text_len (512) inside, as Wan does; diffusers' model expects it done outside.
    padded_states = torch.nn.functional.pad(text_states, (0, 0, 0, policy.transformer.config.text_len - 16))
    with torch.no_grad():
        expected = reference(latents, sigma * 1000, padded_states, return_dict=False)[0]
    torch.testing.assert_close(velocity, expected, rtol=1e-4, atol=1e-5)  # fp32, different attention kernels

    videos = policy.decode(latents[:1])
    assert videos.shape == (1, 5, 3, 32, 32) and videos.min() >= 0 and videos.max() <= 1
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    assert not any(p.requires_grad for p in policy.vae.parameters())


def test_separate_folders_and_sparse_layout(wan_folder):
    policy = build_wan_policy(WanPolicyConfig(
        transformer_path=str(wan_folder / "transformer"), text_encoder_path=str(wan_folder / "text_encoder"),
        tokenizer_path=str(wan_folder / "tokenizer"), vae_path=str(wan_folder / "vae"),
        layout="dual_end", num_full_blocks=2, sparse_ratio=2, dtype="float32", text_len=8, **VIDEO,
    ))
    assert policy.transformer.config.block_kinds() == ["full", "token", "group", "full"]
    latents = torch.randn(1, *policy.latent_shape())
    velocity = policy.velocity(latents, torch.tensor([0.5]), policy.encode_text(["a cat"]))
    assert velocity.shape == latents.shape and torch.isfinite(velocity).all()


def test_transformer_from_a_bare_weight_file(wan_folder, tmp_path):
    # A bare file carries no config: the loader infers it from tensor shapes, with Wan's head_dim of 128.
    reference = tiny_wan_transformer(num_layers=2, head_dim=128)
    reference.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    weight_file = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    policy = build_wan_policy(
        model_dir=str(wan_folder), transformer_path=str(weight_file), dtype="float32", text_len=8, **VIDEO
    )
    latents = torch.randn(1, *policy.latent_shape(), generator=torch.Generator().manual_seed(2))
    text_states = policy.encode_text(["two birds"])
    padded_states = torch.nn.functional.pad(text_states, (0, 0, 0, policy.transformer.config.text_len - 8))
    with torch.no_grad():
        expected = reference(latents, torch.tensor([700.0]), padded_states, return_dict=False)[0]
    velocity = policy.velocity(latents, torch.tensor([0.7]), text_states)
    torch.testing.assert_close(velocity, expected, rtol=1e-4, atol=1e-5)


def test_config_errors_name_the_field_and_the_fix(wan_folder, tmp_path):
    with pytest.raises(ValueError, match=r"model_dir.*missing WanPolicyConfig.text_encoder_path, WanPolicyConfig.vae_path"):
        WanPolicyConfig(transformer_path="x", **VIDEO)
    with pytest.raises(ValueError, match=r"WanPolicyConfig\.num_frames must be 4n\+1.*use 77 or 81"):
        WanPolicyConfig(model_dir="x", num_frames=80, height=720, width=1280)
    with pytest.raises(ValueError, match=r"WanPolicyConfig\.width must be a positive multiple of 16"):
        WanPolicyConfig(model_dir="x", num_frames=81, height=720, width=1288)
    with pytest.raises(ValueError, match=r"WanPolicyConfig\.dtype must be one of"):
        WanPolicyConfig(model_dir="x", dtype="fp8", **VIDEO)
    with pytest.raises(ValueError, match=r"text_encoder_dtype='float16'.*bfloat16"):
        WanPolicyConfig(model_dir="x", text_encoder_dtype="float16", **VIDEO)
    assert WanPolicyConfig(model_dir="x", dtype="float16", **VIDEO).resolved_text_encoder_dtype() == torch.bfloat16
    with pytest.raises(ValueError, match=r"not both"):
        build_wan_policy(WanPolicyConfig(model_dir="x", **VIDEO), dtype="float32")
    with pytest.raises(ValueError, match=r"model_dir.*nowhere"):
        build_wan_policy(model_dir=str(tmp_path / "nowhere"), **VIDEO)


def test_mismatched_text_encoder_is_refused(wan_folder, tmp_path):
    tiny_umt5(d_model=24).save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(ValueError, match=r"24-d but the transformer's text_dim is 32"):
        build_wan_policy(
            model_dir=str(wan_folder), text_encoder_path=str(tmp_path / "text_encoder"),
            tokenizer_path=str(wan_folder / "tokenizer"), dtype="float32", text_len=8, **VIDEO,
        )
