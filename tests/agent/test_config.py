"""Configuration: TOML < FLEETWATCH_* < flags, and errors that name the key."""

import re
from pathlib import Path

import pytest

from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.main import build_parser as agent_parser
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.main import build_parser as collector_parser
from fleetwatch.configfile import ConfigError, load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "config"


def test_defaults_without_file(tmp_path: Path) -> None:
    config = load_config(AgentConfig, path=tmp_path / "missing.toml", env={})
    assert config.sampling_interval_seconds == 1.0
    assert config.collector_address == ["127.0.0.1:9470"]


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text('node = "from-file"\nsampling_interval_seconds = 2.0\nspool_max_bytes = 1000\n')
    env = {"FLEETWATCH_SAMPLING_INTERVAL_SECONDS": "3", "FLEETWATCH_NODE": "from-env"}
    args = agent_parser().parse_args(["--node", "from-flag"])
    config = load_config(AgentConfig, path=file, env=env, flags=args)
    assert config.node == "from-flag"
    assert config.sampling_interval_seconds == 3.0
    assert config.spool_max_bytes == 1000


def test_unknown_key_is_named(tmp_path: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text("sampling_intervall_seconds = 2\n")
    with pytest.raises(ConfigError, match="unknown key 'sampling_intervall_seconds'"):
        load_config(AgentConfig, path=file, env={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sampling_interval_seconds = -1\n", "sampling_interval_seconds: must be 0.01 to 3600 seconds"),
        # What the collector would refuse in every Hello stops the agent at start instead.
        ("sampling_interval_seconds = 0.001\n", "sampling_interval_seconds: must be 0.01 to 3600 seconds"),
        ('node = "gpu node 7"\n', "node: .*character ' ' at 3 is not one of"),
        ('node = "n01\\nFAKE LOG LINE"\n', "node: .*is not one of"),
        ('sampling_interval_seconds = "fast"\n', "sampling_interval_seconds .*expected a number"),
        ('log_level = "loud"\n', "log_level: must be one of"),
        ("spool_max_bytes = 1.5\n", "spool_max_bytes .*expected an integer"),
        ("spool_fsync = 3\n", "spool_fsync .*expected true or false"),
    ],
)
def test_invalid_values_are_named(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "agent.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(AgentConfig, path=file, env={})


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FLEETWATCH_SPOOL_MAX_BYTES"):
        load_config(AgentConfig, path=None, env={"FLEETWATCH_SPOOL_MAX_BYTES": "lots"})


def test_unrelated_fleetwatch_env_is_ignored() -> None:
    # agent and collector share the prefix on one host
    config = load_config(AgentConfig, path=None, env={"FLEETWATCH_DATABASE_URL": "sqlite:///x.db"})
    assert config.node == ""


def test_collector_lists_and_addresses(tmp_path: Path) -> None:
    env = {"FLEETWATCH_WEBHOOK_URLS": "http://a/x, http://b/y"}
    urls = load_config(CollectorConfig, path=None, env=env).webhook_urls
    assert [url.reveal() for url in urls] == ["http://a/x", "http://b/y"]
    with pytest.raises(ConfigError, match="webhook_urls"):
        load_config(CollectorConfig, path=None, env={"FLEETWATCH_WEBHOOK_URLS": "ftp://nope"})
    with pytest.raises(ConfigError, match="grpc_listen: must be HOST:PORT"):
        load_config(CollectorConfig, path=None, env={"FLEETWATCH_GRPC_LISTEN": "localhost"})


def test_broken_toml_is_reported(tmp_path: Path) -> None:
    file = tmp_path / "collector.toml"
    file.write_text("grpc_listen = \n")
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(CollectorConfig, path=file, env={})


@pytest.mark.parametrize(("cls", "name"), [(AgentConfig, "agent.toml"), (CollectorConfig, "collector.toml")])
def test_shipped_examples_load(cls, name: str) -> None:
    load_config(cls, path=DEPLOY / name, env={}, require_file=True)


@pytest.mark.parametrize("parser", [agent_parser, collector_parser])
def test_help_lists_every_key_with_its_variable(parser, capsys) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "FLEETWATCH_" in out and "[default:" in out


def test_agent_exits_2_on_bad_config(tmp_path: Path, capsys) -> None:
    from fleetwatch.agent.main import main

    file = tmp_path / "agent.toml"
    file.write_text("bogus = 1\n")
    assert main(["--config", str(file)]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("daemon", ["agent", "collector"])
def test_missing_config_named_by_flag_is_an_error(daemon: str, tmp_path: Path, capsys) -> None:
    from fleetwatch.agent.main import main as agent_main
    from fleetwatch.collector.main import main as collector_main

    main = agent_main if daemon == "agent" else collector_main
    missing = tmp_path / "agnet.toml"  # a typo must not start the daemon on defaults
    assert main(["--config", str(missing)]) == 2
    assert f"fleetwatch-{daemon}: configuration error: --config {missing}: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("parser", [agent_parser, collector_parser])
def test_default_config_path_may_be_missing(parser, tmp_path: Path) -> None:
    args = parser().parse_args([])
    assert args.config in ("/etc/fleetwatch/agent.toml", "/etc/fleetwatch/collector.toml")
    # The default path, absent on this host, is fine: defaults apply (load_config sees a plain str).
    load_config(AgentConfig, path=str(tmp_path / "absent.toml"), env={})
    with pytest.raises(ConfigError, match=r"^--config .*absent\.toml: no such file$"):
        load_config(AgentConfig, path=parser().parse_args(["--config", str(tmp_path / "absent.toml")]).config, env={})


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("collector.example.internal", "needs a port"),
        ("10.0.0.5", "needs a port"),
        ("[fd00::1]", "needs a port"),
        ("fd00::1", "must be HOST:PORT; an IPv6 address goes in brackets"),
        (":9470", "needs a host"),
        ("collector:0", "port 0 cannot be dialed"),
        ("collector:http", "port 'http' is not a number"),
    ],
)
def test_collector_address_needs_host_and_port(address: str, message: str) -> None:
    entry = re.escape(repr(address))
    with pytest.raises(ConfigError, match=rf"^collector_address: {entry}: {message}.*\(got \[{entry}\]\)$"):
        load_config(AgentConfig, path=None, env={"FLEETWATCH_COLLECTOR_ADDRESS": address})


@pytest.mark.parametrize("address", ["collector.example.internal:9470", "10.0.0.5:9470", "[fd00::1]:9470"])
def test_collector_address_dns_name_or_address_with_port(address: str) -> None:
    assert load_config(AgentConfig, path=None, env={"FLEETWATCH_COLLECTOR_ADDRESS": address}).collector_address == [
        address
    ]


def test_several_collectors_from_toml_env_and_flag(tmp_path: Path) -> None:
    listed = tmp_path / "list.toml"
    listed.write_text('collector_address = ["c1.example:9470", "[fd00::2]:9470"]\n')
    assert load_config(AgentConfig, path=listed, env={}).collector_address == ["c1.example:9470", "[fd00::2]:9470"]
    # The one-address form of 0.2 configurations keeps working.
    single = tmp_path / "single.toml"
    single.write_text('collector_address = "c1.example:9470"\n')
    assert load_config(AgentConfig, path=single, env={}).collector_address == ["c1.example:9470"]
    env = {"FLEETWATCH_COLLECTOR_ADDRESS": "c1.example:9470, c2.example:9471"}
    assert load_config(AgentConfig, path=None, env=env).collector_address == ["c1.example:9470", "c2.example:9471"]
    flags = agent_parser().parse_args(["--collector-address", "10.0.0.5:9470,10.0.0.6:9470"])
    assert load_config(AgentConfig, path=single, env=env, flags=flags).collector_address == [
        "10.0.0.5:9470",
        "10.0.0.6:9470",
    ]
    # Code that builds the config with one string gets the list too.
    assert AgentConfig(collector_address="c1.example:9470").collector_address == ["c1.example:9470"]  # type: ignore[arg-type]


def test_a_bad_collector_entry_is_named_with_the_key(tmp_path: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text('collector_address = ["c1.example:9470", "c2.example"]\n')
    with pytest.raises(ConfigError, match=r"^collector_address: 'c2\.example': needs a port"):
        load_config(AgentConfig, path=file, env={})
    flags = agent_parser().parse_args(["--collector-address", "c1.example:9470,[fd00::1]"])
    with pytest.raises(ConfigError, match=r"^collector_address: '\[fd00::1\]': needs a port"):
        load_config(AgentConfig, path=None, env={}, flags=flags)
    for empty in ("collector_address = []\n", 'collector_address = ""\n'):
        file.write_text(empty)
        with pytest.raises(ConfigError, match=r"^collector_address: needs at least one collector"):
            load_config(AgentConfig, path=file, env={})
    file.write_text("collector_address = [9470]\n")
    with pytest.raises(ConfigError, match=r"^collector_address \(from .*\): expected a string, got 9470"):
        load_config(AgentConfig, path=file, env={})
