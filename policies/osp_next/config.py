"""OSP-Next configuration: the Wan2.1 DiT hyper-parameters plus the per-block attention layout.

Layouts:

- ``"full"``: every block uses full 3-D attention (plain Wan2.1);
- ``"dual_end"``: ``num_full_blocks // 2`` full blocks at each end; the blocks between alternate token, group,
  token, ... starting with token (OSP-Next release: 40 layers, 8 full blocks, k=2 -> blocks 0-3 and 36-39 full);
- an explicit list of ``"full" | "token" | "group"``, one per block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from policies.osp_next.attention import BACKENDS as ATTENTION_BACKENDS

BLOCK_KINDS = ("full", "token", "group")
NAMED_LAYOUTS = ("full", "dual_end")


@dataclass(kw_only=True)
class OSPNextConfig:
    """Hyper-parameters of one OSP-Next (Wan2.1 T2V) transformer."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 40
    num_layers: int = 40
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    layout: str | list[str] = "full"
    """"full", "dual_end", or one of "full"/"token"/"group" per block."""
    num_full_blocks: int = 8
    """Used by layout="dual_end" only: how many full blocks, split evenly between both ends."""
    sparse_ratio: int = 2
    """Skiparse k: each sparse block attends within k*k subsequences."""
    attention_backend: str = "auto"
    """"auto" (see attention.resolve_backend), "flash", "varlen", "sdpa" or "math" (plain reference)."""

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if isinstance(self.layout, (list, tuple)):
            self.layout = list(self.layout)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (t, h, w), got {self.patch_size}")
        for name in ("in_channels", "out_channels", "dim", "ffn_dim", "freq_dim", "text_dim", "text_len",
                     "num_heads", "num_layers", "rope_max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"OSPNextConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even (sin/cos halves), got {self.freq_dim}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads}); change num_heads or dim"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = dim / num_heads = {self.head_dim} must be even for RoPE; pick dim and num_heads so "
                f"that dim / num_heads is even"
            )
        if not isinstance(self.sparse_ratio, int) or self.sparse_ratio < 1:
            raise ValueError(f"sparse_ratio (k) must be an integer >= 1, got {self.sparse_ratio!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        self._check_layout()

    def _check_layout(self) -> None:
        if isinstance(self.layout, list):
            if len(self.layout) != self.num_layers:
                raise ValueError(
                    f"layout lists {len(self.layout)} block kinds but num_layers is {self.num_layers}; "
                    f"give exactly one kind per block"
                )
            bad = sorted({kind for kind in self.layout if kind not in BLOCK_KINDS})
            if bad:
                raise ValueError(f"layout has unknown block kinds {bad}; use only {BLOCK_KINDS}")
            return
        if self.layout not in NAMED_LAYOUTS:
            raise ValueError(
                f"layout must be one of {NAMED_LAYOUTS} or a list of {BLOCK_KINDS} per block, got {self.layout!r}"
            )
        if self.layout == "dual_end":
            if self.num_full_blocks < 0 or self.num_full_blocks % 2:
                raise ValueError(
                    f"num_full_blocks must be even and >= 0 for layout='dual_end' (half at each end), "
                    f"got {self.num_full_blocks}"
                )
            if self.num_full_blocks > self.num_layers:
                raise ValueError(
                    f"num_full_blocks ({self.num_full_blocks}) exceeds num_layers ({self.num_layers}); lower it"
                )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def block_kinds(self) -> list[str]:
        """The attention kind of every block, resolved from ``layout``."""
        if isinstance(self.layout, list):
            return list(self.layout)
        if self.layout == "full":
            return ["full"] * self.num_layers
        edge = self.num_full_blocks // 2
        num_sparse = self.num_layers - 2 * edge
        sparse = ["token" if i % 2 == 0 else "group" for i in range(num_sparse)]
        return ["full"] * edge + sparse + ["full"] * edge

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "OSPNextConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown OSPNextConfig fields {unknown}; valid fields are {sorted(names)}")
        return cls(**_merge(data, overrides))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "OSPNextConfig":
        """A named configuration, e.g. ``OSPNextConfig.preset("osp-next-14b")``, with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets are {sorted(PRESETS)}")
        return cls(**_merge(PRESETS[name], overrides))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(OSPNextConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown OSPNextConfig overrides {unknown}; valid fields are {sorted(names)}")
    return {**base, **overrides}


_WAN_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized model: 4 blocks, 2 heads of dim 12, 4 latent channels.
    "tiny": dict(in_channels=4, out_channels=4, dim=24, ffn_dim=48, freq_dim=16, text_dim=16, text_len=8,
                 num_heads=2, num_layers=4, rope_max_seq_len=64),
    "wan2.1-t2v-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": dict(_WAN_14B),
    "osp-next-14b": dict(_WAN_14B, layout="dual_end", num_full_blocks=8, sparse_ratio=2),
}

__all__ = ["ATTENTION_BACKENDS", "BLOCK_KINDS", "OSPNextConfig", "PRESETS"]
