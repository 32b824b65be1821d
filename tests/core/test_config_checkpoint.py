"""Config validation messages and checkpoint atomicity / corruption fallback."""

import warnings
from pathlib import Path

import pytest
import torch

from mixgrpo.engine.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from mixgrpo.config import ConfigError, config_from_dict, dump_config, load_config, parse_overrides
from mixgrpo.cli import quickstart_path


def test_quickstart_config_loads_and_round_trips(tmp_path):
    cfg = load_config(quickstart_path())
    again = tmp_path / "config.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.iterations=7", "sampler.eta=0.5", "rewards=[{name: a, weight: 2}]",
                             "learner.lora.enabled=true"])
    assert cfg.train.iterations == 7 and cfg.sampler.eta == 0.5
    assert cfg.rewards[0].name == "a" and cfg.rewards[0].weight == 2.0
    assert cfg.learner.lora.enabled is True
    assert parse_overrides(["learner.lora.rank=4"]) == {"learner": {"lora": {"rank": 4}}}


@pytest.mark.parametrize("override, field, expected", [
    ("learner.mixed_precision=no", ("learner", "mixed_precision"), "no"),       # YAML 1.1 would read False
    ("policy.quantization=none", ("policy", "quantization"), "none"),
    ("policy.gradient_checkpointing=on", ("policy", "gradient_checkpointing"), True),
    ("policy.gradient_checkpointing=off", ("policy", "gradient_checkpointing"), False),
    ("name=off", ("name",), "off"),
    ("policy.weights=null", ("policy", "weights"), None),
    ("learner.lr=1e-4", ("learner", "lr"), 1e-4),                                 # YAML 1.1 reads a string here
    ("rewards.0.weight=2", ("rewards", 0, "weight"), 2.0),
    ("learner.lora.targets.1=self_attn.o", ("learner", "lora", "targets", 1), "self_attn.o"),
    ("eval.seeds=[5, 6]", ("eval", "seeds"), [5, 6]),
    ("rewards.0.args.colour_sigma=1e-4", ("rewards", 0, "args"), {"colour_sigma": 1e-4}),  # a field of any type
])
def test_overrides_are_read_by_the_type_of_their_field(override, field, expected):
    value = load_config("quickstart", [override])
    for key in field:
        value = value[key] if isinstance(key, int) else getattr(value, key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("rewards.3.weight=1", r"rewards has 1 items \(indices 0..0\); give the whole list"),
    ("rewards.x.weight=1", r"rewards is a list; address an item by its index, e.g. rewards.0"),
    ("learner.lrr=1", r"unknown config key learner.lrr; did you mean learner.lr\?"),
    ("learner.lr=[1", r"override learner.lr=\[1: not a valid value"),
    ("train.iterations.x=1", r"train.iterations is not a section"),
])
def test_bad_overrides_say_which_and_how_to_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", [override])


@pytest.mark.parametrize(
    "values, words",
    [
        ({"train": {"iterashuns": 3}}, ["train.iterashuns", "did you mean train.iterations"]),
        ({"train": {"iterations": 0}}, ["train.iterations", ">= 1"]),
        ({"sampler": {"num_steps": 10}, "window": {"size": 12}}, ["window.size", "sampler.num_steps"]),
        ({"rollout": {"group_size": 1}}, ["rollout.group_size", ">= 2"]),
        ({"window": {"kind": "sliding"}}, ["window.kind", "progressive"]),
        ({"learner": {"kl_coeff": 0.1}}, ["kl_reference", "frozen_copy"]),
        ({"rewards": [{"name": "x"}, {"name": "x"}]}, ["unique"]),
        ({"train": {"seed": "abc"}}, ["train.seed", "number"]),
    ],
)
def test_bad_values_name_the_field_and_the_fix(values, words):
    with pytest.raises(ConfigError) as error:
        config_from_dict(values)
    for word in words:
        assert word in str(error.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["iterations"])


def _save(root, iteration, value):
    return save_checkpoint(root, iteration, tensors={"model": {"w": torch.full((3,), float(value))}},
                           objects={"rng": {"torch": torch.get_rng_state()}}, state={"window": {"start": value}}, keep=2)


def test_checkpoints_keep_the_newest_and_round_trip(tmp_path):
    for it in (1, 2, 3):
        _save(tmp_path, it, it)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000002", "iter_000003"]
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.iteration == 3 and ckpt.state["window"] == {"start": 3}
    assert torch.equal(ckpt.tensors["model"]["w"], torch.full((3,), 3.0))
    assert torch.equal(ckpt.objects["rng"]["torch"], torch.get_rng_state())


@pytest.mark.parametrize("damage", ["truncate", "no_manifest"])
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    _save(tmp_path, 1, 1)
    latest = _save(tmp_path, 2, 2)
    if damage == "truncate":
        blob = latest / "model.safetensors"
        blob.write_bytes(blob.read_bytes()[:20])
    else:
        (latest / "manifest.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.iteration == 1
    assert any("iter_000002" in str(w.message) for w in caught)


def test_half_written_temporary_folder_is_ignored(tmp_path):
    _save(tmp_path, 1, 1)
    (tmp_path / ".tmp-iter_000002-999").mkdir()
    assert load_latest_checkpoint(tmp_path).iteration == 1


@pytest.mark.parametrize("name", ["osp_next_14b_videoalign.yaml", "osp_next_14b_hif8_videoalign.yaml", "wan1.3b_mixgrpo.yaml"])
def test_shipped_experiment_configs_load(tmp_path, name):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    path = Path(quickstart_path()).parent / name
    from mixgrpo.driver.preflight import check_files

    unfilled = load_config(path, [])  # a shipped config loads (and prints) before its paths are filled in ...
    with pytest.raises(ConfigError, match=r"prompts.source: no such prompt file 'prompts.txt'"):
        check_files(unfilled)  # ... and a run's preflight asks for them
    with pytest.raises(ConfigError, match=r"policy.model_dir: set it to a local diffusers-format Wan2.1 folder"):
        check_files(load_config(path, [f"prompts.source={prompts}"]))
    cfg = load_config(path, [f"prompts.source={prompts}", f"policy.model_dir={tmp_path}"])
    check_files(cfg)
    assert cfg.policy.kind == "wan" and cfg.sampler.num_steps == 25


def test_osp_next_recipe_numbers():
    """The OSP-Next recipe as the release code runs it (reference/osp_next.md section 5.2)."""
    cfg = load_config("osp_next_14b_videoalign",
                      ["policy.model_dir=x", "prompts.source=toy"])
    assert (cfg.learner.lora.rank, cfg.learner.lora.alpha) == (32, 64.0)
    assert (cfg.window.kind, cfg.window.start, cfg.window.size) == ("frozen", 0, 10)
    assert (cfg.sampler.shift, cfg.sampler.guidance_scale, cfg.rollout.group_size) == (7.5, 5.0, 4)
    assert (cfg.learner.clip_range, cfg.learner.kl_coeff) == (1e-4, 0.004)


def test_hif8_experiment_quantizes_rollout_and_learner_by_default():
    path = "osp_next_14b_hif8_videoalign"
    cfg = load_config(path, ["policy.model_dir=x", "prompts.source=toy"])
    assert cfg.policy.quantization == "hif8" and cfg.learner.mixed_precision == "bf16"


def test_resume_refuses_a_changed_config_but_allows_more_iterations(tmp_path):
    from mixgrpo.driver.trainer import check_resume_config

    cfg = load_config(quickstart_path())
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    check_resume_config(load_config(quickstart_path(), ["train.iterations=99"]), tmp_path)
    with pytest.raises(ConfigError, match=r"learner.lr: 0.0006 -> 0.001.*new --run-dir"):
        check_resume_config(load_config(quickstart_path(), ["learner.lr=1e-3"]), tmp_path)


def test_resolve_checkpoint_accepts_a_run_a_checkpoints_folder_or_a_checkpoint(tmp_path):
    from mixgrpo.engine.checkpoint import resolve_checkpoint, save_checkpoint

    root = tmp_path / "run" / "checkpoints"
    for iteration in (1, 2):
        save_checkpoint(root, iteration, tensors={"model": {"w": torch.ones(2) * iteration}}, objects={}, state={},
                        keep=5)
    (root / "iter_000003").mkdir()  # an unfinished newer one (no manifest) is skipped
    assert resolve_checkpoint(tmp_path / "run") == root / "iter_000002"
    assert resolve_checkpoint(root) == root / "iter_000002"
    assert resolve_checkpoint(root / "iter_000001") == root / "iter_000001"
    with pytest.raises(ValueError, match="not usable"):
        resolve_checkpoint(root / "iter_000003")
    with pytest.raises(ValueError, match="no intact checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="no such"):
        resolve_checkpoint(tmp_path / "missing")
