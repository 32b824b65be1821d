"""The import direction of the packages, read from the source (every import statement, at any depth).

policies/ and rewards/ know nothing of mixgrpo; inside mixgrpo the algorithm imports nothing of the engine,
the driver, run I/O or the experiment config; the engine never reaches up to the driver or run I/O; nothing but the
CLI imports the driver. A violation names the file, the line and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "policies": ("mixgrpo",),
    "rewards": ("mixgrpo",),
    "mixgrpo/algo": ("mixgrpo.engine", "mixgrpo.driver", "mixgrpo.results", "mixgrpo.config", "mixgrpo.cli"),
    "mixgrpo/engine": ("mixgrpo.driver", "mixgrpo.results", "mixgrpo.cli"),
    "mixgrpo/results": ("mixgrpo.driver", "mixgrpo.cli"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(folder: str, banned: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == b or module.startswith(b + ".") for b in banned):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_direction(folder):
    assert violations(folder, FORBIDDEN[folder]) == []


def test_only_the_cli_imports_the_driver():
    outside = [p for p in (ROOT / "mixgrpo").glob("*.py") if p.name not in {"cli.py"}]
    bad = [f"{p.name}:{line} imports {m}" for p in outside for line, m in imported_modules(p)
           if m.startswith("mixgrpo.driver")]
    assert bad == []


def test_the_check_sees_a_violation(tmp_path):
    """The walker finds an import nested in a function, as the rule needs (a lazy import is still a dependency)."""
    (tmp_path / "m.py").write_text("def f():\n    from mixgrpo.driver.trainer import Trainer\n")
    assert imported_modules(tmp_path / "m.py") == [(2, "mixgrpo.driver.trainer"), (2, "mixgrpo.driver.trainer.Trainer")]


OVER_BOUND = {
    "mixgrpo/config.py": "the experiment config is not yet split into sections owned by their components",
    "rewards/ensemble.py": "the unused asynchronous scoring path (submit/ScoreHandle) is not yet removed",
}
"""Files still over the 500-line bound, each with what is left to do (issue 13 is open until this is empty). A file
that drops under the bound must leave this list, so the list cannot go stale."""


def test_no_module_too_long_and_no_folder_too_wide():
    """No library file over 500 lines (but the known ones above), no library folder with more than 12 modules."""
    long_files, wide = {}, []
    for package in ("mixgrpo", "policies", "rewards"):
        for path in (ROOT / package).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > 500:
                long_files[str(path.relative_to(ROOT))] = lines
        for folder in [ROOT / package, *[p for p in (ROOT / package).rglob("*") if p.is_dir()]]:
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            if len(modules) > 12:
                wide.append(f"{folder.relative_to(ROOT)}: {len(modules)} modules")
    assert sorted(long_files) == sorted(OVER_BOUND), long_files
    assert wide == []
