"""Listen addresses written as HOST:PORT, parsed here for every daemon and configuration check."""

from __future__ import annotations

import ipaddress

# What an empty host (":9472") listens on: every IPv4 interface, as the shipped defaults do.
ALL_INTERFACES = "0.0.0.0"
PORT_MAX = 65535


def parse_host_port(text: str) -> tuple[str, int]:
    """`host:port`, `[ipv6]:port` or `:port` as (host, port), the host without brackets.

    Port 0 is allowed (the system picks a free port). Raises ValueError saying what is wrong;
    the message does not repeat `text`, callers name the setting and quote it.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or text.endswith("]"):  # "[::1]" is an address without a port
        raise ValueError("must be HOST:PORT, [IPV6]:PORT or :PORT (port 0 picks a free port)")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("an IPv6 address in '[' needs its ']' right before ':PORT'")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        # "::1:9471" could be port 9471 on ::1 or the address ::1:9471 without a port.
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port_text}")
    elif "[" in host or "]" in host:
        raise ValueError(f"{host!r} is not a host name or address")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > PORT_MAX:
        raise ValueError(f"port {port_text!r} is not a number from 0 to {PORT_MAX}")
    return host or ALL_INTERFACES, int(port_text)


def join_host_port(host: str, port: int) -> str:
    """The inverse of parse_host_port, for logs and URLs: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether listening on `host` (as parse_host_port gives it) is reachable from this machine only.

    `localhost` and loopback addresses (127.0.0.0/8, ::1, and ::ffff:127.x) are; every other name
    or address, the wildcard ones included, may be reachable from the network.
    """
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name other than localhost: it may resolve to any interface
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
