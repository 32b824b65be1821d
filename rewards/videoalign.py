"""VideoAlign / VideoReward: visual quality (VQ), motion quality (MQ), text alignment (TA) from Qwen2-VL.

Shape legend: B = videos, T = frames, F = sampled frames, C = 3, H, W = pixels, L = tokens, D = hidden width,
K = reward dimensions (3).

The released reward model (KwaiVGI/VideoReward, as loaded by KwaiVGI/VideoAlign:inference.py) is Qwen2-VL-2B
with three added tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>`` placed in the prompt, a
bias-free linear ``rm_head`` on the last hidden state read at those tokens, and LoRA adapters. A checkpoint
folder holds ``model_config.json`` (data / model / LoRA / inference sections) and ``checkpoint-<step>/`` with
either ``model.pth`` or ``adapter_model.safetensors`` + ``non_lora_state_dict.pth``. Here the LoRA deltas are
merged into plain transformers ``Qwen2VLForConditionalGeneration`` weights at load time (no peft at
inference), and checkpoints saved with the older transformers module names are remapped.

Two inputs are NOT in the checkpoint and must be given as local paths:
- ``base_model``: the Qwen2-VL-2B-Instruct folder (weights, tokenizer, processor, chat template);
- ``prompt_template``: a text file with VideoAlign's prompt (``{text_prompt}`` marks where the prompt goes),
  e.g. ``DETAILED_PROMPT_WITH_SPECIAL_TOKEN`` of VideoAlign's ``prompt_template.py`` for the released
  checkpoint (``prompt_template_type = "detailed_special"``). We do not ship that text.

Frames are sampled at the config's ``fps`` from videos played at ``video_fps`` and resized so both sides are
multiples of 28 within the pixel budget, following qwen-vl-utils' rules. Scores are normalised with the
config's means/stds (``normalize=True``) and ``output="Overall"`` is VQ + MQ + TA, as VideoAlign reports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import Reward
from rewards.clip import require_file
from rewards.pickscore import require_dir
from rewards.registry import register_reward

DIMENSIONS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
OUTPUTS = ("Overall",) + DIMENSIONS
PATCH_FACTOR = 28  # Qwen2-VL: 14 px patches merged 2 x 2
FRAME_FACTOR = 2  # temporal patch size
MIN_SAMPLED_FRAMES = 4
# Older transformers named Qwen2-VL modules without the language_model level; VideoReward was saved that way.
LEGACY_PREFIXES = (
    ("visual.", "model.visual."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
)


def fps_frame_indices(num_frames: int, *, video_fps: float, fps: float) -> torch.Tensor:
    """Indices of frames sampled at ``fps`` from ``num_frames`` frames played at ``video_fps``.

    The count is a multiple of FRAME_FACTOR, at least MIN_SAMPLED_FRAMES, at most ``num_frames`` (rounded down
    to the factor); the frames are evenly spaced from first to last.
    """
    if num_frames < FRAME_FACTOR:
        raise ValueError(f"videoalign needs at least {FRAME_FACTOR} frames, got T = {num_frames}")
    wanted = max(num_frames / video_fps * fps, MIN_SAMPLED_FRAMES)
    count = int(min(wanted, num_frames) // FRAME_FACTOR * FRAME_FACTOR)
    return torch.linspace(0, num_frames - 1, count).round().long()


def smart_resize(height: int, width: int, *, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) near the input aspect ratio, both multiples of 28, with min_pixels <= h * w <= max_pixels."""
    h = max(PATCH_FACTOR, round(height / PATCH_FACTOR) * PATCH_FACTOR)
    w = max(PATCH_FACTOR, round(width / PATCH_FACTOR) * PATCH_FACTOR)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(PATCH_FACTOR, math.floor(height / beta / PATCH_FACTOR) * PATCH_FACTOR)
        w = max(PATCH_FACTOR, math.floor(width / beta / PATCH_FACTOR) * PATCH_FACTOR)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / PATCH_FACTOR) * PATCH_FACTOR
        w = math.ceil(width * beta / PATCH_FACTOR) * PATCH_FACTOR
    return h, w


def current_key(key: str) -> str:
    """A VideoAlign state-dict key in this transformers' Qwen2-VL naming.

    Removes peft's wrapper names (``base_model.model.`` prefix, ``base_layer`` and ``modules_to_save.default``
    levels) and maps the older transformers module names to the current ones.
    """
    key = key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    for old, new in LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def merge_lora(
    state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], *, alpha: float, rank: int, rslora: bool
) -> None:
    """Add LoRA deltas into ``state`` in place: W += s * B @ A (linear), W += s * (B @ A).T (embedding).

    ``s = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), peft's scaling. Keys are peft's saved names
    (``<module>.lora_A.weight``, ``<module>.lora_embedding_A``) already passed through ``current_key``.
    """
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    for key, a in adapter.items():
        for tag, transpose in ((".lora_A.weight", False), (".lora_embedding_A", True)):
            if not key.endswith(tag):
                continue
            module = key[: -len(tag)]
            b = adapter[module + tag.replace("_A", "_B")]
            delta = (b.float() @ a.float()) * scale
            target = module + ".weight"
            if target not in state:
                raise ValueError(f"LoRA adapter targets {module!r}, which the base model does not have")
            state[target] = (state[target].float() + (delta.T if transpose else delta)).to(state[target].dtype)


def read_model_config(folder: Path) -> dict[str, Any]:
    """The parts of VideoAlign's ``model_config.json`` this reward uses, validated."""
    path = require_file(folder / "model_config.json", "checkpoint (its model_config.json)")
    raw = json.loads(path.read_text())
    missing = {"data_config", "model_config", "peft_lora_config"} - set(raw)
    if missing:
        raise ValueError(f"{path} lacks sections {sorted(missing)}; is checkpoint a VideoReward folder?")
    model, data, lora = raw["model_config"], raw["data_config"], raw["peft_lora_config"]
    reward_token = model.get("reward_token", "last")
    if reward_token not in ("special", "last"):
        raise ValueError(f"{path}: reward_token {reward_token!r} is not supported; expected 'special' or 'last'")
    return {
        "base_model": model.get("model_name_or_path"),
        "output_dim": int(model.get("output_dim", 1)),
        "special": bool(model.get("use_special_tokens", False)),
        "reward_token": reward_token,
        "fps": float(data.get("fps", 2.0)),
        "max_pixels": int(data.get("max_frame_pixels", 240 * 320)),
        "lora": lora if lora.get("lora_enable", False) else None,
        "norm": raw.get("inference_config"),
    }


def load_checkpoint_state(folder: Path, step: int | None, lora: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The full state dict (current key names) of ``checkpoint-<step>`` (latest if None), LoRA merged."""
    steps = sorted(int(p.name.split("-")[-1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit())
    if not steps:
        raise ValueError(f"checkpoint={str(folder)!r} has no checkpoint-<step> folder")
    if step is not None and step not in steps:
        raise ValueError(f"checkpoint_step={step} not found in {folder}; available steps: {steps}")
    ckpt = folder / f"checkpoint-{steps[-1] if step is None else step}"
    if (ckpt / "model.pth").is_file():
        full = torch.load(ckpt / "model.pth", map_location="cpu", weights_only=True)
        return {current_key(k): v for k, v in full.items() if ".original_module." not in k}
    from safetensors.torch import load_file

    adapter_path = require_file(ckpt / "adapter_model.safetensors", "checkpoint (its adapter_model.safetensors)")
    rest_path = require_file(ckpt / "non_lora_state_dict.pth", "checkpoint (its non_lora_state_dict.pth)")
    if lora is None:
        raise ValueError(f"{ckpt} holds a LoRA adapter but model_config.json has lora_enable = false")
    rest = torch.load(rest_path, map_location="cpu", weights_only=True)
    state = {current_key(k): v for k, v in rest.items() if ".original_module." not in k}
    adapter = {current_key(k): v for k, v in load_file(str(adapter_path)).items()}
    state["__lora__"] = adapter  # merged once the base weights are known, see VideoAlign._load
    return state


@register_reward("videoalign")
class VideoAlign(Reward):
    """VideoReward score of whole videos; ``output`` picks "Overall" (VQ + MQ + TA) or one dimension."""

    def __init__(
        self,
        *,
        checkpoint: str,
        prompt_template: str,
        base_model: str | None = None,
        video_fps: float = 16.0,
        output: str = "Overall",
        normalize: bool = True,
        min_frame_pixels: int = 128 * 28 * 28,
        checkpoint_step: int | None = None,
        dtype: str = "bfloat16",
        name: str | None = None,
        batch_size: int | None = 2,
    ) -> None:
        super().__init__(name=name, batch_size=batch_size)
        self.folder = require_dir(checkpoint, "checkpoint")
        self.cfg = read_model_config(self.folder)
        self.template = require_file(prompt_template, "prompt_template").read_text()
        needed = ["{text_prompt}"] + (list(SPECIAL_TOKENS) if self.cfg["special"] else [])
        absent = [t for t in needed if t not in self.template]
        if absent:
            raise ValueError(
                f"prompt_template={prompt_template!r} lacks {absent}; save the template the checkpoint was trained "
                "with (VideoAlign's prompt_template.py, 'detailed_special' for the released VideoReward)"
            )
        if base_model is None and self.cfg["base_model"] is not None:
            base_model = str(self.folder / self.cfg["base_model"])  # relative names resolve next to the checkpoint
        self.base_model = require_dir(base_model, "base_model")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if normalize and self.cfg["norm"] is None:
            raise ValueError("model_config.json has no inference_config (means/stds); pass normalize=False")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        self.video_fps, self.output, self.normalize = video_fps, output, normalize
        self.min_pixels, self.step, self.dtype = min_frame_pixels, checkpoint_step, getattr(torch, dtype)

    def _load(self, device: torch.device) -> None:
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        processor = AutoProcessor.from_pretrained(self.base_model, padding_side="right", local_files_only=True)
        if self.cfg["special"]:
            processor.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
            self.token_ids = processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        vlm = Qwen2VLForConditionalGeneration.from_pretrained(
            self.base_model, local_files_only=True, dtype=torch.float32
        )
        vlm.resize_token_embeddings(len(processor.tokenizer))
        head = nn.Linear(vlm.config.text_config.hidden_size, self.cfg["output_dim"], bias=False)
        state = load_checkpoint_state(self.folder, self.step, self.cfg["lora"])
        head.load_state_dict({"weight": state.pop("rm_head.weight")})
        adapter = state.pop("__lora__", None)
        # lm_head is unused (the reward reads hidden states) and may be tied to embed_tokens: loading its stale
        # copy after the checkpoint's embeddings would overwrite them.
        full = {k: v for k, v in vlm.state_dict().items() if k != "lm_head.weight"}
        state.pop("lm_head.weight", None)
        unknown = sorted(set(state) - set(full))
        if unknown:
            raise ValueError(f"checkpoint has weights this Qwen2-VL does not: {unknown[:5]}")
        full.update(state)
        if adapter is not None:
            lora = self.cfg["lora"]
            rslora = lora.get("use_rslora", False)
            merge_lora(full, adapter, alpha=lora["lora_alpha"], rank=lora["lora_r"], rslora=rslora)
        missing, _ = vlm.load_state_dict(full, strict=False)
        if missing != ["lm_head.weight"] and missing:
            raise ValueError(f"Qwen2-VL weights missing after loading the checkpoint: {missing[:5]}")
        self.processor, self.pad_id = processor, processor.tokenizer.pad_token_id
        self.vlm = vlm.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.head = head.to(device).eval().requires_grad_(False)

    def _frames(self, video_TCHW: torch.Tensor) -> torch.Tensor:
        idx = fps_frame_indices(video_TCHW.shape[0], video_fps=self.video_fps, fps=self.cfg["fps"])
        frames = video_TCHW.index_select(0, idx.to(video_TCHW.device)).float()
        size = smart_resize(*frames.shape[-2:], min_pixels=self.min_pixels, max_pixels=self.cfg["max_pixels"])
        return F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)

    def dimension_scores(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw VQ, MQ, TA scores [B, 3] (before normalisation)."""
        texts = [self.template.replace("{text_prompt}", p) for p in prompts]
        chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": t}]}] for t in texts]
        text = self.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        videos = [self._frames(v) for v in videos_BTCHW]
        batch = self.processor(text=text, videos=videos, padding=True, return_tensors="pt", do_rescale=False)
        inputs = {k: v.to(self.device) for k, v in batch.items()}  # ids, mask, M-RoPE token types, video patches
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
        ids_BL = inputs["input_ids"]
        hidden_BLD = self.vlm.model(**inputs).last_hidden_state
        logits_BLK = self.head(hidden_BLD.float())
        rows = torch.arange(ids_BL.shape[0], device=ids_BL.device)
        if self.cfg["reward_token"] == "last":
            last_B = inputs["attention_mask"].sum(dim=1) - 1  # right padding
            return logits_BLK[rows, last_B]
        per_token = []
        for token_id in self.token_ids:
            hits_BL = ids_BL == token_id
            if not bool((hits_BL.sum(dim=1) == 1).all()):
                raise ValueError("each prompt must contain every reward token exactly once; check prompt_template")
            per_token.append(logits_BLK[rows, hits_BL.float().argmax(dim=1)])
        scores_BKK = torch.stack(per_token, dim=1)
        return scores_BKK.diagonal(dim1=1, dim2=2) if scores_BKK.shape[-1] == 3 else scores_BKK[..., 0]

    def score(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        scores_BK = self.dimension_scores(videos_BTCHW, prompts)
        if self.normalize:
            norm = self.cfg["norm"]
            mean = torch.tensor([norm[f"{d}_mean"] for d in DIMENSIONS], device=scores_BK.device)
            std = torch.tensor([norm[f"{d}_std"] for d in DIMENSIONS], device=scores_BK.device)
            scores_BK = (scores_BK - mean) / std
        return scores_BK.sum(dim=1) if self.output == "Overall" else scores_BK[:, DIMENSIONS.index(self.output)]
