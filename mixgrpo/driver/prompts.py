"""Prompt sources: the toy world's captions, a text file (one prompt per line) or a JSONL file with extra fields.

A JSONL line is one object with a ``"prompt"`` string and any other fields, e.g.
``{"prompt": "a red circle moving left", "colour": "red"}``. The extra fields travel with the prompt and reach
the reward functions as keyword arguments, one value per sample (TRL passes dataset columns the same way):
``prompt_metadata`` turns the prompts of a batch into the ``metadata`` of ``RewardSet.submit``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixgrpo.config import PromptConfig
from rewards.base import RESERVED_METADATA

EXAMPLE_LINE = '{"prompt": "a red circle moving left", "colour": "red"}'


@dataclass
class Prompt:
    """One prompt: its ``text`` and the extra fields of its JSONL line (``{}`` for plain text)."""

    text: str
    fields: dict[str, Any] = field(default_factory=dict)


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """The prompts of a ``.jsonl`` file (one object per line) or of a text file (one prompt per line).

    Blank lines are skipped. A bad JSONL line raises ValueError naming the file, the line number and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts: no such prompt file {str(path)!r}; give a text file with one prompt per line "
                         "or a .jsonl file with one {\"prompt\": ...} object per line")
    try:
        lines = read_lines(path)
    except UnicodeDecodeError as error:
        raise ValueError(f"prompts: {str(path)!r} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    if path.suffix.lower() == ".jsonl":
        prompts = [_parse_jsonl_line(line, path, number) for number, line in enumerate(lines, 1) if line.strip()]
    else:
        prompts = [Prompt(line.strip()) for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts: {str(path)!r} holds no prompts; write one prompt per line")
    return prompts


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, with or without a byte-order mark, whatever its line endings (LF, CRLF, CR)."""
    with open(path, encoding="utf-8-sig", newline=None) as handle:  # newline=None: universal newlines
        return handle.read().split("\n")


def check_toy_captions(cfg: Any) -> None:
    """Raise ValueError (file, line and the fix) when the ``toy_fidelity`` reward is asked to score a prompt outside
    the toy grammar: it parses every caption, so a bad line would otherwise fail mid-run, in whichever iteration
    first draws it."""
    from policies.toy import world

    if "toy_fidelity" not in [spec.name for spec in cfg.rewards]:
        return
    sources = {cfg.prompts.source, cfg.prompts.eval_source, cfg.eval.prompts if cfg.eval.every else None}
    for source in sorted(s for s in sources if s not in (None, "toy") and Path(s).is_file()):
        jsonl = Path(source).suffix.lower() == ".jsonl"
        for number, line in enumerate(read_lines(Path(source)), 1):
            if not line.strip():
                continue
            text = _parse_jsonl_line(line, Path(source), number).text if jsonl else line.strip()
            try:
                world.parse_caption(text)
            except ValueError as error:
                raise ValueError(f"prompts: {source!r} line {number}: {error} (the toy_fidelity reward scores toy "
                                 "captions only)") from None


def _parse_jsonl_line(line: str, path: Path, number: int) -> Prompt:
    where = f"prompts: {str(path)!r} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error.msg} at column {error.colno}); write one JSON object "
                         f"per line, e.g. {EXAMPLE_LINE}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where} holds a JSON {type(record).__name__}, not an object; write one object per line, "
                         f"e.g. {EXAMPLE_LINE}")
    text = record.pop("prompt", None)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} has no \"prompt\" string (keys: {sorted(record) or 'none'}); give each object a "
                         f"non-empty \"prompt\", e.g. {EXAMPLE_LINE}")
    clashes = sorted(set(record) & set(RESERVED_METADATA))
    if clashes:
        raise ValueError(f"{where} has fields {clashes}, names the reward functions take for their own inputs "
                         f"({', '.join(RESERVED_METADATA)}); rename them")
    return Prompt(text.strip(), record)


def load_prompts(cfg: PromptConfig, *, eval: bool = False) -> list[Prompt]:
    """The training prompts (or, with ``eval=True``, those of the sample videos) the config names."""
    source = cfg.eval_source if eval and cfg.eval_source else cfg.source
    if source == "toy":
        from policies.toy import world

        return [Prompt(text) for text in (world.eval_prompts() if eval else world.train_prompts())]
    return read_prompt_file(source)


def field_names(prompts: Sequence[Prompt]) -> list[str]:
    """The extra fields any of ``prompts`` carries, in first-seen order."""
    return list(dict.fromkeys(name for prompt in prompts for name in prompt.fields))


def prompt_metadata(prompts: Sequence[Prompt], fields: Sequence[str] | None = None) -> dict[str, list[Any]]:
    """Per-sample metadata for ``RewardSet.submit``: field -> one value per prompt, None where a prompt lacks it.

    Pass one ``Prompt`` per sample (each group's prompt repeated ``group_size`` times) and ``fields``, the names
    of the whole prompt set (``field_names``): a batch that happens to draw no prompt with a field still passes it,
    as all None, so a reward that asks for it gets its argument. Without ``fields``, the batch's own names.
    """
    names = list(dict.fromkeys([*(fields or ()), *field_names(prompts)]))
    return {name: [prompt.fields.get(name) for prompt in prompts] for name in names}
