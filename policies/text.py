"""Wan's text encoder: the UMT5-XXL encoder from a local folder, with Wan's prompt conventions.

Wan2.1 (and OSP-Next, which keeps Wan's text path) conditions on UMT5 states padded to a fixed 512 tokens.
Each prompt is cleaned (HTML entities, mojibake, whitespace), tokenised with ``</s>`` appended, padded to
``max_length`` and run through the encoder with its attention mask; every state past the prompt's own length
is then set to exactly zero. The zeroing matters: the transformer's cross-attention has no key mask, so the
padded rows must be the same zeros the model was trained on (Wan's original code and diffusers' ``WanPipeline``
both do this).

Shapes: B = prompts, L = ``max_length`` tokens, D = encoder width (4096 for UMT5-XXL).
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Sequence

import ftfy
import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

# Wan's fixed negative prompt for classifier-free guidance (Wan2.1 `wan/configs/shared_config.py`,
# `sample_neg_prompt`), also used by OSP-Next's RL rollouts and VBench evaluation. Kept verbatim: the model
# was tuned with this exact Chinese text and an English paraphrase encodes to different states.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

WAN_TEXT_LENGTH = 512

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def clean_prompt(prompt: str) -> str:
    """Wan's prompt cleaning: repair mojibake, unescape HTML (twice, for double-escaped scrapes), squash spaces."""
    text = html.unescape(html.unescape(ftfy.fix_text(prompt)))
    return re.sub(r"\s+", " ", text).strip()


def zero_padded_states(states_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Set every state past each prompt's length to exactly 0 (mask is 1 on real tokens, right-padded)."""
    lengths_B = mask_BL.gt(0).sum(dim=1)
    positions_L = torch.arange(states_BLD.shape[1], device=states_BLD.device)
    keep_BL1 = (positions_L[None, :] < lengths_B.to(states_BLD.device)[:, None]).unsqueeze(-1)
    return torch.where(keep_BL1, states_BLD, torch.zeros((), dtype=states_BLD.dtype, device=states_BLD.device))


def resolve_component_dir(path: str | os.PathLike, subfolder: str, *, what: str, field: str) -> Path:
    """The folder holding one model component.

    ``path`` is either a diffusers-format model folder (then ``path/subfolder`` is used) or the component's own
    folder. Raises ValueError naming the path and the config field to fix when neither exists.
    """
    root = Path(path).expanduser()
    if (root / subfolder).is_dir():
        return root / subfolder
    if root.is_dir():
        return root
    raise ValueError(
        f"{field}: no {what} folder at '{root}'. Point {field} at a local folder holding the {what} "
        f"(its config and weights), or at a diffusers-format model folder with a '{subfolder}/' subfolder; "
        "weights are never downloaded."
    )


def require_any_file(folder: Path, names: Sequence[str], *, what: str, field: str) -> None:
    if not any((folder / name).is_file() for name in names):
        raise ValueError(
            f"{field}: '{folder}' has no {what} (looked for {', '.join(names)}). Point {field} at the folder "
            f"that holds the {what}, e.g. a diffusers Wan2.1 model folder or its '{folder.name}/' subfolder."
        )


class UMT5TextEncoder(nn.Module):
    """``prompts -> text_states_BLD`` with Wan's conventions (frozen; see the module docstring)."""

    def __init__(
        self, *, encoder: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, max_length: int = WAN_TEXT_LENGTH
    ) -> None:
        super().__init__()
        if max_length <= 0:
            raise ValueError(f"max_length must be positive (Wan uses {WAN_TEXT_LENGTH}), got {max_length}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; UMT5 pads with '<pad>': set tokenizer.pad_token")
        self.encoder = encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer_path: str | os.PathLike | None = None,
        max_length: int = WAN_TEXT_LENGTH,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        field: str = "text_encoder_path",
    ) -> "UMT5TextEncoder":
        """Load from local folders only.

        Args:
            path: a diffusers-format Wan model folder (``text_encoder/`` and ``tokenizer/`` inside) or the
                encoder's own folder (``config.json`` + safetensors).
            tokenizer_path: the tokenizer folder; defaults to ``path/tokenizer`` for a model folder, else ``path``.
            dtype: bf16 or fp32 (UMT5 overflows in fp16).
            field: the config field named in error messages.
        """
        encoder_dir = resolve_component_dir(path, "text_encoder", what="UMT5 text encoder", field=field)
        require_any_file(encoder_dir, ("config.json",), what="UMT5 encoder config.json", field=field)
        if tokenizer_path is None:
            root = Path(path).expanduser()
            tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else encoder_dir
            if not any((tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
                raise ValueError(
                    f"{field}: no tokenizer in '{tokenizer_dir}' (looked for {', '.join(_TOKENIZER_FILES)}); set "
                    "tokenizer_path to the UMT5 tokenizer folder (a diffusers Wan2.1 model's tokenizer/ subfolder)"
                )
        else:
            tokenizer_dir = resolve_component_dir(tokenizer_path, "tokenizer", what="tokenizer", field="tokenizer_path")
            require_any_file(tokenizer_dir, _TOKENIZER_FILES, what="tokenizer", field="tokenizer_path")
        encoder = UMT5EncoderModel.from_pretrained(encoder_dir, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(encoder=encoder.to(device), tokenizer=tokenizer, max_length=max_length)

    @property
    def dim(self) -> int:
        """D, the width of the states (the transformer's ``text_dim`` must equal it)."""
        return self.encoder.config.d_model

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids_BL, mask_BL) on the encoder's device, right-padded / truncated to ``max_length``."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got one str; wrap it as [prompt]")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.encoder.device
        return batch.input_ids.to(device), batch.attention_mask.to(device)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """``prompts -> text_states_BLD`` in the encoder's dtype, zero past each prompt's length."""
        input_ids_BL, mask_BL = self.tokenize(prompts)
        states_BLD = self.encoder(input_ids=input_ids_BL, attention_mask=mask_BL).last_hidden_state
        return zero_padded_states(states_BLD, mask_BL)
