"""VideoAlign on a tiny random Qwen2-VL saved in the VideoReward checkpoint layout (LoRA adapter + non-LoRA)."""

from __future__ import annotations

import json

import pytest
import torch

import rewards
from rewards.videoalign import SPECIAL_TOKENS, current_key, fps_frame_indices, smart_resize

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATE = "Rate this video. Prompt: {text_prompt}\nVQ: <|VQ_reward|>\nMQ: <|MQ_reward|>\nTA: <|TA_reward|>\n"
NORM = {"VQ_mean": 3.0, "VQ_std": 2.0, "MQ_mean": 1.0, "MQ_std": 1.5, "TA_mean": 2.0, "TA_std": 2.5}


def test_frame_sampling_and_resize_rules():
    assert len(fps_frame_indices(81, video_fps=16, fps=2)) == 10  # 81 / 16 * 2 = 10.1 -> 10
    assert fps_frame_indices(8, video_fps=4, fps=2).tolist() == [0, 2, 5, 7]
    assert len(fps_frame_indices(6, video_fps=30, fps=2)) == 4  # never fewer than 4 frames
    h, w = smart_resize(480, 832, min_pixels=128 * 28 * 28, max_pixels=200704)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 200704 and abs(w / h - 832 / 480) < 0.1
    legacy = "base_model.model.model.layers.0.mlp.up_proj.weight"
    assert current_key(legacy) == "model.language_model.layers.0.mlp.up_proj.weight"
    assert current_key("base_model.model.visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"


@pytest.fixture(scope="module")
def tiny_videoreward(tmp_path_factory):
    """Base Qwen2-VL folder, VideoReward-style checkpoint folder, prompt template file, and a peft reference."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import (Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from reward_fixtures import _bytes_to_unicode

    root = tmp_path_factory.mktemp("videoreward")
    base, ckpt = root / "Qwen2-VL-tiny", root / "VideoReward"
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    pixels = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels), video_processor=Qwen2VLVideoProcessor(size=pixels),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
    ).save_pretrained(base)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(base)
    # The trained reward model: 3 added tokens, LoRA (non-zero init) on attention, MLP and embeddings, rm_head.
    vlm = Qwen2VLForConditionalGeneration.from_pretrained(base).eval()
    vlm.resize_token_embeddings(len(vocab) + 3)
    with torch.no_grad():
        vlm.model.language_model.embed_tokens.weight[-3:].normal_()
    head = torch.nn.Linear(32, 3, bias=False)
    targets = ["q_proj", "v_proj", "up_proj", "embed_tokens"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(vlm, lora).eval()
    (ckpt / "checkpoint-7").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()},
              ckpt / "checkpoint-7" / "adapter_model.safetensors")
    embed = peft_model.base_model.model.model.language_model.embed_tokens.base_layer.weight
    torch.save({"base_model.model.model.embed_tokens.weight": embed.detach().clone(),  # old transformers naming
                "base_model.model.rm_head.weight": head.weight.detach().clone()},
               ckpt / "checkpoint-7" / "non_lora_state_dict.pth")
    (ckpt / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "max_frame_pixels": 28 * 28 * 16, "prompt_template_type": "detailed_special"},
        "model_config": {"model_name_or_path": "../Qwen2-VL-tiny", "output_dim": 3, "use_special_tokens": True,
                         "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
        "inference_config": NORM,
    }))
    template = root / "prompt.txt"
    template.write_text(TEMPLATE)
    return {"checkpoint": str(ckpt), "prompt_template": str(template), "peft_model": peft_model, "head": head,
            "base": str(base)}


def test_videoalign_matches_peft_reference(tiny_videoreward):
    from transformers import AutoProcessor

    args = {k: tiny_videoreward[k] for k in ("checkpoint", "prompt_template")}
    reward = rewards.build("videoalign", **args, video_fps=4.0, min_frame_pixels=28 * 28 * 4, dtype="float32")
    videos = torch.rand(2, 8, 3, 56, 84, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a dog running"]
    overall = reward(videos, prompts)
    # Reference: the peft-wrapped model (unmerged LoRA) on frames [0, 2, 5, 7] (8 frames at 4 fps, sampled at 2 fps).
    processor = AutoProcessor.from_pretrained(tiny_videoreward["base"], padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    texts = [TEMPLATE.format(text_prompt=p) for p in prompts]
    chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": t}]}] for t in texts]
    batch = processor(text=processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True),
                      videos=[v[[0, 2, 5, 7]] for v in videos], padding=True, return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        inner = tiny_videoreward["peft_model"].base_model.model.model
        hidden = inner(**batch).last_hidden_state
        logits = tiny_videoreward["head"](hidden)
    ids = processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    pos = [[int((batch["input_ids"][b] == ids[k]).nonzero()[0, 0]) for k in range(3)] for b in range(2)]
    raw = torch.stack([logits[b, pos[b][k], k] for b in range(2) for k in range(3)]).view(2, 3)
    torch.testing.assert_close(reward.dimension_scores(videos, prompts), raw, rtol=1e-4, atol=1e-5)
    mean = torch.tensor([NORM["VQ_mean"], NORM["MQ_mean"], NORM["TA_mean"]])
    std = torch.tensor([NORM["VQ_std"], NORM["MQ_std"], NORM["TA_std"]])
    torch.testing.assert_close(overall, ((raw - mean) / std).sum(dim=1), rtol=1e-4, atol=1e-5)
    vq = rewards.build("videoalign", **args, video_fps=4.0, min_frame_pixels=28 * 28 * 4, dtype="float32",
                       output="VQ", normalize=False)(videos, prompts)
    torch.testing.assert_close(vq, raw[:, 0], rtol=1e-4, atol=1e-5)


def test_videoalign_errors_name_the_missing_input(tiny_videoreward, tmp_path):
    bad = tmp_path / "no_tokens.txt"
    bad.write_text("Rate {text_prompt}")
    with pytest.raises(ValueError, match="lacks.*VQ_reward"):
        rewards.build("videoalign", checkpoint=tiny_videoreward["checkpoint"], prompt_template=str(bad))
    with pytest.raises(ValueError, match="prompt_template="):
        rewards.build("videoalign", checkpoint=tiny_videoreward["checkpoint"], prompt_template=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="base_model="):
        rewards.build("videoalign", checkpoint=tiny_videoreward["checkpoint"],
                      prompt_template=tiny_videoreward["prompt_template"], base_model=str(tmp_path / "nope"))
