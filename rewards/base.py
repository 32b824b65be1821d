"""The reward contract: videos + prompts in, one float score per video out.

Shape legend: B = videos in the batch, T = frames, C = channels (RGB), H, W = pixels,
N = images (frames of several videos flattened), F = frames sampled per video.

A reward is called as ``reward(videos_BTCHW, prompts, **metadata) -> scores_B`` with videos float in [0, 1].
``Reward.__call__`` validates inputs and output so every reward fails the same way on bad data; subclasses
only implement ``score``. Image rewards subclass ``PerFrameReward`` and implement ``score_images``: frames are
sampled evenly in time and their scores averaged. A reward that is made of parts can also report them:
``score_with_details`` returns the score with named per-sample component scores (``validate_details``).

Metadata: per-sample fields (e.g. the extra fields of a JSONL prompt file) arrive as keyword arguments, each a
sequence aligned with the videos. A score function receives the fields it names as parameters, or all of them
when it takes ``**kwargs`` (``accepted_metadata``), so a reward that ignores metadata works with any prompt file.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def validate_videos(videos_BTCHW: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise ValueError unless ``videos_BTCHW`` is a float [B, T, C, H, W] tensor in [0, 1] with B prompts."""
    if not isinstance(videos_BTCHW, torch.Tensor):
        raise ValueError(
            f"videos must be a torch.Tensor [B, T, C, H, W], got {type(videos_BTCHW).__name__}; "
            "stack decoded frames with torch.stack"
        )
    if videos_BTCHW.ndim != 5:
        raise ValueError(
            f"videos must have rank 5 [B, T, C, H, W], got shape {tuple(videos_BTCHW.shape)}; "
            "add a frame axis with videos.unsqueeze(1) for single images"
        )
    if not videos_BTCHW.is_floating_point():
        raise ValueError(
            f"videos must be floating point in [0, 1], got dtype {videos_BTCHW.dtype}; "
            "convert uint8 frames with videos.float() / 255"
        )
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of str, one per video")
    if len(prompts) != videos_BTCHW.shape[0]:
        raise ValueError(
            f"len(prompts) = {len(prompts)} but videos has B = {videos_BTCHW.shape[0]}; pass one prompt per video"
        )
    if videos_BTCHW.numel() == 0:
        return
    lo, hi = videos_BTCHW.aminmax()
    if not (lo >= 0.0 and hi <= 1.0):  # also false for NaN
        raise ValueError(
            f"videos must lie in [0, 1], got min {lo.item():.4g} max {hi.item():.4g}; "
            "map VAE output from [-1, 1] with (x + 1) / 2 and clamp"
        )


def validate_scores(
    scores_B: Any, batch_size: int, reward_name: str, *, component: str | None = None
) -> torch.Tensor:
    """Return ``scores_B`` as a float32 tensor [B] or raise ValueError naming the reward (and ``component``)."""
    what = f"reward {reward_name!r}" + ("" if component is None else f" component {component!r}")
    if not isinstance(scores_B, torch.Tensor):
        raise ValueError(f"{what} returned {type(scores_B).__name__}; it must return a tensor [B]")
    if scores_B.shape != (batch_size,):
        raise ValueError(
            f"{what} returned shape {tuple(scores_B.shape)}; it must return one score per video, "
            f"shape ({batch_size},)"
        )
    return scores_B.detach().float()


def validate_details(details: Any, batch_size: int, reward_name: str) -> dict[str, torch.Tensor]:
    """Return component scores as ``{name: float32 [B]}`` or raise ValueError naming the reward and component.

    Names must be identifiers because they become column names (``reward/<reward>/<component>/mean``), where
    a ``/`` or a space would make the columns ambiguous to split back apart.
    """
    if not isinstance(details, Mapping):
        raise ValueError(
            f"reward {reward_name!r} returned details of type {type(details).__name__}; score_with_details must "
            "return (scores [B], {component name: tensor [B]})"
        )
    out: dict[str, torch.Tensor] = {}
    for component, values_B in details.items():
        if not isinstance(component, str) or not component.isidentifier():
            raise ValueError(
                f"reward {reward_name!r} returned component name {component!r}; use a simple identifier "
                "(letters, digits, _; e.g. 'colour') since it becomes part of metric column names"
            )
        out[component] = validate_scores(values_B, batch_size, reward_name, component=component)
    return out


RESERVED_METADATA: tuple[str, ...] = ("prompts", "completions", "videos_BTCHW")
"""Names a metadata field cannot take: they are the positional inputs of the score functions."""


def accepted_metadata(fn: Callable[..., Any], metadata: Mapping[str, Any], *, positional: int = 0) -> dict[str, Any]:
    """The fields of ``metadata`` that ``fn`` accepts: all of them if it takes ``**kwargs``, else those it names.

    ``positional``: how many leading parameters the caller fills by position (videos, prompts); their names are not
    metadata fields. Like TRL, which hands every dataset column to reward functions; unlike TRL, a function
    without ``**kwargs`` is not broken by a field it never asked for.
    """
    if not metadata:
        return {}
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature (a builtin): pass everything, as TRL does
        return dict(metadata)
    filled = {p.name for p in params[:positional]}  # a field of that name would collide with the positional input
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {k: v for k, v in metadata.items() if k not in filled}
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    named = {p.name for p in params[positional:] if p.kind in keyword}
    return {k: v for k, v in metadata.items() if k in named}


def sample_frame_indices(num_frames: int, num_samples: int) -> torch.Tensor:
    """Indices of ``num_samples`` frames evenly spaced over ``num_frames`` (first and last included).

    With ``num_samples >= num_frames`` every frame is used once.
    """
    if num_frames < 1 or num_samples < 1:
        raise ValueError(f"need num_frames >= 1 and num_samples >= 1, got {num_frames} and {num_samples}")
    if num_samples >= num_frames:
        return torch.arange(num_frames)
    return torch.linspace(0, num_frames - 1, num_samples).round().long()


class Reward(abc.ABC):
    """Base class of all rewards.

    Component scores: a reward built from parts (e.g. colour, shape and motion checks) can override
    ``score_with_details`` to return ``(scores [B], {component: scores [B]})``. Each component is a float
    tensor [B] (NaN allowed, as for scores) and its name a simple identifier such as ``"colour"``; the
    trainer logs ``reward/<name>/<component>/mean``. The components are reported only: advantages and the
    aggregate use the score alone. The default returns ``(self(...), {})``.

    Attributes:
        name: registry name, used as the score column.
        batch_size: hint for the scoring service: the most videos to pass per call (None = any).
        device: where ``score`` runs; set by ``setup``.
    """

    name: str = "reward"
    batch_size: int | None = None

    def __init__(self, *, name: str | None = None, batch_size: int | None = None) -> None:
        if name is not None:
            self.name = name
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        if batch_size is not None:
            self.batch_size = batch_size
        self.device = torch.device("cpu")
        self._is_setup = False

    def setup(self, device: str | torch.device = "cpu") -> None:
        """Load weights onto ``device``. Called once before scoring; ``__call__`` runs it on CPU if skipped."""
        self.device = torch.device(device)
        self._load(self.device)
        self._is_setup = True

    def _load(self, device: torch.device) -> None:
        """Hook for subclasses that hold weights: build the model on ``device``. Weight-free rewards keep this."""

    @abc.abstractmethod
    def score(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        """Return float scores [B] for already validated inputs."""

    def __call__(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        validate_videos(videos_BTCHW, prompts)
        if not self._is_setup:
            self.setup(self.device)
        kwargs = accepted_metadata(self.score, metadata, positional=2)
        with torch.no_grad():
            scores_B = self.score(videos_BTCHW.to(self.device), list(prompts), **kwargs)
        return validate_scores(scores_B, videos_BTCHW.shape[0], self.name)

    def score_with_details(
        self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores [B] plus named per-sample component scores ``{name: [B]}``; override to report components.

        An override should validate like ``__call__`` (inputs with ``validate_videos``, outputs with
        ``validate_scores`` and ``validate_details``); the scoring service checks the outputs again.
        """
        return self(videos_BTCHW, prompts, **metadata), {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size})"


class PerFrameReward(Reward):
    """An image reward applied to videos: ``num_frames`` frames evenly spaced in time, scores averaged."""

    def __init__(self, *, num_frames: int = 4, name: str | None = None, batch_size: int | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 (frames sampled per video), got {num_frames}")
        self.num_frames = num_frames

    @abc.abstractmethod
    def score_images(self, images_NCHW: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Return float scores [N] for images in [0, 1], one prompt per image."""

    def score(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        b, t = videos_BTCHW.shape[:2]
        idx_F = sample_frame_indices(t, self.num_frames).to(videos_BTCHW.device)
        frames_BFCHW = videos_BTCHW.index_select(1, idx_F)
        f = frames_BFCHW.shape[1]
        frame_prompts = [p for p in prompts for _ in range(f)]
        scores_N = self.score_images(frames_BFCHW.flatten(0, 1), frame_prompts)
        return scores_N.float().view(b, f).mean(dim=1)


class FunctionReward(Reward):
    """Wraps a plain function ``fn(videos_BTCHW, prompts, **metadata) -> Tensor[B]`` as a Reward."""

    def __init__(self, fn: Callable[..., torch.Tensor], *, name: str, batch_size: int | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size)
        self.fn = fn

    def score(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        return torch.as_tensor(self.fn(videos_BTCHW, prompts, **accepted_metadata(self.fn, metadata, positional=2)))


class TRLReward(Reward):
    """Adapts a TRL-style reward ``fn(prompts, completions=None, **kwargs) -> list[float | None]``.

    ``completions`` are the videos, one [T, C, H, W] tensor per prompt, and each metadata field arrives as a
    keyword argument holding one value per prompt (TRL passes dataset columns the same way). ``None`` means
    "does not apply to this sample" and becomes NaN: the sample keeps the other rewards' contribution (TRL's
    rule), and the scoring service counts and reports it instead of hiding it.
    """

    def __init__(self, fn: Callable[..., Sequence[float | None]], *, name: str, batch_size: int | None = None) -> None:
        super().__init__(name=name, batch_size=batch_size)
        self.fn = fn

    def score(self, videos_BTCHW: torch.Tensor, prompts: Sequence[str], **metadata: Any) -> torch.Tensor:
        kwargs = accepted_metadata(self.fn, metadata)
        values = list(self.fn(prompts=list(prompts), completions=list(videos_BTCHW.unbind(0)), **kwargs))
        if len(values) != len(prompts):
            raise ValueError(
                f"reward {self.name!r} returned {len(values)} values for {len(prompts)} prompts; return one per prompt"
            )
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
