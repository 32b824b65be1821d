"""Wan's real encoders, loaded by our loaders from tiny random models saved to tmp folders (no downloads)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from diffusers import AutoencoderKLWan
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from policies.text import WAN_NEGATIVE_PROMPT, UMT5TextEncoder, clean_prompt
from policies.vae import WanVAE

CORPUS = ["a red fox runs in the snow", "a cat sleeps on a warm sofa", "two birds fly over the sea at sunset"]
MAX_LENGTH = 12


def save_tiny_tokenizer(folder) -> None:
    """A word-level tokenizer with T5's special tokens and its '</s>' suffix, saved like a HF tokenizer."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def tiny_umt5(vocab_size: int = 40, d_model: int = 32) -> UMT5EncoderModel:
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
    )
    return UMT5EncoderModel(config).eval()


def tiny_wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    # Non-trivial statistics so that a missing or inverted normalisation cannot pass the comparisons.
    mean = torch.linspace(-1.0, 1.0, 16).tolist()
    std = torch.linspace(0.5, 2.0, 16).tolist()
    return AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=mean, latents_std=std,
    ).eval()


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A diffusers-style model folder holding text_encoder/ and tokenizer/."""
    root = tmp_path_factory.mktemp("wan_text")
    save_tiny_tokenizer(root / "tokenizer")
    tiny_umt5().save_pretrained(root / "text_encoder")
    return root


def reference_states(folder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own tokenizer + forward, then Wan's zeroing written out by hand."""
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    batch = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        raw = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    expected = raw.clone()
    for b, length in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        expected[b, length:] = 0.0
    return raw, expected


def test_umt5_states_match_transformers_with_padding_zeroed(text_folder):
    prompts = ["a red fox", "a cat sleeps on a warm sofa by the sea at sunset with two birds"]
    encoder = UMT5TextEncoder.from_pretrained(text_folder, max_length=MAX_LENGTH)
    states = encoder(prompts)
    raw, expected = reference_states(text_folder, prompts)
    assert states.shape == (2, MAX_LENGTH, 32) and encoder.dim == 32
    torch.testing.assert_close(states, expected, rtol=0, atol=0)
    # "a red fox </s>" is 4 tokens: the rest is exactly zero although the raw encoder output there is not.
    assert raw[0, 4:].abs().sum() > 0 and states[0, 4:].abs().sum() == 0 and states[0, :4].abs().min() > 0
    # the long prompt is truncated to max_length, so none of its rows is zeroed.
    assert (states[1].abs().sum(dim=-1) > 0).all()


def test_umt5_direct_folders_and_prompt_cleaning(text_folder):
    encoder = UMT5TextEncoder.from_pretrained(
        text_folder / "text_encoder", tokenizer_path=text_folder / "tokenizer", max_length=MAX_LENGTH
    )
    _, expected = reference_states(text_folder, ["a red fox & the cat"])
    torch.testing.assert_close(encoder(["  a red\n fox &amp;amp; the   cat "]), expected, rtol=0, atol=0)
    assert clean_prompt("a  &amp;amp; b\n") == "a & b"
    with pytest.raises(ValueError, match=r"list of strings"):
        encoder("a red fox")


def test_umt5_missing_paths_name_path_and_field(tmp_path, text_folder):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"text_encoder_path.*nowhere"):
        UMT5TextEncoder.from_pretrained(missing)
    with pytest.raises(ValueError, match=r"model_dir.*config\.json"):
        UMT5TextEncoder.from_pretrained(tmp_path, field="model_dir")
    with pytest.raises(ValueError, match=r"text_encoder_path.*tokenizer"):
        UMT5TextEncoder.from_pretrained(text_folder / "text_encoder")
    with pytest.raises(ValueError, match=r"tokenizer_path.*nowhere"):
        UMT5TextEncoder.from_pretrained(text_folder, tokenizer_path=missing)


def test_wan_negative_prompt_is_wans_text():
    # Pins Wan2.1's `sample_neg_prompt` (28 terms; digest taken from the upstream string) against edits.
    terms = WAN_NEGATIVE_PROMPT.split("，")
    assert terms[0] == "色调艳丽" and terms[-1] == "倒着走" and len(terms) == 28
    assert hashlib.sha256(WAN_NEGATIVE_PROMPT.encode()).hexdigest()[:16] == "ce96e0324e4b54ce"


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_vae")
    tiny_wan_vae().save_pretrained(root / "vae")
    return root


def test_wan_vae_matches_diffusers_with_normalisation(vae_folder):
    vae = WanVAE.from_pretrained(vae_folder)
    ref = AutoencoderKLWan.from_pretrained(vae_folder / "vae").eval()
    mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    videos = torch.rand(1, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    latents = vae.encode(videos)
    assert latents.shape == (1, *vae.latent_shape(5, 16, 16)) == (1, 16, 2, 2, 2)
    with torch.no_grad():
        z = ref.encode(videos.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(latents, (z - mean) / std, rtol=1e-6, atol=1e-6)

    decoded = vae.decode(latents)
    assert decoded.shape == videos.shape and decoded.min() >= 0 and decoded.max() <= 1
    with torch.no_grad():
        pixels = ref.decode(z).sample  # the round trip through diffusers' own calls, in its [-1, 1] space
    torch.testing.assert_close(decoded, ((pixels + 1) / 2).permute(0, 2, 1, 3, 4), rtol=1e-5, atol=1e-5)


def test_wan_vae_validates_sizes_with_fixes(vae_folder):
    vae = WanVAE.from_pretrained(vae_folder / "vae", latent_patch=2, tiling=True)
    assert vae.vae.use_tiling
    assert vae.latent_shape(81, 720, 1280) == (16, 21, 90, 160)
    with pytest.raises(ValueError, match=r"num_frames must be 4n\+1.*got 80; use 77 or 81"):
        vae.latent_shape(80, 64, 64)
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 16.*got 72; use 64 or 80"):
        vae.latent_shape(5, 72, 64)
    with pytest.raises(ValueError, match=r"width must be"):
        vae.latent_shape(5, 64, 0)
    with pytest.raises(ValueError, match=r"permute"):
        vae.encode(torch.rand(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"vae_path.*nowhere"):
        WanVAE.from_pretrained(vae_folder / "nowhere")
