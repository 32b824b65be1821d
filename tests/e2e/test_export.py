"""`mixgrpo export` on real tiny toy runs: the PEFT adapter, loaded by peft into diffusers' WanTransformer3DModel,
and the diffusers folder, loaded by `WanTransformer3DModel.from_pretrained`, give the output of mixgrpo's own trained
model (its layout set to full attention, which is what diffusers runs), within 1e-5 relative in float32."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from mixgrpo.engine.checkpoint import resolve_checkpoint
from mixgrpo.cli import main
from mixgrpo.results.export import merged_state, run_config
from mixgrpo.engine.policy_factory import build_policy
from policies.osp_next.checkpoint import diffusers_config, wan_to_diffusers_key

TINY = ["sampler.num_steps=4", "window.size=2", "rollout.prompts_per_iteration=2", "rollout.group_size=2",
        "train.num_videos=0", "learner.micro_batch_size=4", "train.device=cpu", "train.threads=1",
        "train.sample_videos_per_iteration=0", "train.iterations=2", "learner.lr=1e-2"]
LORA = ["learner.lora.enabled=true", "learner.lora.rank=4", "learner.lora.alpha=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    for name, extra in (("lora", LORA), ("full", [])):
        assert main(["train", *TINY, *extra, "--run-dir", str(root / name)]) == 0
    return root


def ours(run_dir):
    """mixgrpo's trained transformer (LoRA attached, not merged), in the full-attention layout diffusers runs."""
    checkpoint = resolve_checkpoint(run_dir)
    transformer = build_policy(run_config(checkpoint), device="cpu", checkpoint=checkpoint).transformer.eval()
    transformer.set_layout("full")
    return transformer


def inputs(transformer):
    config, g = transformer.config, torch.Generator().manual_seed(3)
    latents = torch.randn(2, config.in_channels, 2, 8, 8, generator=g)
    # text states of the full text_len: diffusers' pipeline pads to it outside the model, ours inside
    return latents, torch.tensor([250.0, 800.0]), torch.randn(2, config.text_len, config.text_dim, generator=g)


def relative(a, b):
    return float((a - b).norm() / b.norm())


def base_in_diffusers(run_dir) -> WanTransformer3DModel:
    """The run's untrained base as a diffusers model (its LoRA adapters start at zero: merging changes nothing)."""
    base = build_policy(run_config(resolve_checkpoint(run_dir)), device="cpu").transformer
    config = {k: v for k, v in diffusers_config(base.config).items() if not k.startswith("_")}
    model = WanTransformer3DModel(**config).eval()
    model.load_state_dict({wan_to_diffusers_key(k): v for k, v in merged_state(base).items()}, strict=True)
    return model


def test_peft_adapter_loads_into_diffusers_and_gives_our_output(runs, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    assert main(["export", str(runs / "lora"), "--format", "peft", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}
    trained = ours(runs / "lora")
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().max()) > 0 for p in lora_b)  # a trained adapter: the check can fail
    adapted = PeftModel.from_pretrained(base_in_diffusers(runs / "lora"), str(out)).eval()
    latents, timesteps, text = inputs(trained)
    with torch.no_grad():
        expected = trained(latents, timesteps, text)
        got = adapted(latents, timesteps, text, return_dict=False)[0]
    assert relative(got, expected) <= 1e-5
    with torch.no_grad(), adapted.disable_adapter():
        base_out = adapted(latents, timesteps, text, return_dict=False)[0]
    assert relative(base_out, expected) > 1e-4  # the adapter is what makes the difference


@pytest.mark.parametrize("run", ["full", "lora"])
def test_diffusers_folder_loads_with_from_pretrained_and_gives_our_output(runs, tmp_path, run):
    out = tmp_path / "diffusers"
    assert main(["export", str(runs / run), "--format", "diffusers", "--out", str(out)]) == 0
    model = WanTransformer3DModel.from_pretrained(str(out)).eval()
    trained = ours(runs / run)
    latents, timesteps, text = inputs(trained)
    with torch.no_grad():
        assert relative(model(latents, timesteps, text, return_dict=False)[0], trained(latents, timesteps, text)) <= 1e-5


def test_bad_exports_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    assert main(["export", str(runs / "full"), "--format", "peft", "--out", str(tmp_path / "a")]) == 2
    assert "is a full fine-tune" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["export", str(tmp_path / "nowhere"), "--format", "peft", "--out", str(tmp_path / "b")]) == 2
    assert "no such checkpoint, checkpoints folder or run directory" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", str(runs / "lora"), "--format", "peft", "--out", str(taken)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"
    assert main(["export", str(runs / "lora"), "--format", "peft", "--out", str(taken), "--force"]) == 0
    assert (taken / "adapter_model.safetensors").is_file() and not (taken / "keep.txt").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(["export", str(runs / "lora"), "--format", "peft", "--out", str(a_file), "--force"]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine"
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written export left behind
    for target in (runs / "lora", runs / "lora" / "checkpoints"):  # --force never replaces a run or its checkpoint
        before = sorted(p.name for p in target.iterdir())
        assert main(["export", str(runs / "lora"), "--format", "peft", "--out", str(target), "--force"]) == 2
        err = capsys.readouterr().err
        assert "is a run directory; write outside it" in err or "inside run directory" in err, err
        assert sorted(p.name for p in target.iterdir()) == before


def test_a_failed_export_leaves_no_temporary_folder(runs, tmp_path, monkeypatch):
    import mixgrpo.results.export as export_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_module.export(runs / "lora", fmt="peft", out=tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.glob(".*"))


def test_exported_files_are_all_readable_by_others(runs, tmp_path):
    out = tmp_path / "modes"
    assert main(["export", str(runs / "lora"), "--format", "peft", "--out", str(out)]) == 0
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes
