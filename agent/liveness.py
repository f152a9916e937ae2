"""Liveness of the agent's loops: the systemd watchdog is fed only while every loop makes progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from fleetwatch.systemd import notify

log = logging.getLogger(__name__)


class Heartbeats:
    """When each named loop last showed progress, and how long a wait it announced after that.

    A loop beats when it finishes a step; before a wait that is bounded by a timeout it beats
    with ``grace_seconds`` set to that timeout, so a long but bounded wait (a backoff sleep, the
    next sampling tick, a write with a deadline) does not read as a hang. A loop that is stuck in
    an unbounded wait, or whose task died, stops beating and goes stale.
    Beats come from the event loop thread only.
    """

    def __init__(self, names: Iterable[str], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._alive_until: dict[str, float] = {name: now for name in names}

    def beat(self, name: str, *, grace_seconds: float = 0.0) -> None:
        if name not in self._alive_until:
            raise KeyError(f"unknown loop {name!r}")
        self._alive_until[name] = self._clock() + max(0.0, grace_seconds)

    def stale(self, max_silence_seconds: float) -> dict[str, float]:
        """Loops silent for longer than ``max_silence_seconds`` past their last promise, with how long."""
        now = self._clock()
        return {name: now - until for name, until in self._alive_until.items() if now - until > max_silence_seconds}


class WatchdogFeeder:
    """Sends WATCHDOG=1 on each tick only while no loop is stale, so systemd restarts a wedged agent.

    ``interval_seconds`` is what fleetwatch.systemd.watchdog_interval_seconds() returns (half of
    WatchdogSec): a loop silent for longer than that stops the pings, and systemd kills the agent
    a WatchdogSec after the last one, instead of a stuck sender being papered over by a sampler
    that still pings. Tick it every half interval.
    """

    def __init__(
        self,
        heartbeats: Heartbeats,
        interval_seconds: float,
        *,
        send: Callable[[str], bool] = notify,
    ) -> None:
        self.heartbeats = heartbeats
        self.interval_seconds = interval_seconds
        self._send = send
        self._withheld = False  # logged once per stall, not on every tick of it

    def tick(self) -> bool:
        """Ping the watchdog if every loop is live; True when it pinged."""
        stale = self.heartbeats.stale(self.interval_seconds)
        if stale:
            if not self._withheld:
                log.error(
                    "not feeding the systemd watchdog: no progress from %s; systemd will restart the agent",
                    ", ".join(f"the {name} loop for {seconds:.1f} s" for name, seconds in sorted(stale.items())),
                )
                self._withheld = True
            return False
        if self._withheld:
            log.info("every loop is making progress again; feeding the systemd watchdog")
            self._withheld = False
        self._send("WATCHDOG=1")
        return True
