"""`fleetwatchctl history` on a throttled GPU: its clock falls at the fault, from raw samples and,
after the clock jumps past raw retention, from the 1-minute rollups that outlive them.

A simulated node (the fake NVML driven by the agent's own NVML source) streams to a real collector
over gRPC; the collector's clock is the test's, so three days pass in a moment.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest

from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.ctl.main import main as ctl_main
from fleetwatch.sim.fake_nvml import make_fake_nvml
from fleetwatch.sim.node import SimNode
from fleetwatch.sim.scenario import Fault
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import fill_metrics

START = 1_765_000_020.0
FAULT_AT_SECONDS = 150.0
SECONDS = 300
GPU = 2
BLOCKS = "▁▂▃▄▅▆▇█"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sparkline(output: str, field: str) -> str:
    [line] = [line for line in output.splitlines() if line.startswith(field)]
    return "".join(ch for ch in line if ch in BLOCKS or ch == " ").strip()


def history(port: int, capsys: pytest.CaptureFixture[str]) -> str:
    args = ["--collector", f"http://127.0.0.1:{port}", "history", "n03", "--gpu", str(GPU)]
    args += ["--field", "sm_clock_mhz", "--start", str(START), "--end", str(START + SECONDS), "--width", "10"]
    assert ctl_main(args) == 0
    return capsys.readouterr().out


async def test_history_shows_the_clock_falling_from_raw_samples_then_from_rollups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock(START)
    config = CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        log_alerts=False,
    )
    app = CollectorApp(config, clock=clock)
    await app.start()
    try:
        sim = SimNode(
            "n03",
            faults=[Fault(kind="thermal_slowdown", gpu=GPU, at_seconds=FAULT_AT_SECONDS)],
            start=START,
            clock=clock,
        )
        source = NvmlSource(make_fake_nvml(sim), clock=clock)
        source.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            call = channel.stream_stream(
                "/fleetwatch.v1.Telemetry/Stream",
                request_serializer=pb.AgentMessage.SerializeToString,
                response_deserializer=pb.CollectorMessage.FromString,
            )()
            await call.write(pb.AgentMessage(hello=pb.Hello(node="n03", boot_id="b" * 32, t=START)))
            assert (await call.read()).WhichOneof("body") == "welcome"
            for seq in range(1, SECONDS + 1):
                clock.now = START + seq
                samples, _ = source.sample()
                batch = pb.Batch(seq=seq, t=clock.now)
                for s in samples:
                    fill_metrics(batch.gpus.add(gpu=s["gpu"], t=s["t"], uuid=s["uuid"]).metrics, s["metrics"])
                await call.write(pb.AgentMessage(batch=batch))
                assert (await call.read()).ack.seq == seq
            await call.done_writing()
        source.close()

        raw = await asyncio.to_thread(history, app.http_port, capsys)
        assert "raw samples" in raw
        line = sparkline(raw, "sm_clock_mhz")
        assert len(line) == 10
        # Full clock before the fault (first half of the range), throttled after it.
        assert set(line[:4]) == {"█"} and set(line[6:]) == {"▁"}

        # Three days on: raw samples are past retention, compacted, rolled up and dropped.
        clock.now += (config.raw_retention_hours + 1) * 3600
        await asyncio.to_thread(app.maintain_storage)
        assert app.store.count_rows("sample_blocks") == 0 and app.store.count_rows("batches") == 0

        later = await asyncio.to_thread(history, app.http_port, capsys)
        assert "1-minute rollups" in later
        line = sparkline(later, "sm_clock_mhz")
        assert set(line[:4]) == {"█"} and set(line[6:]) == {"▁"}
        low, high = re.search(r"sm_clock_mhz\s+(\d+)\s+(\d+)", later).groups()  # type: ignore[union-attr]
        assert float(low) < float(high)
    finally:
        await app.stop(grace_seconds=0.2)
