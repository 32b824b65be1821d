"""User-facing warnings in the library's own voice: one line ``mixgrpo: ...`` on stderr, and an event in the run's
``events.jsonl`` when they concern a run (``warnings.warn`` would print the library's file and line instead)."""

from __future__ import annotations

import sys
from typing import Any


def notice(message: str, *, log: Any = None, kind: str | None = None, **fields: Any) -> None:
    """Print ``mixgrpo: <message>`` (one line) to stderr; with a ``RunLog`` and an event ``kind``, log it too."""
    print(f"mixgrpo: {' '.join(message.split())}", file=sys.stderr, flush=True)
    if log is not None and kind is not None:
        log.event(kind, message=message, **fields)
