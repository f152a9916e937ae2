"""The runbook pages (docs/runbooks/<detector>.md, installed as fleetwatch.runbooks) alerts link to."""

from __future__ import annotations

import functools
import importlib.resources
import re

# A detector id: lower-case words joined by dots or underscores (nothing that walks out of the folder).
_DETECTOR_ID = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")


@functools.cache
def runbook_page(detector: str) -> str | None:
    """The markdown page of `detector`, or None when it has none."""
    if not _DETECTOR_ID.fullmatch(detector):
        return None
    page = importlib.resources.files("fleetwatch.runbooks") / f"{detector}.md"
    return page.read_text(encoding="utf-8") if page.is_file() else None
