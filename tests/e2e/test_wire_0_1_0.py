"""An agent of 0.1.0 streams into today's collector: the wire contract fleetwatch.v1 stays compatible.

tests/fixtures/wire-0.1.0/ holds the .proto as 0.1.0 shipped it. The 0.1.0 agent is played by a
separate process that imports modules generated from that file, and nothing else of fleetwatch, so
what crosses the socket is exactly what a 0.1.0 agent sends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.e2e_support import Collector, clean_env, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
OLD_PROTO_ROOT = ROOT / "tests" / "fixtures" / "wire-0.1.0"
PROTO = "fleetwatch/v1/telemetry.proto"

# Speaks the 0.1.0 messages over a real channel: Hello, one batch with a GPU sample and an XID,
# then waits for the ack. The generic stub takes the old classes' own (de)serialisers.
OLD_AGENT = textwrap.dedent(
    """
    import sys, time
    import grpc
    from fleetwatch.v1 import telemetry_pb2 as pb
    assert pb.__file__.startswith(sys.path[0]), pb.__file__  # the 0.1.0 modules, not today's

    def messages():
        yield pb.AgentMessage(hello=pb.Hello(node="old-agent", boot_id="b010", agent_version="0.1.0",
            gpus=[pb.GpuInfo(index=0, uuid="GPU-old", name="NVIDIA H100 80GB HBM3", pci_bus_id="0000:18:00.0")],
            sampling_interval_seconds=1.0, t=time.time(), nvml_available=True))
        now = time.time()
        yield pb.AgentMessage(batch=pb.Batch(seq=1, t=now, boot_id="b010",
            gpus=[pb.GpuSample(gpu=0, t=now, uuid="GPU-old", metrics=pb.GpuMetrics(gpu_util_percent=97.0,
                power_watts=612.5, temp_gpu_celsius=61.0))],
            host=pb.HostSample(t=now, metrics=pb.HostMetrics(cpu_percent=12.5)),
            events=[pb.Event(t=now, kind="xid", gpu=0, xid=79, pci_bus_id="0000:18:00.0",
                message="GPU has fallen off the bus.", source="nvml")]))
        time.sleep(5)  # keep the stream open until the ack has come back

    with grpc.insecure_channel(sys.argv[1]) as channel:
        stream = channel.stream_stream("/fleetwatch.v1.Telemetry/Stream",
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.CollectorMessage.FromString)
        for reply in stream(messages(), timeout=20):
            print(reply.WhichOneof("body"), flush=True)
            if reply.WhichOneof("body") == "ack" and reply.ack.seq == 1:
                break
    """
)


@pytest.fixture(scope="module")
def old_generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Modules generated from the 0.1.0 .proto, in a folder of their own."""
    pytest.importorskip("grpc_tools")
    out = tmp_path_factory.mktemp("wire-0.1.0")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{OLD_PROTO_ROOT}", f"--python_out={out}", PROTO],
        check=True,
    )
    for package in ("fleetwatch", "fleetwatch/v1"):
        (out / package / "__init__.py").touch()
    return out


def _fields(proto_root: Path, tmp_path: Path) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(message, field) -> (number, type, label) from a compiled descriptor set."""
    from google.protobuf import descriptor_pb2

    out = tmp_path / f"{proto_root.name}.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", f"--descriptor_set_out={out}", PROTO],
        check=True,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {
        (message.name, field.name): (field.number, field.type, field.label)
        for message in files.file[0].message_type
        for field in message.field
    }


def test_every_0_1_0_field_keeps_its_number_type_and_label(tmp_path):
    pytest.importorskip("grpc_tools")
    old = _fields(OLD_PROTO_ROOT, tmp_path)
    new = _fields(ROOT / "proto", tmp_path)
    changed = {key: (value, new.get(key)) for key, value in old.items() if new.get(key) != value}
    assert changed == {}, "fields of the 0.1.0 contract changed or vanished"
    reused = {
        key: number
        for key, (number, _, _) in new.items()
        if key not in old and (key[0], number) in {(m, n) for (m, _), (n, _, _) in old.items()}
    }
    assert reused == {}, "new fields reuse numbers of 0.1.0 fields"


def test_a_0_1_0_agent_streams_into_the_new_collector(tmp_path, old_generated):
    collector = Collector(tmp_path / "collector.db", free_port(), free_port(), tmp_path / "collector.log")
    grpc_port = collector.args[collector.args.index("--grpc-listen") + 1]
    collector.start()
    try:
        # -I keeps the checkout, PYTHONPATH and user site out; the old modules go first on the path.
        script = f"import sys; sys.path.insert(0, {str(old_generated)!r})\n{OLD_AGENT}"
        agent = subprocess.run(
            [sys.executable, "-I", "-c", script, grpc_port],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
        assert agent.returncode == 0, agent.stderr
        assert agent.stdout.split()[:1] == ["welcome"] and "ack" in agent.stdout.split()

        def status() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{collector.http_port}/api/v1/status", timeout=5) as r:
                return json.load(r)

        wait_for(lambda: any(n["node"] == "old-agent" for n in status()["nodes"]), 10, "the old agent's node")
        (node,) = [n for n in status()["nodes"] if n["node"] == "old-agent"]
        assert node["agent_version"] == "0.1.0"
        assert node["gpus"][0]["metrics"]["power_watts"] == 612.5
        with urllib.request.urlopen(f"http://127.0.0.1:{collector.http_port}/api/v1/alerts", timeout=5) as r:
            alerts = json.load(r)["alerts"]
        assert [(a["detector"], a["node"], a["gpu"]) for a in alerts] == [("xid", "old-agent", 0)]
    finally:
        collector.stop()
