"""One bounded wait on several asyncio conditions: every wait in fleetwatch has a timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def wait_any(*conditions: asyncio.Event | Awaitable, timeout_seconds: float) -> None:
    """Return when any event is set or awaitable finishes, or after timeout_seconds."""
    futures = []
    for c in conditions:
        futures.append(asyncio.ensure_future(c.wait() if isinstance(c, asyncio.Event) else c))
    try:
        await asyncio.wait(futures, timeout=timeout_seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f, c in zip(futures, conditions):
            if isinstance(c, asyncio.Event):  # our own waiters; a caller's task is the caller's
                f.cancel()
