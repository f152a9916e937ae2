"""The agent's mTLS: its settings checked at start, and its real stream to a collector that demands certificates."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from fleetwatch.agent.collectors import CollectorRotation
from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.runner import Agent
from fleetwatch.agent.sampler import Sampler
from fleetwatch.agent.sources.host import HostSource
from fleetwatch.agent.spool import Spool
from fleetwatch.agent.state import AgentState
from fleetwatch.agent.tls import load_channel_tls, open_channel, plaintext_warning
from fleetwatch.certs import init_ca, issue_into
from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.configfile import ConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_ca(directory)
    # Issued for a name only, not for 127.0.0.1: agents dialing the address need tls_server_name.
    issue_into(directory, "collector.internal", server=True)
    for node in ("n01", "n02"):
        issue_into(directory, node)
    return directory


def agent_config(tmp_path: Path, pki: Path, port: int = 1, *, node: str = "n01", cert: str = "n01", **overrides):
    values = {
        "node": node,
        "collector_address": f"127.0.0.1:{port}",
        "spool_dir": str(tmp_path / f"spool-{node}"),
        "spool_fsync": False,
        "sampling_interval_seconds": 0.2,
        "reconnect_min_seconds": 0.05,
        "reconnect_max_seconds": 0.2,
        "stop_drain_seconds": 1.0,
        "tls_ca_file": str(pki / "ca.crt"),
        "tls_cert_file": str(pki / f"{cert}.crt"),
        "tls_key_file": str(pki / f"{cert}.key"),
        "tls_server_name": "collector.internal",
    }
    return AgentConfig(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls_key_file": ""}, r"tls_key_file: must be set with tls_ca_file, tls_cert_file"),
        ({"tls_ca_file": "", "tls_cert_file": ""}, r"tls_ca_file, tls_cert_file: must be set with tls_key_file"),
        ({"tls_cert_file": "/nonexistent/n01.crt"}, r"tls_cert_file: cannot read /nonexistent/n01.crt"),
        ({"tls_ca_file": "KEY"}, r"tls_ca_file: .* holds no PEM certificate"),
        ({"tls_key_file": "OTHER_KEY"}, r"tls_key_file: .* are not a certificate and its key"),
        (
            {"tls_ca_file": "", "tls_cert_file": "", "tls_key_file": ""},
            r"tls_server_name: only means something with tls_ca_file",
        ),
    ],
)
def test_tls_settings_are_checked_naming_the_key(tmp_path: Path, pki: Path, overrides: dict, message: str) -> None:
    files = {"KEY": "n01.key", "OTHER_KEY": "n02.key"}
    overrides = {k: str(pki / files[v]) if v in files else v for k, v in overrides.items()}
    with pytest.raises(ConfigError, match=message):
        load_channel_tls(agent_config(tmp_path, pki, **overrides))


def test_complete_settings_load_with_the_server_name_override(tmp_path: Path, pki: Path) -> None:
    tls = load_channel_tls(agent_config(tmp_path, pki))
    assert tls is not None and tls.cert_chain_pem == (pki / "n01.crt").read_bytes()
    assert tls.options() == [("grpc.ssl_target_name_override", "collector.internal")]
    assert load_channel_tls(agent_config(tmp_path, pki, tls_server_name="")).options() == []  # type: ignore[union-attr]


def test_a_file_that_disappears_fails_one_connection_not_the_agent(tmp_path: Path, pki: Path) -> None:
    key = tmp_path / "n01.key"
    key.write_bytes((pki / "n01.key").read_bytes())
    config = agent_config(tmp_path, pki, tls_key_file=str(key))
    key.unlink()
    # ConnectionError is what the send loop logs and retries with backoff.
    with pytest.raises(ConnectionError, match="tls_key_file: cannot read"):
        open_channel(config, [])


def test_plaintext_to_another_machine_is_warned_about(tmp_path: Path, pki: Path) -> None:
    plain = {"tls_ca_file": "", "tls_cert_file": "", "tls_key_file": "", "tls_server_name": ""}
    remote = agent_config(tmp_path, pki, collector_address="collector.example:9470", **plain)
    assert "without TLS" in (plaintext_warning(remote) or "")
    assert plaintext_warning(agent_config(tmp_path, pki, collector_address="localhost:9470", **plain)) is None
    assert plaintext_warning(agent_config(tmp_path, pki, collector_address="collector.example:9470")) is None


async def start_collector(tmp_path: Path, pki: Path) -> CollectorApp:
    app = CollectorApp(
        CollectorConfig(
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'c.db'}",  # type: ignore[arg-type]
            log_alerts=False,
            tls_cert_file=str(pki / "collector.internal.crt"),
            tls_key_file=str(pki / "collector.internal.key"),
            tls_client_ca_file=str(pki / "ca.crt"),
        )
    )
    await app.start()
    return app


def make_agent(config: AgentConfig) -> Agent:
    spool = Spool(config.spool_dir, config.spool_max_bytes, fsync=False)
    host = HostSource()
    sampler = Sampler(AgentState(node=config.node), host=host, nvml=None)
    return Agent(config, node=config.node, sampler=sampler, spool=spool, boot_id=host.boot_id())


async def run_for(agent: Agent, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not agent.connected:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_agent_streams_over_mtls_verifying_the_collector_by_tls_server_name(tmp_path: Path, pki: Path) -> None:
    app = await start_collector(tmp_path, pki)
    try:
        agent = make_agent(agent_config(tmp_path, pki, app.grpc_port))
        await run_for(agent, 10)
        assert app.store.count_rows("batches") >= 1
        assert [n["node"] for n in app.store.nodes()] == ["n01"]
    finally:
        await app.stop(0.2)


async def test_agent_refuses_a_collector_certificate_not_issued_for_the_name_it_checks(
    tmp_path: Path, pki: Path
) -> None:
    app = await start_collector(tmp_path, pki)
    try:
        # Without the override the agent checks 127.0.0.1, which the certificate does not name.
        agent = make_agent(agent_config(tmp_path, pki, app.grpc_port, tls_server_name=""))
        await run_for(agent, 1.5)
        assert not agent.connected
        assert app.store.nodes() == []
    finally:
        await app.stop(0.2)


async def test_agent_dialing_an_address_its_collector_name_resolved_to_verifies_the_certificate_by_the_name(
    tmp_path: Path, pki: Path
) -> None:
    app = await start_collector(tmp_path, pki)
    try:
        entry = f"collector.internal:{app.grpc_port}"
        agent = make_agent(agent_config(tmp_path, pki, collector_address=entry, tls_server_name=""))
        # The name resolves to two collectors; the agent dials 127.0.0.1, the first, by address.
        dns = {"collector.internal": ["192.0.2.1", "127.0.0.1"]}
        agent.collectors = CollectorRotation([entry], resolve=lambda host, port: dns[host])
        await run_for(agent, 10)
        assert agent.collector.address == f"127.0.0.1:{app.grpc_port}" and agent.collector.resolved
        assert app.store.count_rows("batches") >= 1
    finally:
        await app.stop(0.2)


async def test_agent_with_n01s_certificate_cannot_stream_as_n02(
    tmp_path: Path, pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = await start_collector(tmp_path, pki)
    try:
        agent = make_agent(agent_config(tmp_path, pki, app.grpc_port, node="n02", cert="n01"))
        with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.runner"):
            await run_for(agent, 1.5)
        assert not agent.connected
        assert agent.spool.count > 0  # kept for when the right certificate is installed
        assert app.store.nodes() == [] and app.store.count_rows("batches") == 0
        assert any("not for node 'n02'" in r.getMessage() for r in caplog.records)
    finally:
        await app.stop(0.2)
