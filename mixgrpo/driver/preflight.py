"""Everything about an experiment that can be checked before its run directory is made or any model loads.

Field ranges are checked where each field is declared (``mixgrpo/config.py``); this module checks what needs
more than one field or the machine: reward names and their constructor arguments, sequence-parallel degrees
against the model, the device, the files the config names, the Ray cluster's resources, and whether mp4s can be written (an optional artefact:
only reported). Every problem is one ``ConfigError`` line naming the field and the fix.
"""

from __future__ import annotations

from pathlib import Path

from mixgrpo.config import ConfigError, ExperimentConfig
from mixgrpo.driver.prompts import check_toy_captions


def validate_experiment(cfg: ExperimentConfig) -> list[str]:
    """Raise ConfigError on the first problem; return warnings about optional parts (e.g. no mp4 encoder)."""
    check_rewards(cfg)
    check_device(cfg)
    check_files(cfg)
    check_optional_packages(cfg)
    _as_config_error(check_toy_captions, cfg)  # a caption the toy reward cannot parse: refused now, not mid-run
    from mixgrpo.engine.policy_factory import check_parallel_degrees

    try:
        check_parallel_degrees(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.rollout.backend == "ray":  # the cluster has what the run asks for (N x S ranks, S per node)
        from mixgrpo.driver.ray_workers import cluster_fits

        cluster_fits(cfg)
    if cfg.rollout.backend == "ray" or any(spec.backend == "ray" for spec in cfg.rewards):
        check_gpus(cfg)
    from mixgrpo.results.media import mp4_writer_missing

    missing = mp4_writer_missing()
    return [] if missing is None else [f"videos are written as contact sheets only: {missing}"]


def check_gpus(cfg: ExperimentConfig) -> None:
    """Every GPU the run asks for (worker groups and reward actors) fits the cluster's nodes, or ConfigError now."""
    import ray

    from mixgrpo.driver.placement import check_gpu_placement, gpu_demand
    from mixgrpo.driver.ray_workers import ensure_ray

    ensure_ray()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    device = cfg.train.device
    has_gpus = any(node.get("GPU", 0) for node in nodes)
    use_gpu = cfg.rollout.backend == "ray" and (device.startswith("cuda") or (device == "auto" and has_gpus))
    demand = gpu_demand(num_workers=cfg.rollout.num_workers, sp_size=cfg.rollout.sp_size, use_gpu=use_gpu,
                        reward_specs=cfg.rewards)
    if demand.total == 0:
        return
    try:
        check_gpu_placement(demand, [node.get("GPU", 0.0) for node in nodes])
    except RuntimeError as error:
        raise ConfigError(str(error)) from None


def _as_config_error(check, cfg: ExperimentConfig) -> None:
    try:
        check(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_rewards(cfg: ExperimentConfig) -> None:
    from rewards.arg_types import ArgTypeError
    from rewards.registry import check_args

    for index, spec in enumerate(cfg.rewards):
        try:
            check_args(spec.name, spec.args)
        except ArgTypeError as error:  # named as the override that sets it: rewards.0.args.colour_sigma
            raise ConfigError(f"rewards.{index}.{error} (reward {spec.name})") from None
        except (ValueError, ImportError) as error:
            raise ConfigError(f"rewards[{index}] ({spec.name}): {error}") from None


def check_optional_packages(cfg: ExperimentConfig) -> None:
    """An optional extra the config needs is installed: refused before the run directory exists, not mid-build."""
    import importlib.util

    if cfg.policy.quantization == "fp8" and importlib.util.find_spec("torchao") is None:
        raise ConfigError("policy.quantization=fp8 needs torchao: pip install 'mixgrpo[fp8]', or set "
                          "policy.quantization=none or hif8")


def check_device(cfg: ExperimentConfig) -> None:
    """The local backend runs the model in this process, so its device must exist here (Ray workers check theirs)."""
    import torch

    device = cfg.train.device
    if cfg.rollout.backend != "local" or not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={device} but this machine has no visible GPU; use train.device=cpu (or "
                          "auto), or check CUDA_VISIBLE_DEVICES and the driver")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={device} but only {torch.cuda.device_count()} GPUs are visible; use "
                          f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def check_files(cfg: ExperimentConfig) -> None:
    policy = cfg.policy
    if policy.kind == "toy" and policy.weights is not None and not Path(policy.weights).is_file():
        raise ConfigError(f"policy.weights: no such file {policy.weights!r}; give a toy base made by `mixgrpo "
                          "toy-pretrain --out FILE`, or leave it unset for the shipped one")
    # Files are checked here, for the run that reads them, not in the config sections: `mixgrpo config NAME`
    # prints a shipped config whose paths are still to be filled in, and `sample` never reads the prompt files.
    prompts = cfg.prompts
    if prompts.source != "toy" and not Path(prompts.source).is_file():
        raise ConfigError(f"prompts.source: no such prompt file {prompts.source!r}; give a text file with one prompt "
                          "per line, a .jsonl file, or 'toy'")
    if prompts.eval_source not in (None, "toy") and not Path(prompts.eval_source).is_file():
        raise ConfigError(f"prompts.eval_source: no such prompt file {prompts.eval_source!r}")
    if cfg.eval.every and cfg.eval.prompts != "toy" and not Path(cfg.eval.prompts).is_file():
        raise ConfigError(f"eval.prompts: no such prompt file {cfg.eval.prompts!r}; give a text or .jsonl file, or "
                          "'toy' for the toy world's held-out captions")
    if policy.kind == "wan":
        try:
            policy.check_sources()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for field in ("model_dir", "transformer_path", "text_encoder_path", "tokenizer_path", "vae_path"):
            value = getattr(policy, field)
            if value is not None and not Path(value).expanduser().exists():
                raise ConfigError(f"policy.{field}: {value!r} does not exist; point it at a local folder (weights "
                                  "are never downloaded)")
