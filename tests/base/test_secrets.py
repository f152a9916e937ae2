"""Secret settings print redacted everywhere the loader prints, and `*_file` keys read them from files."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetwatch.configfile import (
    MASK,
    ConfigError,
    Secret,
    add_flags,
    describe,
    load_config,
    setting,
    url_origin,
    wrap_secrets,
)

TOKEN = "tok-SENTINEL-123"
URL = "https://hooks.example.com/services/T0/B0/URL-SENTINEL"


class Url(Secret):
    @staticmethod
    def redact(value: str) -> str:
        return url_origin(value)


def _https(urls: list[Url]) -> str | None:
    bad = [str(u) for u in urls if not u.reveal().startswith("https://")]
    return f"not https: {', '.join(bad)}" if bad else None


def _long_enough(token: Secret) -> str | None:
    value = token.reveal()
    return None if not value or len(value) >= 8 else "must be 8 characters or more (or empty)"


@dataclass(frozen=True)
class Example:
    token: Secret = setting("", "API token", check=_long_enough)
    token_file: str = setting("", "file holding token", file_for="token")
    urls: list[Url] = setting([], "where to send", check=_https)
    urls_file: str = setting("", "file holding urls", file_for="urls")
    name: str = setting("plain", "not a secret")

    def __post_init__(self) -> None:
        wrap_secrets(self)


def load(**kwargs) -> Example:
    kwargs.setdefault("path", None)
    kwargs.setdefault("env", {})
    return load_config(Example, **kwargs)


# -- the type -------------------------------------------------------------------------------------


def test_secret_prints_only_its_redacted_form() -> None:
    secret = Secret(TOKEN)
    logged = "%s %r" % (secret, secret)  # noqa: UP031 (what logging does with its arguments)
    shown = [str(secret), repr(secret), f"{secret}", f"{secret!r}", logged, str([secret]), str({"k": secret})]
    assert all(TOKEN not in text for text in shown)
    assert str(secret) == MASK
    assert secret.reveal() == TOKEN


def test_secret_is_not_a_string() -> None:
    # so that it cannot be concatenated into a message or passed to an API by accident
    with pytest.raises(TypeError):
        "Bearer " + Secret(TOKEN)  # type: ignore[operator]


def test_secrets_compare_by_value() -> None:
    assert Secret(TOKEN) == Secret(TOKEN)
    assert Secret(TOKEN) != Secret("other")
    assert Secret(TOKEN) != TOKEN
    assert Url(URL) != Secret(URL)  # a different kind of secret


def test_subclass_chooses_what_is_shown() -> None:
    assert str(Url(URL)) == "https://hooks.example.com/..."
    assert repr(Url(URL)) == "'https://hooks.example.com/...'"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (URL, "https://hooks.example.com/..."),
        ("http://user:pa55@alerts.internal:8080/hook?token=t#frag", "http://alerts.internal:8080/..."),
        ("http://[fd00::1]:9/x?token=t", "http://[fd00::1]:9/..."),
        ("http://HOST.Example", "http://host.example/..."),
        ("no scheme at all", MASK),
        ("http://host:notaport/x", MASK),
        ("http://[broken/x", MASK),
        ("", MASK),
    ],
)
def test_url_origin(url: str, shown: str) -> None:
    assert url_origin(url) == shown


# -- loading --------------------------------------------------------------------------------------


def test_secret_from_every_source_is_wrapped(tmp_path: Path) -> None:
    file = tmp_path / "example.toml"
    file.write_text(f'token = "{TOKEN}"\n')
    assert load(path=file).token == Secret(TOKEN)
    assert load(env={"FLEETWATCH_TOKEN": TOKEN}).token == Secret(TOKEN)
    assert load(flags={"token": TOKEN}).token == Secret(TOKEN)
    urls = load(env={"FLEETWATCH_URLS": f"{URL}, https://b.example/x"}).urls
    assert urls == [Url(URL), Url("https://b.example/x")]


def test_directly_built_config_wraps_plain_strings() -> None:
    config = Example(token=TOKEN, urls=[URL])  # type: ignore[arg-type]
    assert isinstance(config.token, Secret) and config.token.reveal() == TOKEN
    assert isinstance(config.urls[0], Url) and config.urls[0].reveal() == URL


def test_describe_and_repr_are_redacted() -> None:
    config = load(env={"FLEETWATCH_TOKEN": TOKEN, "FLEETWATCH_URLS": URL})
    for text in (str(describe(config)), repr(config)):
        assert TOKEN not in text and "URL-SENTINEL" not in text
        assert "https://hooks.example.com/..." in text and MASK in text


def test_help_defaults_are_redacted() -> None:
    @dataclass(frozen=True)
    class WithDefault:
        token: Secret = setting(TOKEN, "API token")

    parser = argparse.ArgumentParser()
    add_flags(parser, WithDefault)
    text = parser.format_help()
    assert TOKEN not in text and MASK in text


def test_check_error_shows_the_redacted_value() -> None:
    with pytest.raises(ConfigError) as error:
        load(env={"FLEETWATCH_URLS": "http://hooks.example.com/services/URL-SENTINEL"})
    assert "URL-SENTINEL" not in str(error.value)
    assert "urls: not https: http://hooks.example.com/..." in str(error.value)
    with pytest.raises(ConfigError, match="token: must be 8 characters or more") as error:
        load(env={"FLEETWATCH_TOKEN": "s3cr"})
    assert "s3cr" not in str(error.value)


def test_type_error_does_not_quote_the_value(tmp_path: Path) -> None:
    file = tmp_path / "example.toml"
    file.write_text("token = 987654321\nurls = 55555\n")
    with pytest.raises(ConfigError, match=re.escape("expected a string, got int (value not shown)")) as error:
        load(path=file)
    assert "987654321" not in str(error.value)
    file.write_text("urls = 55555\n")
    with pytest.raises(ConfigError, match="expected a list") as error:
        load(path=file)
    assert "55555" not in str(error.value)


# -- *_file keys ----------------------------------------------------------------------------------


def test_file_holds_a_string_setting_without_surrounding_whitespace(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(f"  {TOKEN}\n\n")
    assert load(env={"FLEETWATCH_TOKEN_FILE": str(secret)}).token.reveal() == TOKEN
    assert load(flags={"token_file": str(secret)}).token.reveal() == TOKEN
    toml = tmp_path / "example.toml"
    toml.write_text(f'token_file = "{secret}"\n')
    config = load(path=toml)
    assert config.token.reveal() == TOKEN
    assert config.token_file == str(secret)  # the path is no secret: the start-up line shows it


def test_file_holds_one_list_item_a_line(tmp_path: Path) -> None:
    secret = tmp_path / "urls"
    secret.write_text(f"# ops channel\n{URL}\n\n   https://b.example/x?token=t  \n  # retired: https://c.example/\n")
    urls = load(env={"FLEETWATCH_URLS_FILE": str(secret)}).urls
    assert [u.reveal() for u in urls] == [URL, "https://b.example/x?token=t"]


def test_list_file_with_only_comments_is_an_empty_list(tmp_path: Path) -> None:
    secret = tmp_path / "urls"
    secret.write_text("# none yet\n")
    assert load(env={"FLEETWATCH_URLS_FILE": str(secret)}).urls == []


def test_values_read_from_a_file_are_checked_and_stay_redacted(tmp_path: Path) -> None:
    secret = tmp_path / "urls"
    secret.write_text("http://hooks.example.com/URL-SENTINEL\n")
    with pytest.raises(ConfigError, match=re.escape("urls: not https: http://hooks.example.com/...")) as error:
        load(env={"FLEETWATCH_URLS_FILE": str(secret)})
    assert "URL-SENTINEL" not in str(error.value)


@pytest.mark.parametrize(
    ("sources", "named"),
    [
        ({"env": {"FLEETWATCH_TOKEN": TOKEN, "FLEETWATCH_TOKEN_FILE": "/x"}}, "environment FLEETWATCH_TOKEN_FILE"),
        ({"toml": f'token = "{TOKEN}"\n', "flags": {"token_file": "/x"}}, "--token-file"),
        ({"toml": 'token_file = "/x"\n', "env": {"FLEETWATCH_TOKEN": TOKEN}}, "environment FLEETWATCH_TOKEN"),
    ],
)
def test_key_and_its_file_together_is_an_error_naming_both(tmp_path: Path, sources: dict, named: str) -> None:
    path = None
    if "toml" in sources:
        path = tmp_path / "example.toml"
        path.write_text(sources["toml"])
    with pytest.raises(ConfigError, match=r"token .*and token_file .*are both set") as error:
        load(path=path, env=sources.get("env", {}), flags=sources.get("flags"))
    assert named in str(error.value)
    assert TOKEN not in str(error.value)


def test_unreadable_file_is_an_error_naming_key_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    with pytest.raises(ConfigError) as error:
        load(env={"FLEETWATCH_TOKEN_FILE": str(missing)})
    message = str(error.value)
    assert message.startswith("token_file (from environment FLEETWATCH_TOKEN_FILE): cannot read ")
    assert str(missing) in message and "No such file" in message
    with pytest.raises(ConfigError, match=f"urls_file .*cannot read {tmp_path}"):
        load(env={"FLEETWATCH_URLS_FILE": str(tmp_path)})  # a directory


def test_empty_file_for_a_string_is_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("\n")
    with pytest.raises(ConfigError, match=f"token_file .*: {secret} is empty"):
        load(env={"FLEETWATCH_TOKEN_FILE": str(secret)})


def test_binary_file_is_an_error_without_its_bytes(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_bytes(b"\xff\xfeSENTINEL")
    with pytest.raises(ConfigError, match="is not UTF-8 text") as error:
        load(env={"FLEETWATCH_TOKEN_FILE": str(secret)})
    assert "SENTINEL" not in str(error.value)


def test_empty_file_key_means_unset() -> None:
    assert load(env={"FLEETWATCH_TOKEN": TOKEN, "FLEETWATCH_TOKEN_FILE": ""}).token.reveal() == TOKEN
