"""Name -> reward factory registry, filled by ``@register_reward`` and the ``mixgrpo.rewards`` entry points.

Three registration styles, chosen explicitly (no signature sniffing):

- ``style="factory"`` (default): a ``Reward`` subclass or a function ``(**args) -> Reward``;
- ``style="function"``: a plain score function ``fn(videos_BTCHW, prompts, **metadata) -> Tensor[B]``;
- ``style="trl"``: a TRL-style function ``fn(prompts, completions=None, **kwargs) -> list[float | None]``.

Installed packages add rewards through the entry-point group ``mixgrpo.rewards``: the entry-point name is the
reward name, its value the object to register as a factory. If importing that object already registered the
name (its module used ``@register_reward``), that registration is kept. Entry points are listed once, on first
use, and each is imported only when its reward is built, so a broken plugin only breaks its own reward.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, TypeVar

from rewards.arg_types import check_arg_types
from rewards.base import FunctionReward, Reward, TRLReward

ENTRY_POINT_GROUP = "mixgrpo.rewards"
Style = Literal["factory", "function", "trl"]

_REGISTRY: dict[str, Callable[..., Reward]] = {}
_SOURCES: dict[str, object] = {}  # the registered object, to tell re-registration from a name clash
T = TypeVar("T")


def register_reward(name: str, *, style: Style = "factory") -> Callable[[T], T]:
    """Decorator registering a reward under ``name``; returns the decorated object unchanged."""
    if not name or not isinstance(name, str):
        raise ValueError(f"reward name must be a non-empty str, got {name!r}")
    if style not in ("factory", "function", "trl"):
        raise ValueError(f"style must be 'factory', 'function' or 'trl', got {style!r}")

    def decorator(obj: T) -> T:
        if not callable(obj):
            raise ValueError(f"register_reward({name!r}) needs a class or function, got {type(obj).__name__}")
        previous = _SOURCES.get(name)
        if previous is not None and previous is not obj:
            raise ValueError(
                f"reward name {name!r} is already registered by {_describe(previous)}; pick another name"
            )
        _REGISTRY[name] = _factory(obj, name, style)
        _SOURCES[name] = obj
        return obj

    return decorator


def _factory(obj: Any, name: str, style: Style) -> Callable[..., Reward]:
    if style == "function":
        return functools.partial(FunctionReward, obj, name=name)
    if style == "trl":
        return functools.partial(TRLReward, obj, name=name)
    if isinstance(obj, type) and issubclass(obj, Reward):
        return functools.partial(_build_class, obj, name)
    return obj


def _build_class(cls: type[Reward], name: str, **args: Any) -> Reward:
    return cls(name=args.pop("name", name), **args)


def _describe(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def refresh_entry_points() -> None:
    """Forget the cached entry-point list (after installing a plugin into a running process)."""
    _entry_points.cache_clear()


def available() -> list[str]:
    """Sorted names of registered rewards and of not-yet-imported entry-point rewards."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _load_entry_point(name: str) -> None:
    ep = _entry_points()[name]
    try:
        obj = ep.load()
    except Exception as exc:
        raise ImportError(
            f"reward {name!r} comes from entry point {ep.value!r} (group {ENTRY_POINT_GROUP!r}) which failed to "
            f"import: {exc}; fix or uninstall that package"
        ) from exc
    if name not in _REGISTRY:
        register_reward(name)(obj)


def check_args(name: str, args: dict[str, Any]) -> None:
    """Raise ValueError when reward ``name`` is unknown or its constructor would refuse ``args`` (a missing required
    argument, or one it does not take), without building it: checked before any model loads."""
    if name not in _REGISTRY and name in _entry_points():
        _load_entry_point(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available()) or '(none)'}")
    source, factory = _SOURCES[name], _REGISTRY[name]
    target = source if isinstance(source, type) and issubclass(source, Reward) else factory
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin or an object without a signature: nothing to check
        return
    given = dict(args)
    if target is source and "name" in signature.parameters:
        given.setdefault("name", name)
    try:
        signature.bind(**given)
    except TypeError as error:
        takes = [p for p in signature.parameters if p != "name" and
                 signature.parameters[p].kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        raise ValueError(f"reward {name!r} cannot take args {sorted(args)}: {error}; it takes {takes}") from None
    check_arg_types(target, args)  # each value against the constructor's annotation of it (rewards/arg_types.py)
    rule = getattr(source, "check_arg_combination", None)  # rules between arguments that a signature cannot say
    if callable(rule):
        rule(args)


def build(name: str, **args: Any) -> Reward:
    """Instantiate the reward registered as ``name`` with keyword ``args``."""
    if name not in _REGISTRY and name in _entry_points():
        _load_entry_point(name)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown reward {name!r}; available: {', '.join(available()) or '(none)'}. Register one with "
            f"@rewards.register_reward({name!r}) or install a package declaring it in the "
            f"{ENTRY_POINT_GROUP!r} entry-point group"
        )
    reward = _REGISTRY[name](**args)
    if not isinstance(reward, Reward):
        raise ValueError(
            f"factory of reward {name!r} returned {type(reward).__name__}, not a rewards.Reward; register plain "
            "score functions with style='function' or TRL-style ones with style='trl'"
        )
    return reward
