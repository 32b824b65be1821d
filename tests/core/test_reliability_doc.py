"""docs/reliability.md cannot drift from the tests: every test it names exists, and every reliability test is
named in it."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_named_test_exists_and_every_reliability_test_is_named():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", doc)
    assert len(named) >= 25
    missing = [f"{path}::{name}" for path, name in named if name not in functions(ROOT / path)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
    absent = []
    for probes in ("test_reliability.py", "test_reliability_inputs.py"):
        covered = {name for path, name in named if path == f"tests/core/{probes}"}
        absent += sorted(functions(ROOT / "tests" / "core" / probes) - covered)
    assert not absent, f"reliability tests missing from docs/reliability.md: {absent}"
