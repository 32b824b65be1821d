"""A tiny word-level text encoder for the toy grammar.

Words are looked up in a closed vocabulary (``policies.toy.world.VOCABULARY``); an unknown word raises a
ValueError that names it, because a silent UNK would let a typo in an experiment config train on the wrong
prompt. Case is ignored; words are split on whitespace, so punctuation is an unknown word too.

Shape legend: B = prompts, L = token positions (``max_words``), D = ``dim``.

The empty prompt (CFG's negative prompt) encodes to ``max_words`` pad tokens, which still pass through the
learned pad embedding, positions and the transformer layer, so it is a learned "no caption" state, as in
caption dropout during pretraining.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from policies.toy.world import VOCABULARY

PAD = "<pad>"


@dataclass(kw_only=True)
class ToyTextEncoderConfig:
    """Sizes of the toy text encoder."""

    dim: int = 32
    """Width of the text states; must equal the transformer's ``text_dim``."""
    max_words: int = 6
    """Token positions L; prompts are padded to this length."""
    num_layers: int = 1
    """Transformer encoder layers after embeddings + positions (0 = embeddings only)."""
    num_heads: int = 2

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"ToyTextEncoderConfig.dim must be >= 1, got {self.dim}")
        if self.max_words < 1:
            raise ValueError(f"ToyTextEncoderConfig.max_words must be >= 1, got {self.max_words}")
        if self.num_layers < 0:
            raise ValueError(f"ToyTextEncoderConfig.num_layers must be >= 0, got {self.num_layers}")
        if self.num_heads < 1 or self.dim % self.num_heads:
            raise ValueError(
                f"ToyTextEncoderConfig.num_heads = {self.num_heads} must be >= 1 and divide dim = {self.dim}; "
                "pick a divisor of dim"
            )


class ToyTextEncoder(nn.Module):
    """``encoder(prompts) -> text_states_BLD``: learned word + position embeddings and a small transformer."""

    def __init__(self, config: ToyTextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or ToyTextEncoderConfig()
        self.vocabulary: tuple[str, ...] = (PAD, *VOCABULARY)
        self._word_to_id = {w: i for i, w in enumerate(self.vocabulary)}
        d = self.config.dim
        self.word_embedding = nn.Embedding(len(self.vocabulary), d)
        self.position_embedding = nn.Parameter(torch.zeros(self.config.max_words, d))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, self.config.num_heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(self.config.num_layers)
        )
        self.norm = nn.LayerNorm(d)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Word ids ``[B, L]``, padded with the pad id (0). Raises ValueError on unknown or too many words."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of str, got a single str; wrap it as [prompt]")
        rows = []
        for prompt in prompts:
            words = prompt.lower().split()
            if len(words) > self.config.max_words:
                raise ValueError(
                    f"prompt {prompt!r} has {len(words)} words but the toy text encoder holds "
                    f"max_words = {self.config.max_words}; shorten the prompt"
                )
            for word in words:
                if word not in self._word_to_id:
                    raise ValueError(
                        f"unknown word {word!r} in prompt {prompt!r}; the toy vocabulary is {list(VOCABULARY)}"
                    )
            ids = [self._word_to_id[w] for w in words]
            rows.append(ids + [0] * (self.config.max_words - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.config.max_words)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """Encode prompts to ``text_states_BLD`` (float32)."""
        ids_BL = self.token_ids(prompts).to(self.position_embedding.device)
        x_BLD = self.word_embedding(ids_BL) + self.position_embedding
        for layer in self.layers:
            x_BLD = layer(x_BLD)
        return self.norm(x_BLD)
