"""pyproject.toml lists exactly what the library imports: every third-party module imported by mixgrpo, policies
and rewards is a declared dependency (or an extra, for optional parts), and every declared dependency is imported
or is one of the few needed at run time without an import by name."""

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "open_clip": "open-clip-torch", "flash_attn": "flash-attn",
                "flash_attn_interface": "flash-attn"}
PROVIDED_BY_TORCH = {"triton"}  # ships with torch's CUDA builds; imported only for CUDA tensors
RUNTIME_ONLY = {"pyarrow", "imageio-ffmpeg", "sentencepiece", "torchvision"}  # see the comments in pyproject.toml


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0])


def imported_modules() -> set[str]:
    found = set()
    for package in ("mixgrpo", "policies", "rewards"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module.split(".")[0])
                elif isinstance(node, ast.Constant) and node.value in ("flash_attn", "flash_attn_interface"):
                    found.add(node.value)  # imported by name through importlib
    own = {"mixgrpo", "policies", "rewards", "__future__"}
    return {m for m in found if m not in sys.stdlib_module_names and m not in own}


def test_every_import_is_declared_and_every_dependency_is_used():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {requirement_name(r) for r in project["dependencies"]}
    extras = {requirement_name(r) for rs in project["optional-dependencies"].values() for r in rs}
    imported = {normalise(DISTRIBUTION.get(m, m)) for m in imported_modules() - PROVIDED_BY_TORCH}
    undeclared = sorted(imported - required - extras)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = sorted(required - imported - {normalise(r) for r in RUNTIME_ONLY})
    assert not unused, f"declared but never imported (drop them, or list them as run-time only): {unused}"
    assert normalise("flash-attn") in extras and "tensorboard" in extras
