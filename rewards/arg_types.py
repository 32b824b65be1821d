"""Reward arguments checked against the annotations of the reward's constructor, before anything loads.

A config gives reward arguments as free-form YAML (``rewards.0.args.colour_sigma=abc``); without this check a
wrong type surfaces mid-run as a traceback from inside the reward (``'>' not supported between 'str' and 'int'``).
Only plain annotations are checked (``int``, ``float``, ``bool``, ``str``, paths, lists, tuples, dicts, Literal,
Optional and unions of those); anything else is the reward's own business.
"""

from __future__ import annotations

import inspect
import os
import typing
from pathlib import PurePath
from typing import Any, Literal


class ArgTypeError(ValueError):
    """A reward argument has the wrong type; ``argument`` names it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def check_arg_types(target: Any, args: dict[str, Any]) -> None:
    """Raise ArgTypeError for the first of ``args`` whose value does not fit ``target``'s annotation of it."""
    try:
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # annotations that do not resolve (forward references, optional imports): nothing to check
        return
    for name, value in args.items():
        if name in hints and fits(value, hints[name]) is False:
            raise ArgTypeError(name, f"args.{name} must be {describe(hints[name])}, got {value!r}")


def fits(value: Any, annotation: Any) -> bool | None:
    """Whether ``value`` fits ``annotation``; None when the annotation is not one this module checks."""
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        results = [fits(value, option) for option in params]
        return True if any(r is True for r in results) else None if any(r is None for r in results) else False
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in params
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (os.PathLike, PurePath) or (isinstance(annotation, type) and issubclass(annotation, PurePath)):
        return isinstance(value, (str, os.PathLike))
    if annotation in (list, tuple) or origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [p for p in params if p is not Ellipsis]
        if len(inner) == 1:
            return None if any(fits(v, inner[0]) is None for v in value) else all(fits(v, inner[0]) for v in value)
        return True
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    return None


def describe(annotation: Any) -> str:
    """``float`` -> 'a number', ``int | None`` -> 'an integer or null', ..."""
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return " or ".join(describe(p) for p in params)
    if origin is Literal:
        return "one of " + ", ".join(repr(p) for p in params)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             dict: "a mapping"}
    if annotation in names:
        return names[annotation]
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return f"a list of {describe(params[0])}s" if params and params[0] is not Ellipsis else "a list"
    if origin is dict:
        return "a mapping"
    return "a path" if isinstance(annotation, type) and issubclass(annotation, PurePath) else str(annotation)
