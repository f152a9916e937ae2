"""The systemd watchdog is fed only while both the sample loop and the send loop make progress."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from fleetwatch.agent.liveness import Heartbeats, WatchdogFeeder
from tests.agent.test_runner import free_port, make_agent, until


class FakeClock:
    def __init__(self) -> None:
        self.now_seconds = 1000.0

    def __call__(self) -> float:
        return self.now_seconds

    def advance(self, seconds: float) -> None:
        self.now_seconds += seconds


def feeder(clock: FakeClock, interval_seconds: float = 15.0) -> tuple[Heartbeats, WatchdogFeeder, list[str]]:
    heartbeats = Heartbeats(("sample", "send"), clock=clock)
    sent: list[str] = []

    def send(message: str) -> bool:
        sent.append(message)
        return True

    return heartbeats, WatchdogFeeder(heartbeats, interval_seconds, send=send), sent


def test_fed_while_both_loops_beat() -> None:
    clock = FakeClock()
    heartbeats, watchdog, sent = feeder(clock)
    for _ in range(10):
        clock.advance(5)
        heartbeats.beat("sample")
        heartbeats.beat("send")
        assert watchdog.tick()
    assert sent == ["WATCHDOG=1"] * 10


def test_not_fed_while_the_sender_is_wedged_though_the_sampler_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    heartbeats, watchdog, sent = feeder(clock)
    heartbeats.beat("send")  # then it wedges: no beat, no announced wait
    with caplog.at_level(logging.ERROR, logger="fleetwatch.agent.liveness"):
        for _ in range(8):
            clock.advance(2.5)
            heartbeats.beat("sample")
            watchdog.tick()
    # Pinged for the first 15 s of silence (the watchdog interval), never after.
    assert sent == ["WATCHDOG=1"] * 6
    assert not watchdog.tick()
    assert heartbeats.stale(15.0).keys() == {"send"}
    (line,) = [r.getMessage() for r in caplog.records]  # once per stall, not once per tick
    assert "the send loop" in line and "sample" not in line

    heartbeats.beat("send")  # unwedged: fed again
    assert watchdog.tick()


def test_a_bounded_wait_announced_with_grace_is_not_a_hang() -> None:
    clock = FakeClock()
    heartbeats, watchdog, _ = feeder(clock)
    heartbeats.beat("send", grace_seconds=30)  # e.g. a 30 s reconnect backoff
    for _ in range(4):
        clock.advance(10)
        heartbeats.beat("sample")
        assert watchdog.tick()  # 40 s in: 30 s of grace plus 10 s of silence, within 15 s
    clock.advance(10)
    heartbeats.beat("sample")
    assert not watchdog.tick()  # 50 s: 20 s past what it promised


def test_a_stuck_sampling_cycle_stops_the_pings_too() -> None:
    clock = FakeClock()
    heartbeats, watchdog, _ = feeder(clock)
    heartbeats.beat("sample")  # a cycle starts and NVML hangs
    clock.advance(16)
    heartbeats.beat("send", grace_seconds=1)
    assert not watchdog.tick()


# -- the same through a running agent and a real NOTIFY_SOCKET --------------------------------------


async def test_a_running_agent_stops_feeding_the_watchdog_while_its_sender_is_wedged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@fleetwatch-test-{os.getpid()}-{time.monotonic_ns()}"
    notify_socket.bind("\0" + address[1:])
    notify_socket.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    # A 1 s watchdog interval, ticked every 0.5 s: short, with room for a slow sampling cycle on a busy CI box.
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    pings: list[float] = []

    def drain() -> None:
        while True:
            try:
                message = notify_socket.recv(4096)
            except BlockingIOError:
                return
            if message == b"WATCHDOG=1":
                pings.append(time.monotonic())

    # No collector: the sender cycles through failed connects and backoff, which is progress.
    agent = make_agent(tmp_path, free_port(), interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    release = asyncio.Event()
    try:
        await until(lambda: (drain(), len(pings) >= 3)[1], 5, "watchdog pings while the sender backs off")

        async def wedged_stream(channel: object, stop_sending: asyncio.Event) -> None:
            await release.wait()  # an await with no timeout that never ends, until the test says so
            raise ConnectionError("unwedged")

        monkeypatch.setattr(agent, "_stream_once", wedged_stream)
        await asyncio.sleep(1.7)  # the next connect attempt wedges, then the interval and a tick pass
        drain()
        pings.clear()
        samples_before = agent.state.samples_total
        await asyncio.sleep(2.0)
        drain()
        assert pings == [], "the watchdog was fed while the sender was wedged"
        assert agent.state.samples_total > samples_before  # the sampler went on all along

        release.set()
        await until(lambda: (drain(), len(pings) >= 2)[1], 5, "pings once the sender moves again")
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, 10)
        notify_socket.close()
