"""parse_host_port, join_host_port and is_loopback: the one reading of HOST:PORT listen addresses."""

from __future__ import annotations

import re

import pytest

from fleetwatch.addresses import is_loopback, join_host_port, parse_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:9471", ("0.0.0.0", 9471)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("collector.example.org:9470", ("collector.example.org", 9470)),
        ("localhost:65535", ("localhost", 65535)),
        (":9472", ("0.0.0.0", 9472)),
        ("[::]:9472", ("::", 9472)),
        ("[::1]:0", ("::1", 0)),
        ("[2001:db8::7]:9471", ("2001:db8::7", 9471)),
        ("[fe80::1%eth0]:9471", ("fe80::1%eth0", 9471)),
    ],
)
def test_accepted_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost", "must be HOST:PORT"),
        ("", "must be HOST:PORT"),
        ("localhost:", "port '' is not a number"),
        ("localhost:http", "port 'http' is not a number"),
        ("localhost:-1", "port '-1' is not a number"),
        ("localhost:65536", "port '65536' is not a number from 0 to 65535"),
        ("localhost: 80", "port ' 80' is not a number"),
        ("localhost:٣", "port '٣' is not a number"),  # a digit to str.isdigit, not to a socket
        ("::1:9471", "an IPv6 address needs brackets: [::1]:9471"),
        ("[::1:9471", "needs its ']'"),
        ("[::1]", "must be HOST:PORT"),
        ("[collector]:9471", "'collector' in brackets is not an IPv6 address"),
        ("[127.0.0.1]:9471", "'127.0.0.1' in brackets is not an IPv6 address"),
        ("host]:9471", "'host]' is not a host name or address"),
    ],
)
def test_rejected_addresses_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_host_port(text)


@pytest.mark.parametrize(("host", "port"), [("0.0.0.0", 9471), ("::1", 0), ("node-7", 80), ("2001:db8::7", 9472)])
def test_join_is_the_inverse_of_parse(host: str, port: int) -> None:
    assert parse_host_port(join_host_port(host, port)) == (host, port)


def test_join_puts_ipv6_in_brackets() -> None:
    assert join_host_port("::1", 9472) == "[::1]:9472"
    assert join_host_port("10.0.0.7", 9472) == "10.0.0.7:9472"


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("127.0.0.1:0", True),
        ("127.3.4.5:9470", True),
        ("[::1]:9471", True),
        ("[::ffff:127.0.0.1]:9471", True),
        ("localhost:9470", True),
        ("LOCALHOST:9470", True),
        ("0.0.0.0:9470", False),  # every interface
        (":9470", False),
        ("[::]:9470", False),
        ("10.0.0.5:9470", False),
        ("collector.example.org:9470", False),  # a name may resolve to any interface
        ("localhost.example.org:9470", False),
    ],
)
def test_only_loopback_addresses_and_localhost_count_as_loopback(text: str, loopback: bool) -> None:
    host, _ = parse_host_port(text)
    assert is_loopback(host) is loopback
