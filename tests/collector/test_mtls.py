"""mTLS on a real collector on loopback: who may stream, and a stream speaks only for its certificate's node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fleetwatch.certs import KeyPair, init_ca, issue, issue_into, make_ca
from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.tls import (
    check_listen_security,
    identity_from_auth_context,
    load_server_tls,
)
from fleetwatch.configfile import ConfigError
from fleetwatch.v1 import telemetry_pb2 as pb

METHOD = "/fleetwatch.v1.Telemetry/Stream"


@dataclass(frozen=True)
class Pki:
    dir: Path

    def pair(self, name: str) -> KeyPair:
        return KeyPair((self.dir / f"{name}.crt").read_bytes(), (self.dir / f"{name}.key").read_bytes())

    @property
    def ca_pem(self) -> bytes:
        return (self.dir / "ca.crt").read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    init_ca(directory)
    issue_into(directory, "collector", server=True, sans=["127.0.0.1"])
    for node in ("n01", "n02"):
        issue_into(directory, node)
    return Pki(directory)


def tls_config(tmp_path: Path, pki: Pki, **overrides) -> CollectorConfig:
    values = {
        "grpc_listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "database_url": f"sqlite:///{tmp_path / 'c.db'}",
        "log_alerts": False,
        "detect_interval_seconds": 0.2,
        "tls_cert_file": str(pki.dir / "collector.crt"),
        "tls_key_file": str(pki.dir / "collector.key"),
        "tls_client_ca_file": str(pki.dir / "ca.crt"),
    }
    return CollectorConfig(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.fixture
async def app(tmp_path: Path, pki: Pki) -> AsyncIterator[CollectorApp]:
    collector = CollectorApp(tls_config(tmp_path, pki))
    await collector.start()
    yield collector
    await collector.stop(grace_seconds=0.2)


def hello(node: str, boot_id: str = "boot-1") -> pb.AgentMessage:
    msg = pb.Hello(node=node, boot_id=boot_id, agent_version="test", sampling_interval_seconds=1.0, t=time.time())
    msg.gpus.add(index=0, uuid=f"GPU-{node}-0", name="NVIDIA H100 80GB HBM3", pci_bus_id="0000:18:00.0")
    return pb.AgentMessage(hello=msg)


def batch(seq: int, *, xid: int | None = None) -> pb.AgentMessage:
    t = time.time()
    b = pb.Batch(seq=seq, t=t)
    sample = b.gpus.add(gpu=0, t=t)
    sample.metrics.gpu_util_percent = 97.0
    b.host.t = t
    if xid is not None:
        b.events.add(t=t, kind="xid", gpu=0, xid=xid, pci_bus_id="0000:18:00.0", source="nvml")
    return pb.AgentMessage(batch=b)


def credentials(pki: Pki, client: KeyPair | None, root_pem: bytes | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=root_pem or pki.ca_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )


async def exchange(
    port: int, creds: grpc.ChannelCredentials | None, messages: list[pb.AgentMessage], expect: int
) -> list[pb.CollectorMessage]:
    """Send `messages` on one stream (TLS with `creds`, plaintext with None) and read `expect` replies."""
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target) if creds is None else grpc.aio.secure_channel(target, creds)
    async with channel:
        call = channel.stream_stream(
            METHOD,
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.CollectorMessage.FromString,
        )()
        for m in messages:
            await call.write(m)
        replies = [await asyncio.wait_for(call.read(), 10) for _ in range(expect)]
        await call.done_writing()
        return replies


async def until(predicate, timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def firing(app: CollectorApp, node: str, detector: str) -> list[dict]:
    return [a for a in app.store.alerts(status="firing") if a["node"] == node and a["detector"] == detector]


async def test_a_node_with_its_own_certificate_streams(app: CollectorApp, pki: Pki) -> None:
    replies = await exchange(app.grpc_port, credentials(pki, pki.pair("n01")), [hello("n01"), batch(1)], expect=2)
    assert replies[0].WhichOneof("body") == "welcome"
    assert replies[1].ack.seq == 1
    assert app.store.count_rows("batches") == 1


@pytest.mark.parametrize("client", ["plaintext", "no certificate", "another CA", "collector certificate"])
async def test_a_client_without_a_certificate_of_the_ca_fails_the_handshake(
    app: CollectorApp, pki: Pki, client: str
) -> None:
    if client == "plaintext":
        creds = None
    elif client == "no certificate":
        creds = credentials(pki, None)
    elif client == "another CA":
        # Same node name, same shape, but signed by a CA the collector does not trust.
        creds = credentials(pki, issue(make_ca(), "n01"))
    else:
        # serverAuth only: the collector's own certificate is no node's identity.
        creds = credentials(pki, pki.pair("collector"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await exchange(app.grpc_port, creds, [hello("n01"), batch(1)], expect=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert app.store.nodes() == []
    assert app.store.count_rows("batches") == 0


async def test_a_certificate_for_n01_cannot_speak_for_n02(app: CollectorApp, pki: Pki) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await exchange(app.grpc_port, credentials(pki, pki.pair("n01")), [hello("n02"), batch(1, xid=79)], expect=2)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'n01'" in err.value.details() and "'n02'" in err.value.details()
    assert app.store.nodes() == []
    assert app.store.count_rows("batches") == 0
    assert app.store.count_rows("events") == 0


async def test_n01_cannot_resolve_n02s_alerts_by_sending_it_a_new_boot(app: CollectorApp, pki: Pki) -> None:
    n01, n02 = credentials(pki, pki.pair("n01")), credentials(pki, pki.pair("n02"))
    await exchange(app.grpc_port, n02, [hello("n02", "boot-1"), batch(1, xid=79)], expect=2)
    await until(lambda: firing(app, "n02", "xid"), 5, "n02's XID 79 alert")

    # A new boot id resolves a node's XID alerts; from n01's certificate it must change nothing.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await exchange(app.grpc_port, n01, [hello("n02", "boot-2"), batch(1)], expect=2)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await asyncio.sleep(1.0)  # five detection passes
    assert firing(app, "n02", "xid")
    (node,) = app.store.nodes()
    assert (node["node"], node["boot_id"]) == ("n02", "boot-1")

    # n02's own reboot does resolve it: the refused Hello above was a real attack, not a no-op.
    await exchange(app.grpc_port, n02, [hello("n02", "boot-2"), batch(1)], expect=2)
    await until(lambda: not firing(app, "n02", "xid"), 5, "n02's alert to resolve after its own reboot")


async def test_without_tls_on_loopback_streams_stay_as_before(tmp_path: Path, pki: Pki) -> None:
    config = tls_config(tmp_path, pki, tls_cert_file="", tls_key_file="", tls_client_ca_file="")
    app = CollectorApp(config)
    await app.start()
    try:
        replies = await exchange(app.grpc_port, None, [hello("n02"), batch(1)], expect=2)
        assert replies[1].ack.seq == 1
    finally:
        await app.stop(0.2)


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls_key_file": ""}, r"tls_key_file: must be set with tls_cert_file, tls_client_ca_file"),
        ({"tls_client_ca_file": ""}, r"tls_client_ca_file: must be set"),
        ({"tls_cert_file": "", "tls_key_file": ""}, r"tls_cert_file, tls_key_file: must be set"),
        ({"tls_cert_file": "/nonexistent/c.crt"}, r"tls_cert_file: cannot read /nonexistent/c.crt"),
        ({"tls_key_file": "CA_KEY"}, r"tls_key_file: .* is not the key of the certificate"),
        ({"tls_client_ca_file": "KEY"}, r"tls_client_ca_file: .* holds no PEM certificate"),
        ({"tls_key_file": "CA_CERT"}, r"tls_key_file: .* not an unencrypted PEM private key"),
    ],
)
def test_tls_settings_are_checked_at_start_naming_the_key(
    tmp_path: Path, pki: Pki, overrides: dict[str, str], message: str
) -> None:
    files = {"CA_KEY": "ca.key", "KEY": "collector.key", "CA_CERT": "ca.crt"}
    overrides = {k: str(pki.dir / files[v]) if v in files else v for k, v in overrides.items()}
    with pytest.raises(ConfigError, match=message):
        load_server_tls(tls_config(tmp_path, pki, **overrides))


async def test_a_non_loopback_listen_without_tls_is_refused_before_listening(tmp_path: Path, pki: Pki) -> None:
    for key in ("grpc_listen", "http_listen"):
        config = tls_config(
            tmp_path, pki, tls_cert_file="", tls_key_file="", tls_client_ca_file="", **{key: "0.0.0.0:0"}
        )
        app = CollectorApp(config)
        try:
            with pytest.raises(ConfigError) as err:
                await app.start()
        finally:
            app.store.close()
        message = str(err.value)
        assert f"{key} 0.0.0.0:0" in message and "insecure = true" in message and "tls_client_ca_file" in message
        assert app.grpc_port == 0 and app.http_port == 0  # refused before listening on anything


def test_insecure_allows_a_non_loopback_listen_with_a_warning(tmp_path: Path, pki: Pki) -> None:
    config = tls_config(
        tmp_path, pki, tls_cert_file="", tls_key_file="", tls_client_ca_file="", grpc_listen=":9470", insecure=True
    )
    (warning,) = check_listen_security(config, tls=False)
    assert "grpc_listen :9470 without TLS" in warning and "http_listen" not in warning
    # With mTLS any address is fine, and loopback never needs it.
    assert check_listen_security(tls_config(tmp_path, pki, grpc_listen="0.0.0.0:9470"), tls=True) == []
    assert check_listen_security(tls_config(tmp_path, pki, http_listen="[::1]:0", insecure=False), tls=False) == []


@pytest.mark.parametrize(
    ("auth", "names"),
    [
        # DNS SANs are the identity; the CN only counts without them.
        ({"transport_security_type": [b"ssl"], "x509_pem_cert": [b"..."], "peer_dns": [b"n01", b"n01.cluster"],
          "x509_common_name": [b"other"]}, ("n01", "n01.cluster")),
        ({"transport_security_type": [b"ssl"], "x509_pem_cert": [b"..."], "x509_common_name": [b"n07"]}, ("n07",)),
        ({"transport_security_type": [b"ssl"], "x509_pem_cert": [b"..."]}, ()),
    ],
)  # fmt: skip
def test_identity_comes_from_dns_sans_else_the_common_name(auth: dict, names: tuple[str, ...]) -> None:
    identity = identity_from_auth_context(auth)
    assert identity is not None and identity.names == names
    assert not identity.allows("n02")


def test_no_identity_without_tls() -> None:
    assert identity_from_auth_context({}) is None
    assert identity_from_auth_context({"transport_security_type": [b"insecure"]}) is None
