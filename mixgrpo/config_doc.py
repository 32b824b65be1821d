"""``mixgrpo config``: the resolved configuration as YAML, every key with its value and its one-line doc.

The docs are the attribute docstrings of the config dataclasses (the string right under a field, as in
``mixgrpo/config.py`` and ``policies/wan.py``); Python does not keep those at run time, so they are read from the
classes' source with ``ast``. The output is valid YAML: it can be saved and passed back as CONFIG.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
from typing import Any

import yaml


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: first sentence of its attribute docstring}`` of dataclass ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = _first_sentence(after.value.value)
    return docs


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    end = re.search(r"\.\s+(?=[A-Z`(])", flat)  # a full stop before a new sentence, not "e.g. 4n" or "1e-4 .."
    return flat if end is None else flat[: end.start() + 1]


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def annotated_yaml(config: Any) -> str:
    """``config`` (a dataclass) as YAML with a ``# doc`` comment after every documented key."""
    return "\n".join(_lines(config, 0)) + "\n"


def _lines(obj: Any, indent: int) -> list[str]:
    pad, docs, out = " " * indent, field_docs(type(obj)), []
    for f in dataclasses.fields(obj):
        value, doc = getattr(obj, f.name), docs.get(f.name)
        if doc is None and dataclasses.is_dataclass(value) and type(value).__doc__:
            doc = _first_sentence(type(value).__doc__)  # a section: its class's docstring
        comment = f"  # {doc}" if doc else ""
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:{comment}")
            out.extend(_lines(value, indent + 2))
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            out.append(f"{pad}{f.name}:{comment}")
            for item in value:
                item_lines = _lines(item, indent + 4)
                out.append(f"{pad}  - {item_lines[0].lstrip()}")
                out.extend(item_lines[1:])
        else:
            out.append(f"{pad}{f.name}: {_scalar(value)}{comment}")
    return out
