"""Alert routing settings: [[webhooks]] tables, alertmanager_urls, links; errors name the key to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.main import build_parser
from fleetwatch.configfile import ConfigError, describe, load_config

TOKEN = "tok-5e0f"


def load(tmp_path: Path, toml: str, **flags: str) -> CollectorConfig:
    path = tmp_path / "collector.toml"
    path.write_text(toml)
    return load_config(CollectorConfig, path=path, flags=flags, env={})


def test_webhook_tables_with_their_own_settings(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    config = load(
        tmp_path,
        f"""
webhook_urls = ["https://plain.example/hook"]
webhook_group_wait_seconds = 2.5
[[webhooks]]
url = "https://pager.example/v1/hook?key={TOKEN}"
bearer_token_file = "{token}"
headers = {{ X-Team = "gpu-infra" }}
[[webhooks]]
url = "https://chat.example/hook"
basic_auth_username = "fleet"
""",
    )
    first, second = config.webhooks
    assert first.url.reveal().endswith(TOKEN) and first.headers == {"X-Team": "gpu-infra"}
    assert second.basic_auth_username == "fleet" and config.webhook_group_wait_seconds == 2.5
    # Shown (start-up log, errors) without the token in the URL.
    assert TOKEN not in repr(describe(config)) and "https://pager.example/..." in repr(describe(config))


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('url = "https://x.example/h"\ntokn_file = "/x"', "webhooks[0] (from "),
        ('url = "https://x.example/h"\ntokn_file = "/x"', "unknown key 'tokn_file'"),
        ('url = "ftp://x.example/h"', "webhooks[0].url: must be an http(s) URL with a host"),
        ('bearer_token_file = "/x"', "webhooks[0].url: must be an http(s) URL"),
        (
            'url = "https://x.example/h"\nbearer_token_file = "/nonexistent/token"',
            "webhooks[0].bearer_token_file: cannot read",
        ),
        ('url = "https://x.example/h"\nca_file = "/nonexistent/ca.pem"', "webhooks[0].ca_file: cannot read"),
        ('url = "https://u:p@x.example/h"\nbasic_auth_username = "a"', "both authenticate; set one"),
        ('url = "https://x.example/h"\nbasic_auth_password_file = "/etc/hostname"', "needs basic_auth_username"),
        ('url = "https://x.example/h"\nheaders = { "Bad Name" = "x" }', "is not an HTTP header name"),
        ('url = "https://x.example/h"\nheaders = { X-A = "1\\r\\nX-B: 2" }', "holds a line break"),
        ('url = "https://x.example/h"\nheaders = { Content-Type = "text/plain" }', "set by fleetwatch itself"),
    ],
)
def test_a_bad_webhook_table_names_its_key(tmp_path: Path, table: str, error: str) -> None:
    with pytest.raises(ConfigError, match=None) as raised:
        load(tmp_path, f"[[webhooks]]\n{table}\n")
    assert error in str(raised.value)


def test_alertmanager_urls_from_a_comma_separated_flag(tmp_path: Path) -> None:
    config = load(tmp_path, "", alertmanager_urls="http://am-1:9093, http://am-2:9093")
    assert [u.reveal() for u in config.alertmanager_urls] == ["http://am-1:9093", "http://am-2:9093"]
    with pytest.raises(ConfigError, match="alertmanager_urls: not http"):
        load(tmp_path, "", alertmanager_urls="am-1:9093")
    with pytest.raises(ConfigError, match="external_url: must be an http"):
        load(tmp_path, 'external_url = "collector:9471"')


def test_help_explains_the_alert_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--alertmanager-urls",
        "--alertmanager-resend-seconds",
        "--webhook-group-wait-seconds",
        "--external-url",
    ):
        assert flag in text
    assert "--webhooks" not in text  # tables live in the TOML file only
