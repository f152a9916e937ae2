"""`fleetwatchctl certs`: make the private CA and the node and collector certificates that mTLS between them needs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fleetwatch.certs import CA_CERT_FILE, CA_VALIDITY_DAYS, LEAF_VALIDITY_DAYS, CertError, init_ca, issue_into

# Where deploy/config's examples expect the certificates: node.crt on a node, collector.crt on the collector.
INSTALL_DIR = "/etc/fleetwatch/tls"


def _fail(message: str) -> int:
    print(f"fleetwatchctl certs: {message}", file=sys.stderr)
    return 1


def cmd_init(args: argparse.Namespace) -> int:
    try:
        cert, key = init_ca(Path(args.dir), force=args.force)
    except CertError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({"ca_cert": str(cert), "ca_key": str(key), "valid_days": CA_VALIDITY_DAYS}))
        return 0
    print(f"CA written: {cert} (valid {CA_VALIDITY_DAYS} days) and {key} (mode 0600)")
    print(
        f"{cert.name} goes to the collector (tls_client_ca_file) and every node (tls_ca_file); {key.name} "
        "stays here: whoever holds it can make certificates for any node."
    )
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    if args.san and not args.server:
        return _fail("--san is for a collector certificate (--server); a node's certificate names only the node")
    directory = Path(args.dir)
    try:
        cert, key = issue_into(directory, args.name, server=args.server, sans=args.san, force=args.force)
    except CertError as exc:
        return _fail(str(exc))
    # Installed under fixed names, so that one agent.toml (and one collector.toml) fits every host.
    stem = "collector" if args.server else "node"
    installed = Path(INSTALL_DIR)
    places = [
        (installed / CA_CERT_FILE, directory / CA_CERT_FILE, "0644"),
        (installed / f"{stem}.crt", cert, "0644"),
        (installed / f"{stem}.key", key, "0600"),
    ]
    if args.json:
        install = [{"source": str(source), "target": str(target), "mode": mode} for target, source, mode in places]
        print(
            json.dumps(
                {"name": args.name, "server": args.server, "cert": str(cert), "key": str(key)}
                | {"valid_days": LEAF_VALIDITY_DAYS, "install": install}
            )
        )
        return 0
    print(f"written: {cert} (valid {LEAF_VALIDITY_DAYS} days) and {key} (mode 0600)")
    if args.server:
        names = ", ".join(dict.fromkeys([args.name, *(args.san or [])]))
        print(f"collector certificate for {names}; copy to the collector host and install there:")
    else:
        print(f"client certificate of node {args.name!r}; copy to that node and install there:")
    for target, source, mode in places:
        print(f"  install -m {mode} {source} {target}")
    if args.server:
        print("as deploy/config/collector.toml expects (tls_cert_file, tls_key_file, tls_client_ca_file);")
        print("agents must dial one of those names (collector_address), or set tls_server_name to one of them")
    else:
        print("as deploy/config/agent.toml expects (tls_ca_file, tls_cert_file, tls_key_file);")
        print(f"the collector accepts this certificate only for node {args.name!r} (the agent's node setting)")
    return 0


def add_certs_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `certs init` and `certs issue` on fleetwatchctl's subcommands."""
    certs = sub.add_parser(
        "certs",
        help="make the CA and the node and collector certificates for mTLS between agents and the collector",
    )
    actions = certs.add_subparsers(dest="certs_command", required=True)

    p = actions.add_parser(
        "init", help=f"create a CA: DIR/{CA_CERT_FILE} and DIR/ca.key (ECDSA P-256, {CA_VALIDITY_DAYS} days)"
    )
    p.add_argument("--dir", required=True, metavar="DIR", help="directory for the CA (created with mode 0700)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (every certificate it issued stops being accepted)",
    )
    p.add_argument("--json", action="store_true", help="print the files written as JSON")
    p.set_defaults(func=cmd_init)

    p = actions.add_parser(
        "issue",
        help=f"issue NAME.crt and NAME.key with the CA in DIR: a node's client certificate, or with --server "
        f"the collector's ({LEAF_VALIDITY_DAYS} days)",
    )
    p.add_argument("name", metavar="NAME", help="the node name (as the agent's node setting), or the collector's")
    p.add_argument("--dir", required=True, metavar="DIR", help="directory holding the CA (fleetwatchctl certs init)")
    p.add_argument(
        "--server",
        action="store_true",
        help="a collector certificate (serverAuth) instead of a node's (clientAuth)",
    )
    p.add_argument(
        "--san",
        action="append",
        metavar="HOST",
        help="with --server: a DNS name or IP address agents dial the collector by; repeatable (NAME is one too)",
    )
    p.add_argument("--force", action="store_true", help="replace NAME.crt and NAME.key when they exist")
    p.add_argument("--json", action="store_true", help="print the files written and where to install them, as JSON")
    p.set_defaults(func=cmd_issue)
