"""YAML as users write it, read with limits: ``safe_load`` with no alias bombs and no duplicate keys.

PyYAML's ``safe_load`` shares the object an alias points to, so a "billion laughs" document (nine anchors, each a
list of nine aliases of the one before) is cheap to load but expands to 9^9 items the moment anything walks it: the
config builder did, and ran until killed. Here the document is composed into nodes first and its size *with every
alias expanded* is counted (each node once per path to it, cached per node, stopped at the limit) before a single
Python object is made. A key that appears twice in one mapping is refused too: PyYAML keeps the later one silently,
so a config edited in two places would run with whichever happens to come last.

Syntax errors still raise ``yaml.YAMLError`` (callers already turn those into their own line with the position).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_NODES = 100_000
"""Nodes a document may expand to (aliases expanded). The shipped configs have a few hundred."""
MAX_BYTES = 16 * 2**20
"""A config file larger than this is refused before it is read."""
MERGE_KEY = "tag:yaml.org,2002:merge"


def safe_load(text: str, *, source: str, error: type[Exception] = ValueError, max_nodes: int = MAX_NODES) -> Any:
    """``yaml.safe_load(text)``, refusing (``error`` with one line naming ``source`` and the fix) a document that
    expands past ``max_nodes`` nodes, holds a recursive alias, or repeats a key within one mapping."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source=source, error=error, max_nodes=max_nodes)
        _check_duplicate_keys(node, source=source, error=error)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_file(path: str | Path, *, error: type[Exception] = ValueError, what: str = "config file") -> Any:
    """The YAML document in ``path`` (see :func:`safe_load`); a file over ``MAX_BYTES`` is refused unread."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise error(f"{what} {str(path)!r} is {size / 2**20:.0f} MiB, more than the {MAX_BYTES // 2**20} MiB a "
                    "config may be; give the YAML config itself")
    return safe_load(path.read_text(encoding="utf-8"), source=f"{what} {str(path)!r}", error=error)


def _check_size(root: yaml.Node, *, source: str, error: type[Exception], max_nodes: int) -> None:
    expanded: dict[int, int] = {}  # id(node) -> nodes under it, aliases expanded
    on_path: set[int] = set()

    def count(node: yaml.Node) -> int:
        key = id(node)
        if key in expanded:
            return expanded[key]
        if key in on_path:
            raise error(f"{source} line {node.start_mark.line + 1}: an alias refers to the node that holds it (a "
                        "recursive alias); write the value out instead of aliasing it")
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        for child in children:
            total += count(child)
            if total > max_nodes:
                raise error(f"{source}: its aliases expand to more than {max_nodes:,} values (an alias-expansion "
                            f"bomb, or a config far larger than any mixgrpo reads); write the values out without "
                            f"nested anchors (&) and aliases (*)")
        on_path.discard(key)
        expanded[key] = total
        return total

    count(root)


def _check_duplicate_keys(root: yaml.Node, *, source: str, error: type[Exception]) -> None:
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                stack.extend((key_node, value_node))
                if key_node.tag == MERGE_KEY or not isinstance(key_node, yaml.ScalarNode):
                    continue
                line = key_node.start_mark.line + 1
                if key_node.value in first_line:
                    raise error(f"{source} line {line}: key {key_node.value!r} appears twice in one mapping (first "
                                f"at line {first_line[key_node.value]}); keep one of them (YAML would silently "
                                "use the later)")
                first_line[key_node.value] = line
