"""Loading and saving OSP-Next weights.

Accepted sources (``load_pretrained``):

- a diffusers ``WanTransformer3DModel`` folder: ``config.json`` + ``diffusion_pytorch_model*.safetensors``
  (sharded with ``*.safetensors.index.json`` or not); diffusers' key names are mapped to Wan's;
- an original Wan2.1 / OSP-Next weight file (``.pth``/``.pt`` read with ``weights_only=True``, or
  ``.safetensors``) with Wan's key names, optionally prefixed ``model.``/``module.``; or an original Wan folder
  (``config.json`` with ``dim``/``num_heads`` + safetensors). A bare file has no config: it is inferred from the
  tensor shapes, with ``num_heads = dim // 128`` (Wan's head_dim) unless given as an override;
- this library's own folder (``save_pretrained``): ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from policies.files import atomic_write
from policies.osp_next.config import OSPNextConfig

OWN_CLASS_NAME = "OSPNext"
OWN_WEIGHTS = "model.safetensors"
_PREFIXES = ("module.", "model.", "_orig_mod.")

# (diffusers name, Wan name) of the renamed parameters: read left to right on load, right to left on export. A name
# ending in "." renames a prefix, any other the whole name; _BLOCK_NAMES apply after "blocks.<i>.".
_TOP_NAMES = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
]
_BLOCK_NAMES = [
    ("scale_shift_table", "modulation"),
    ("attn1.to_out.0.", "self_attn.o."),
    ("attn2.to_out.0.", "cross_attn.o."),
    *[(f"{attn}.{ours}.", f"{wan}.{theirs}.")
      for attn, wan in (("attn1", "self_attn"), ("attn2", "cross_attn"))
      for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))],
    ("norm2.", "norm3."),  # diffusers' norm2 is Wan's cross-attention norm3
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
]


def _rename(key: str, source: int) -> str:
    """``key`` renamed from column ``source`` of the name tables to the other column (unknown names unchanged)."""
    block, rest = re.fullmatch(r"(blocks\.\d+\.)?(.*)", key, flags=re.DOTALL).groups()
    for pair in _BLOCK_NAMES if block else _TOP_NAMES:
        old, new = pair[source], pair[1 - source]
        if rest == old or (old.endswith(".") and rest.startswith(old)):
            return (block or "") + new + rest[len(old):]
    return key


def diffusers_to_wan_key(key: str) -> str:
    """Wan2.1's original name of a diffusers ``WanTransformer3DModel`` parameter (unknown names unchanged)."""
    return _rename(key, source=0)


def wan_to_diffusers_key(key: str) -> str:
    """diffusers' ``WanTransformer3DModel`` name of a Wan2.1 (OSPNext) parameter (unknown names unchanged)."""
    return _rename(key, source=1)


def diffusers_config(config: OSPNextConfig) -> dict[str, Any]:
    """A diffusers ``WanTransformer3DModel`` config.json for ``config`` (inverse of ``config_from_diffusers``).

    The attention layout is OSP-Next's own: diffusers runs every block with full attention."""
    return {
        "_class_name": "WanTransformer3DModel", "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads, "attention_head_dim": config.dim // config.num_heads,
        "in_channels": config.in_channels, "out_channels": config.out_channels, "text_dim": config.text_dim,
        "freq_dim": config.freq_dim, "ffn_dim": config.ffn_dim, "num_layers": config.num_layers,
        "cross_attn_norm": config.cross_attn_norm, "qk_norm": "rms_norm_across_heads" if config.qk_norm else None,
        "eps": config.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": config.rope_max_seq_len,
    }


def is_diffusers_state(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith("condition_embedder.") or ".attn1." in key for key in state)


def config_from_diffusers(data: dict[str, Any]) -> dict[str, Any]:
    """OSPNextConfig fields from a diffusers ``WanTransformer3DModel`` config.json."""
    if data.get("image_dim") is not None or data.get("added_kv_proj_dim") is not None:
        raise ValueError("this is an image-to-video Wan transformer (image_dim / added_kv_proj_dim set); "
                         "OSPNext implements text-to-video only: use a T2V checkpoint")
    qk_norm = data.get("qk_norm", "rms_norm_across_heads")
    if qk_norm not in ("rms_norm_across_heads", None):
        raise ValueError(f"diffusers qk_norm={qk_norm!r} is not Wan2.1's; only 'rms_norm_across_heads' or null load")
    heads, head_dim = data.get("num_attention_heads", 40), data.get("attention_head_dim", 128)
    return dict(
        patch_size=tuple(data.get("patch_size", (1, 2, 2))), in_channels=data.get("in_channels", 16),
        out_channels=data.get("out_channels") or data.get("in_channels", 16), dim=heads * head_dim,
        ffn_dim=data.get("ffn_dim", 13824), freq_dim=data.get("freq_dim", 256), text_dim=data.get("text_dim", 4096),
        num_heads=heads, num_layers=data.get("num_layers", 40), qk_norm=qk_norm is not None,
        cross_attn_norm=data.get("cross_attn_norm", True), eps=data.get("eps", 1e-6),
        rope_max_seq_len=data.get("rope_max_seq_len", 1024),
    )


def config_from_wan(data: dict[str, Any]) -> dict[str, Any]:
    """OSPNextConfig fields from an original Wan2.1 config.json (``dim``, ``num_heads``, ``in_dim`` ...)."""
    missing = [key for key in ("dim", "num_heads", "num_layers") if key not in data]
    if missing:
        raise ValueError(f"config.json is neither a diffusers Wan config (num_attention_heads) nor an original Wan "
                         f"config: it lacks {missing}; point from_pretrained at a Wan2.1 T2V checkpoint")
    fields = dict(dim=data["dim"], num_heads=data["num_heads"], num_layers=data["num_layers"])
    renames = {"in_dim": "in_channels", "out_dim": "out_channels", "ffn_dim": "ffn_dim", "freq_dim": "freq_dim",
               "text_dim": "text_dim", "text_len": "text_len", "qk_norm": "qk_norm",
               "cross_attn_norm": "cross_attn_norm", "eps": "eps", "patch_size": "patch_size"}
    fields.update({ours: data[theirs] for theirs, ours in renames.items() if theirs in data})
    return fields


def config_from_state(state: dict[str, torch.Tensor], num_heads: int | None) -> dict[str, Any]:
    """OSPNextConfig fields inferred from Wan-named tensors (a bare weight file has no config)."""
    try:
        dim, in_channels, *patch = state["patch_embedding.weight"].shape
        layers = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
        fields = dict(
            dim=dim, in_channels=in_channels, patch_size=tuple(patch),
            out_channels=state["head.head.weight"].shape[0] // math.prod(patch),
            ffn_dim=state["blocks.0.ffn.0.weight"].shape[0], text_dim=state["text_embedding.0.weight"].shape[1],
            freq_dim=state["time_embedding.0.weight"].shape[1], num_layers=max(layers) + 1,
            qk_norm="blocks.0.self_attn.norm_q.weight" in state,
            cross_attn_norm="blocks.0.norm3.weight" in state,
        )
    except KeyError as err:
        raise ValueError(f"cannot infer the model config: key {err} is missing; is this a Wan2.1 T2V checkpoint?")
    fields["num_heads"] = num_heads if num_heads is not None else max(1, dim // 128)
    return fields


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file (torch.load with weights_only=True)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors (a state dict)")
    return state


def read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All safetensors weights of a folder, following a ``*.safetensors.index.json`` when there is one."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def _read_source(path: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config fields, Wan-named state dict) of any accepted source."""
    if path.is_file():
        state = _strip_prefixes(read_weight_file(path))
        if is_diffusers_state(state):
            state = {diffusers_to_wan_key(key): value for key, value in state.items()}
        return config_from_state(state, overrides.get("num_heads")), state
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} does not exist")
    config_path = path / "config.json"
    if not config_path.exists():
        raise ValueError(f"{path} has no config.json; pass a weight file, or a diffusers / OSPNext folder")
    data = json.loads(config_path.read_text())
    if data.get("_class_name") == OWN_CLASS_NAME:
        data = {key: value for key, value in data.items() if not key.startswith("_")}
        return data, read_weight_file(path / OWN_WEIGHTS)
    fields = config_from_diffusers(data) if "num_attention_heads" in data else config_from_wan(data)
    state = _strip_prefixes(read_folder_weights(path))
    if is_diffusers_state(state):
        state = {diffusers_to_wan_key(key): value for key, value in state.items()}
    return fields, state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise one ValueError naming missing, unexpected and mis-shaped keys (counts and a few examples)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{key}: checkpoint {list(state[key].shape)} vs model {list(expected[key].shape)}"
                    for key in set(expected) & set(state) if state[key].shape != expected[key].shape)
    problems = [f"{len(items)} {what} (e.g. {items[:4]})"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("mis-shaped keys", shapes)) if items]
    if problems:
        raise ValueError(f"checkpoint {source} does not match the model config: " + "; ".join(problems)
                         + ". Check the config overrides (num_heads, num_layers, dims) or the checkpoint format")


def load_pretrained(cls: type, path: str | Path, **overrides: Any) -> Any:
    """Build ``cls`` (OSPNext) from any accepted source; ``overrides`` are OSPNextConfig fields."""
    path = Path(path)
    fields, state = _read_source(path, overrides)
    config = OSPNextConfig.from_dict(fields, **overrides)
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_pretrained(model: Any, path: str | Path) -> None:
    """``config.json`` (with ``_class_name: OSPNext``) + ``model.safetensors`` with Wan key names."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": OWN_CLASS_NAME, **model.config.to_dict()}
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    atomic_write(folder / OWN_WEIGHTS, lambda tmp: save_file(state, tmp))
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
