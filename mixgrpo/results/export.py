"""``mixgrpo export``: take a run's trained transformer to diffusers.

    mixgrpo export RUN_OR_CHECKPOINT --format peft --out DIR        # a LoRA run: a PEFT adapter
    mixgrpo export RUN_OR_CHECKPOINT --format diffusers --out DIR   # any run: a full WanTransformer3DModel folder

- ``peft``: ``adapter_config.json`` (written by peft itself) + ``adapter_model.safetensors`` with diffusers' Wan key
  names (``base_model.model.blocks.0.attn1.to_q.lora_A.weight`` ...), loaded into diffusers'
  ``WanTransformer3DModel`` with ``peft.PeftModel.from_pretrained(transformer, DIR)`` (docs/export.md).
- ``diffusers``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` that
  ``WanTransformer3DModel.from_pretrained(DIR)`` loads; a LoRA run's adapter is merged into the base weights first.

The weights are the checkpoint's EMA when the run kept one (``--no-ema`` for the raw weights). The output folder is
written under a temporary name and renamed into place, and an existing non-empty ``--out`` is refused unless
``--force``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixgrpo.engine.checkpoint import has_ema, read_model_weights, resolve_checkpoint
from mixgrpo.config import ExperimentConfig, load_config
from mixgrpo.results.outputs import check_output

LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.default\.weight$")


def run_config(checkpoint: Path) -> ExperimentConfig:
    """The configuration of the run a checkpoint (``RUN/checkpoints/iter_N``) belongs to."""
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{checkpoint} is not inside a run directory (no {config}); export needs the run's config")
    return load_config(config)


def peft_adapter(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LoRA tensors under peft's names for diffusers' Wan model, and the target module names (diffusers')."""
    from policies.osp_next.checkpoint import wan_to_diffusers_key

    adapter, targets = {}, set()
    for key, value in weights.items():
        match = LORA_KEY.match(key)
        if match is None:
            continue
        module = wan_to_diffusers_key(f"{match['module']}.weight").removesuffix(".weight")
        adapter[f"base_model.model.{module}.lora_{match['which']}.weight"] = value.contiguous()
        targets.add(module.split(".", 2)[-1])  # blocks.N.attn1.to_q -> attn1.to_q
    return adapter, sorted(targets)


def merged_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's weights under Wan names, with any LoRA adapter merged in (W + B A * alpha / r)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {}
    for key, value in transformer.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().float().contiguous().cpu()
    return state


def export(source: str | Path, *, fmt: str, out: Path, ema: bool = True, force: bool = False) -> Path:
    checkpoint = resolve_checkpoint(source)
    cfg = run_config(checkpoint)
    if fmt == "peft" and not cfg.learner.lora.enabled:
        raise ValueError(f"{checkpoint} is a full fine-tune (learner.lora.enabled=false): there is no adapter; "
                         "export the whole transformer with --format diffusers")
    out = check_output(out, force=force)  # never a run's folders; an existing folder only with --force
    if checkpoint.resolve().is_relative_to(Path(out).resolve()):
        raise ValueError(f"--out {out} holds the exported checkpoint; --force never replaces it: give a new folder")
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: a failed export leaves --out as it was
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "peft":
            _write_peft(cfg, read_model_weights(checkpoint, ema=ema), tmp)
        else:
            _write_diffusers(cfg, checkpoint, tmp, ema=ema)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_peft(cfg: ExperimentConfig, weights: dict[str, torch.Tensor], folder: Path) -> None:
    from peft import LoraConfig

    adapter, targets = peft_adapter(weights)
    lora = cfg.learner.lora
    LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets, lora_dropout=0.0,
               init_lora_weights="gaussian").save_pretrained(str(folder))
    save_file(adapter, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").chmod(0o644)  # safetensors writes 0600; the rest of the folder is 0644


def _write_diffusers(cfg: ExperimentConfig, checkpoint: Path, folder: Path, *, ema: bool) -> None:
    from mixgrpo.engine.policy_factory import build_policy, load_trained_weights
    from policies.osp_next.checkpoint import diffusers_config, wan_to_diffusers_key

    policy = build_policy(cfg, device="cpu")
    load_trained_weights(policy.transformer, checkpoint, ema=ema)
    state = {wan_to_diffusers_key(k): v for k, v in merged_state(policy.transformer).items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "diffusion_pytorch_model.safetensors").chmod(0o644)  # safetensors writes 0600, like the files beside it
    (folder / "config.json").write_text(json.dumps(diffusers_config(policy.transformer.config), indent=2))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a run's LoRA as a PEFT adapter or its transformer as a "
                                                  "diffusers folder", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (its newest intact checkpoint), its checkpoints/ folder or a checkpoint")
    parser.add_argument("--format", dest="fmt", choices=["peft", "diffusers"], required=True,
                        help="peft: the LoRA adapter with diffusers' key names; diffusers: the whole transformer "
                             "(LoRA merged) as a WanTransformer3DModel folder")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    parser.add_argument("--no-ema", dest="ema", action="store_false",
                        help="export the raw trained weights even when the run kept an EMA of them")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    checkpoint = resolve_checkpoint(args.source)
    out = export(checkpoint, fmt=args.fmt, out=args.out, ema=args.ema, force=args.force)
    ema = args.ema and has_ema(checkpoint)
    print(f"wrote {out} ({args.fmt}) from {checkpoint} ({'EMA weights' if ema else 'weights'})")
    return 0
