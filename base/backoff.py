"""Exponential backoff with jitter, for the agent's reconnects and the collector's delivery retries."""

from __future__ import annotations

import random


def backoff_seconds(retry: int, minimum_seconds: float, maximum_seconds: float, rng: random.Random) -> float:
    """The delay before retry number `retry` (0 for the first): a random time between half and all
    of a ceiling that starts at `minimum_seconds` and doubles each retry up to `maximum_seconds`.

    The jitter spreads a fleet that failed together (every agent losing the same collector, every
    delivery to the same dead webhook) so that it does not come back in lockstep; the lower half
    of the ceiling is kept so a retry still waits at least half its turn.
    """
    ceiling_seconds = minimum_seconds
    # Doubled in a loop, not as minimum * 2**retry: after hours of failures 2**retry is too large
    # for a float (OverflowError), and the loop stops at the maximum after a few doublings.
    for _ in range(retry):
        if ceiling_seconds >= maximum_seconds:
            break
        ceiling_seconds *= 2
    ceiling_seconds = min(ceiling_seconds, maximum_seconds)
    return rng.uniform(ceiling_seconds / 2, ceiling_seconds)
