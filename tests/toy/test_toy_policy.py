"""The toy policy: shipped base loads, weights files round-trip, stale files are detected, base beats random."""

import json
import warnings

import pytest
import torch

import policies.toy.pretrain as pretrain_module
import policies.toy.policy as policy_module
from policies.base import Policy
from policies.toy import ToyPolicyConfig, build_toy_policy, load_toy_policy, make_toy_policy, save_toy_policy
from policies.toy.policy import ToyWeightsMismatch
from policies.toy.pretrain import pretrain_toy, sample_euler
from policies.toy.world import eval_prompts, train_prompts
from rewards.toy_fidelity import ToyFidelityReward


@pytest.fixture(scope="module")
def base():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped asset must load without the rebuild warning
        return build_toy_policy()


def test_shipped_base_loads_with_a_hybrid_layout(base):
    assert isinstance(base, Policy) and base.pretrain_info["steps"] > 0
    assert base.transformer.config.block_kinds() == ["full", "token", "group", "full"]
    assert base.transformer.config.sparse_ratio == 2
    c, t, h, w = base.latent_shape()
    x = torch.randn(2, c, t, h, w)
    v = base.velocity(x, torch.tensor([0.3, 0.9]), base.encode_text(["a red circle moving left", ""]))
    assert v.shape == x.shape and v.isfinite().all()
    assert not any(p.requires_grad for p in base.text_encoder.parameters())


def test_pretrained_base_beats_random_init_on_toy_fidelity(base):
    prompts = eval_prompts()  # held-out combinations
    seeds = list(range(len(prompts)))
    reward = ToyFidelityReward()
    base_scores = reward.breakdown(sample_euler(base, prompts, seeds=seeds, num_steps=12, guidance_scale=2.0), prompts)
    random_policy = make_toy_policy(seed=1)
    random_scores = reward.breakdown(sample_euler(random_policy, prompts, seeds=seeds, num_steps=12), prompts)
    means = {k: (float(base_scores[k].mean()), float(random_scores[k].mean())) for k in base_scores}
    print("toy_fidelity on eval prompts (base, random init):", means)
    # Shapes and motion were learned from clean captions; colour words were noisy in pretraining on purpose
    # (ToyPretrainConfig.colour_noise), so colour binding is partial: RL has something to fix.
    for attribute in ("shape", "direction"):
        assert means[attribute][0] > means[attribute][1] + 0.08, attribute
    assert means["colour"][1] + 0.1 < means["colour"][0] < 0.8
    assert means["total"][0] > means["total"][1] + 0.1


def test_colour_noise_changes_only_the_shown_colour_word():
    generator = torch.Generator().manual_seed(0)
    captions, shown, _ = pretrain_module.draw_batch(train_prompts(), 400, 0.0, generator, colour_noise=0.5)
    changed = 0
    for caption, text in zip(captions, shown):
        true, seen = caption.split(), text.split()
        assert true[:1] + true[2:] == seen[:1] + seen[2:]  # shape and direction words are never touched
        changed += true[1] != seen[1]
    # half the captions get a uniformly drawn colour, a quarter of those redraw the true one: 3/8 change
    assert 0.3 < changed / len(captions) < 0.45
    clean = pretrain_module.draw_batch(train_prompts(), 400, 0.0, torch.Generator().manual_seed(0))
    assert clean[0] == clean[1]
    with pytest.raises(ValueError, match="colour_noise"):
        pretrain_module.ToyPretrainConfig(colour_noise=1.5)


def test_pretrain_is_deterministic_and_save_load_round_trips(tmp_path):
    a = pretrain_toy(out_path=tmp_path / "a.safetensors", steps=2, batch_size=4, progress=False)
    b = pretrain_toy(out_path=tmp_path / "b.safetensors", steps=2, batch_size=4, progress=False)
    pa, pb = load_toy_policy(a), load_toy_policy(b)
    for (name, x), (_, y) in zip(pa.state_dict().items(), pb.state_dict().items()):
        assert torch.equal(x, y), name
    assert not torch.equal(pa.transformer.head.head.weight, make_toy_policy().transformer.head.head.weight)
    save_toy_policy(pa, tmp_path / "c.safetensors")
    pc = load_toy_policy(tmp_path / "c.safetensors")
    x, sigma = torch.randn(1, *pa.latent_shape()), torch.tensor([0.5])
    text = pa.encode_text(["a blue square moving up"])
    assert torch.equal(pa.velocity(x, sigma, text), pc.velocity(x, sigma, pc.encode_text(["a blue square moving up"])))


def test_stale_weights_are_detected(tmp_path):
    other = make_toy_policy(ToyPolicyConfig(dim=32, ffn_dim=64))
    path = save_toy_policy(other, tmp_path / "small.safetensors")
    with pytest.raises(ToyWeightsMismatch, match=r"another architecture \(fields \['dim', 'ffn_dim'\]\)"):
        load_toy_policy(path, expected=ToyPolicyConfig())
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["config"].update(dim=64, ffn_dim=128)  # claims the default architecture but holds dim-32 tensors
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ToyWeightsMismatch, match="do not fit the current transformer"):
        load_toy_policy(path, expected=ToyPolicyConfig())
    with pytest.raises(FileNotFoundError, match="mixgrpo toy-pretrain"):
        load_toy_policy(tmp_path / "missing.safetensors")


def test_missing_asset_is_rebuilt_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(policy_module, "ASSET_PATH", tmp_path / "assets" / "toy_policy.safetensors")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real, calls = pretrain_module.pretrain_toy, []

    def short_pretrain(**kwargs):  # the real pretraining, 2 steps instead of the default minutes
        calls.append(kwargs)
        return real(steps=2, batch_size=4, progress=False, **kwargs)

    monkeypatch.setattr(pretrain_module, "pretrain_toy", short_pretrain)
    with pytest.warns(UserWarning, match="pretraining a new one"):
        first = build_toy_policy()
    assert (tmp_path / "cache" / "mixgrpo" / "toy_policy.safetensors").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = build_toy_policy()
    assert len(calls) == 1
    assert torch.equal(first.transformer.head.head.weight, second.transformer.head.head.weight)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="height x width = 15 x 16"):
        ToyPolicyConfig(height=15)
    with pytest.raises(ValueError, match="num_heads"):
        ToyPolicyConfig(num_heads=3)
    with pytest.raises(ValueError, match="sample_euler got 1 prompts and 2 seeds"):
        sample_euler(make_toy_policy(), ["a red circle moving left"], seeds=[0, 1])
