"""OSP-Next checkpoints: diffusers folders (single and sharded), original Wan files, our own format, errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from policies.osp_next import OSPNext, OSPNextConfig
from policies.osp_next.checkpoint import config_from_diffusers, diffusers_to_wan_key, wan_to_diffusers_key
from tests.policies.osp_fixtures import pad_text, tiny_diffusers_wan, tiny_inputs


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference():
    return tiny_diffusers_wan(num_layers=2)


@pytest.fixture(scope="module")
def reference_output(reference):
    latents, timesteps, text = tiny_inputs(batch=2, text_tokens=5)
    with torch.no_grad():
        return reference(latents, timesteps, pad_text(text), return_dict=False)[0]


def _output(model):
    with torch.no_grad():
        return model(*tiny_inputs(batch=2, text_tokens=5))


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single_file", "sharded"])
def test_diffusers_folder_loads_and_matches(reference, reference_output, tmp_path, shard):
    kwargs = {} if shard is None else {"max_shard_size": shard}
    reference.save_pretrained(tmp_path, **kwargs)
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == (shard is not None)
    model = OSPNext.from_pretrained(tmp_path, text_len=8).eval()
    assert model.config.num_heads == 2 and model.config.dim == 24 and model.config.block_kinds() == ["full"] * 2
    assert _rel(_output(model), reference_output) <= 1e-5


def test_layout_overrides_choose_sparse_blocks(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    model = OSPNext.from_pretrained(tmp_path, text_len=8, layout="dual_end", num_full_blocks=0, sparse_ratio=2)
    assert [block.kind for block in model.blocks] == ["token", "group"]
    assert model.config.sparse_ratio == 2


def _original_state(reference):
    return {diffusers_to_wan_key(key): value.clone() for key, value in reference.state_dict().items()}


def test_export_names_are_the_load_names_reversed(reference):
    names = list(reference.state_dict())
    wan_names = [diffusers_to_wan_key(name) for name in names]
    assert set(wan_names) == set(OSPNext(OSPNextConfig(**config_from_diffusers(dict(reference.config)))).state_dict())
    assert [wan_to_diffusers_key(name) for name in wan_names] == names


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_original_wan_file_round_trip(reference, reference_output, tmp_path, fmt):
    state = {f"model.{key}": value for key, value in _original_state(reference).items()}  # a prefixed export
    path = tmp_path / f"wan.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    # A bare file has no config: it is inferred from shapes; heads (not inferable) come as an override.
    model = OSPNext.from_pretrained(path, num_heads=2, text_len=8).eval()
    assert (model.config.ffn_dim, model.config.freq_dim, model.config.text_dim) == (48, 16, 16)
    assert _rel(_output(model), reference_output) <= 1e-5


def test_original_wan_folder_with_config(reference, reference_output, tmp_path):
    save_file(_original_state(reference), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    config = dict(dim=24, num_heads=2, num_layers=2, ffn_dim=48, freq_dim=16, in_dim=4, out_dim=4, text_dim=16,
                  text_len=8, eps=1e-6, model_type="t2v", window_size=[-1, -1])
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = OSPNext.from_pretrained(tmp_path).eval()
    assert _rel(_output(model), reference_output) <= 1e-5


def test_own_format_round_trip_keeps_config_and_weights(tmp_path):
    config = OSPNextConfig.preset("tiny", num_layers=3, layout=["full", "token", "group"], sparse_ratio=2)
    model = OSPNext(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = OSPNext.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == config
    assert torch.equal(_output(loaded), _output(model))
    assert OSPNext.from_pretrained(tmp_path / "ckpt", layout="full").config.block_kinds() == ["full"] * 3


def test_key_mismatch_errors_name_the_keys(reference, tmp_path):
    state = _original_state(reference)
    del state["blocks.1.ffn.2.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(1)
    state["blocks.0.self_attn.q.bias"] = torch.zeros(7)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as err:
        OSPNext.from_pretrained(tmp_path / "bad.safetensors", num_heads=2, text_len=8)
    message = str(err.value)
    assert "1 missing keys (e.g. ['blocks.1.ffn.2.bias'])" in message
    assert "1 unexpected keys (e.g. ['blocks.0.extra.weight'])" in message
    assert "1 mis-shaped keys" in message and "checkpoint [7] vs model [24]" in message
    # Wrong overrides surface as mismatches too.
    save_file(_original_state(reference), str(tmp_path / "good.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        OSPNext.from_pretrained(tmp_path / "good.safetensors", num_heads=2, text_len=8, num_layers=3)


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        OSPNext.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        OSPNext.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2, "image_dim": 1280}))
    with pytest.raises(ValueError, match="image-to-video"):
        OSPNext.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match=r"lacks \['dim', 'num_heads', 'num_layers'\]"):
        OSPNext.from_pretrained(tmp_path)
