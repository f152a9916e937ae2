"""`fleetwatchctl`: fleet status and alerts from a running collector, offline detection, and the demo."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from fleetwatch.ctl.certs import add_certs_parser
from fleetwatch.ctl.history import (
    DEFAULT_WIDTH,
    alert_window,
    format_history_csv,
    format_history_json,
    format_history_table,
    format_time,
    parse_duration,
    parse_fields,
    parse_time,
    series_path,
    time_window,
)

DEFAULT_COLLECTOR_URL = "http://127.0.0.1:9471"


class CtlError(Exception):
    pass


TOKEN_HINT = "--token-file FILE (or FLEETWATCH_TOKEN_FILE)"
CA_HINT = "--ca-file FILE (or FLEETWATCH_CA_FILE)"


def read_token_file(path: str) -> str:
    """The API token a file holds, without surrounding whitespace (a trailing newline is usual)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CtlError(f"cannot read --token-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CtlError(f"--token-file {path} is not UTF-8 text") from None
    if not token:
        raise CtlError(f"--token-file {path} is empty")
    return token


def client_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verifies the collector's certificate against `ca_file`, or the system's CAs without one."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except OSError as exc:  # ssl.SSLError included: a file that holds no PEM certificate
        raise CtlError(f"cannot load --ca-file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The collector's {"error": ...} text, or the start of whatever body came back."""
    body = exc.read().decode(errors="replace")
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200]


def fetch_json(
    base_url: str,
    path: str,
    timeout_seconds: float = 10.0,
    *,
    token: str | None = None,
    ca_file: str | None = None,
    method: str = "GET",
    body: Any = None,
) -> Any:
    """`method` base_url + path (with `body` as JSON) and the JSON answer, sending `token` as a bearer token.

    Errors say what to pass to fix them.
    """
    url = base_url.rstrip("/") + path
    try:
        parts = urllib.parse.urlsplit(base_url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise CtlError(
            f"--collector {base_url!r} is not an http:// or https:// URL with a host (e.g. {DEFAULT_COLLECTOR_URL})"
        )
    https = parts.scheme == "https"
    # A TLS server answers a plain HTTP request with a TLS alert (not a status line) or hangs up.
    plain_to_tls_hint = "" if https else "; if it serves HTTPS, use an https:// --collector URL"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    context = client_ssl_context(ca_file) if https else None
    try:
        with urllib.request.urlopen(request, timeout=timeout_seconds, context=context) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise CtlError(f"{url}: HTTP 401: the collector needs an API token: {TOKEN_HINT}") from None
        if exc.code == 403:
            if token:
                needs = "; changes need its api_admin_token" if method != "GET" else ""
                raise CtlError(
                    f"{url}: HTTP 403: the collector refused the API token ({_error_text(exc)}); "
                    f"check {TOKEN_HINT}{needs}"
                ) from None
            raise CtlError(f"{url}: HTTP 403: the collector refused the request ({_error_text(exc)})") from None
        raise CtlError(f"{url}: HTTP {exc.code}: {_error_text(exc)}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise CtlError(
                f"cannot verify the collector's certificate at {base_url} ({reason.verify_message}); "
                f"pass the CA that issued it with {CA_HINT}"
            ) from None
        if isinstance(reason, ssl.SSLError):
            raise CtlError(
                f"TLS with the collector at {base_url} failed ({reason.reason or reason}); "
                "does it serve HTTPS? (an http:// --collector URL talks plain HTTP)"
            ) from None
        if isinstance(reason, ConnectionResetError):
            raise CtlError(f"the collector at {base_url} hung up ({reason}){plain_to_tls_hint}") from None
        raise CtlError(
            f"cannot reach the collector at {base_url} ({reason}); is it running? (--collector URL)"
        ) from None
    except (http.client.HTTPException, ConnectionError) as exc:
        # The exception's text would be the TLS alert's raw bytes: its name says enough.
        raise CtlError(
            f"the collector at {base_url} hung up or did not answer in HTTP ({type(exc).__name__}){plain_to_tls_hint}"
        ) from None
    except OSError as exc:
        raise CtlError(f"cannot reach the collector at {base_url} ({exc}); is it running? (--collector URL)") from None


def api_get(args: argparse.Namespace, path: str) -> Any:
    """GET one JSON API path of the collector that --collector names, with --token-file and --ca-file."""
    token = read_token_file(args.token_file) if args.token_file else None
    return fetch_json(args.collector, path, token=token, ca_file=args.ca_file)


def api_send(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """POST or DELETE one JSON API path (routes that change state want the admin token)."""
    token = read_token_file(args.token_file) if args.token_file else None
    return fetch_json(args.collector, path, token=token, ca_file=args.ca_file, method=method, body=body)


def format_status(status: dict, out: TextIO) -> None:
    # Imported here: the collector's web module pulls in SQLAlchemy and aiohttp, which the offline
    # commands (detect, eval, demo) do not need to start.
    from fleetwatch.collector.web import HEALTH_MARK

    nodes = status["nodes"]
    if not nodes:
        print("no nodes have reported yet", file=out)
        return
    print(f"{'NODE':<16} {'AGENT':<8} {'HEALTH':<9} GPUS (. ok, W warning, C critical)", file=out)
    for node in nodes:
        marks = "".join(HEALTH_MARK[g["health"]] for g in node["gpus"]) or "-"
        agent = "up" if node["connected"] else "down"
        print(f"{node['node']:<16} {agent:<8} {node['health']:<9} {marks}", file=out)
        for gpu in node["gpus"]:
            if gpu["alerts"]:
                print(f"{'':<16}   gpu {gpu['gpu']} {gpu['uuid'] or ''}: {', '.join(gpu['alerts'])}", file=out)
    print(f"{status['alerts_firing']} alerts firing", file=out)
    collectors = status.get("collectors") or []
    if len(collectors) > 1:  # one collector is the whole story; several share the fleet's work
        print(f"\n{'COLLECTOR':<32} {'STATE':<6} {'STREAMS':>7} {'NODES':>5} LEASES", file=out)
        for c in collectors:
            state = "alive" if c["alive"] else "dead"
            name = c["id"] + (" (this)" if c.get("self") else "")
            print(f"{name:<32} {state:<6} {c['streams']:>7} {c['nodes']:>5} {', '.join(c['leases']) or '-'}", file=out)


def format_alerts(alerts: list[dict], out: TextIO, *, times: bool = False, now: float | None = None) -> None:
    """The alerts table; with `times`, each alert's id, start, end and how long it fired (or has)."""
    if not alerts:
        print("no alerts", file=out)
        return
    now = time.time() if now is None else now
    when = f"{'ID':<6} {'STARTED (UTC)':<19} {'ENDED':<19} {'FOR':<8} " if times else ""
    print(
        f"{when}{'STATUS':<9} {'SEVERITY':<9} {'DETECTOR':<20} {'NODE':<12} {'GPU':<4} {'ACTION':<17} SUMMARY", file=out
    )
    for a in alerts:
        gpu = "-" if a["gpu"] is None else str(a["gpu"])
        silenced = "" if a.get("silenced_by") is None else f" [silenced by {a['silenced_by']}]"
        if times:
            ended = a.get("ends_at")
            lasted = (ended if ended is not None else now) - a["starts_at"]
            when = (
                f"{a['id']:<6} {_utc(a['starts_at']):<19} {'-' if ended is None else _utc(ended):<19} "
                f"{format_duration(lasted):<8} "
            )
        print(
            f"{when}{a['status']:<9} {a['severity']:<9} {a['detector']:<20} {a['node'] or '-':<12} {gpu:<4} "
            f"{a['action']:<17} {a['summary']}{silenced}",
            file=out,
        )


def _utc(t: float) -> str:
    return format_time(t).removesuffix(" UTC")


def format_duration(seconds: float) -> str:
    """A duration as 45s, 12m, 3h05m or 2d04h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_silences(silences: list[dict], out: TextIO) -> None:
    if not silences:
        print("no silences", file=out)
        return
    print(f"{'ID':<6} {'STATE':<8} {'NODE':<16} {'GPU':<4} {'DETECTOR':<20} {'ENDS':<20} BY: COMMENT", file=out)
    for s in silences:
        gpu = "-" if s["gpu"] is None else str(s["gpu"])
        by = s["created_by"] or "-"
        print(
            f"{s['id']:<6} {s['state']:<8} {s['node']:<16} {gpu:<4} {s['detector'] or '-':<20} "
            f"{format_time(s['ends_at']):<20} {by}: {s['comment']}",
            file=out,
        )


def format_alert(alert: dict, out: TextIO) -> None:
    """One alert as a row of the alerts table, then its id, times, job and evidence."""
    format_alerts([alert], out)
    ended = "still firing" if alert.get("ends_at") is None else f"ended {format_time(alert['ends_at'])}"
    details = [f"id {alert['id']}", f"started {format_time(alert['starts_at'])}", ended]
    if alert.get("job") is not None:
        details.append(f"job {alert['job']}" + ("" if alert.get("rank") is None else f" rank {alert['rank']}"))
    print(", ".join(details), file=out)
    evidence = alert.get("evidence") or {}
    print("evidence:", file=out)
    for line in json.dumps(evidence, indent=2, ensure_ascii=False).splitlines():
        print(f"  {line}", file=out)


@contextmanager
def _flag_errors() -> Iterator[None]:
    """The history parsers' ValueErrors (which name the flag) as CtlErrors."""
    try:
        yield
    except ValueError as exc:
        raise CtlError(str(exc)) from None


def _series_options(args: argparse.Namespace) -> tuple[list[str], float | None, int]:
    """--field, --step and --width, checked."""
    with _flag_errors():
        step = None if args.step is None else parse_duration(args.step, "--step")
    if args.width < 1:
        raise CtlError(f"--width must be at least 1, got {args.width}")
    return parse_fields(args.field), step, args.width


def _print_history(response: dict, fields: list[str], width: int, window: tuple[float, float], form: str) -> None:
    if form == "json":
        format_history_json(response, sys.stdout)
    elif form == "csv":
        format_history_csv(response, sys.stdout, fields=fields)
    else:
        format_history_table(response, sys.stdout, fields=fields, width=width, window=window)


def cmd_history(args: argparse.Namespace) -> int:
    now = time.time()
    fields, step, width = _series_options(args)
    if args.gpu is not None and args.gpu < 0:
        raise CtlError(f"--gpu must be 0 or more, got {args.gpu}")
    with _flag_errors():
        window = time_window(
            since=None if args.since is None else parse_duration(args.since, "--since"),
            start=None if args.start is None else parse_time(args.start, "--start", now),
            end=None if args.end is None else parse_time(args.end, "--end", now),
            now=now,
        )
    response = api_get(args, series_path(args.node, args.gpu, fields, *window, step))
    _print_history(response, fields, width, window, args.format)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = api_get(args, "/api/v1/status")
    if args.node is not None:
        nodes = [n for n in status["nodes"] if n["node"] == args.node]
        if not nodes:
            raise CtlError(
                f"no node named {args.node!r} has reported to this collector (`fleetwatchctl status` lists them)"
            )
        status = {**status, "nodes": nodes}
    if args.json:
        json.dump(status, sys.stdout)
        print()
    else:
        format_status(status, sys.stdout)
    healths = [n["health"] for n in status["nodes"]] + [g["health"] for n in status["nodes"] for g in n["gpus"]]
    return _fail_on(args, [h for h in healths if h != "ok"])


def cmd_alert(args: argparse.Namespace) -> int:
    """alerts --id N [--history]: one alert, and with --history its node's or GPU's telemetry over its span."""
    fields, step, width = _series_options(args)
    alert = api_get(args, f"/api/v1/alerts/{args.id}")
    if args.json:
        print(json.dumps(alert))
    else:
        format_alert(alert, sys.stdout)
    if not args.history:
        return 0
    if not alert.get("node"):
        raise CtlError(f"alert {args.id} names no node, so it has no telemetry history")
    window = alert_window(alert, time.time())
    response = api_get(args, series_path(alert["node"], alert.get("gpu"), fields, *window, step))
    if not args.json:
        print()
    _print_history(response, fields, width, window, "json" if args.json else "table")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    if args.id is not None:
        return cmd_alert(args)
    flags = (("--history", args.history), ("--field", args.field), ("--step", args.step))
    given = [flag for flag, value in flags if value]
    if given:
        raise CtlError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --id N (one alert's history)")
    query: dict[str, Any] = {"status": args.status, "limit": args.limit}
    for name in ("node", "gpu", "detector", "severity"):
        if getattr(args, name) is not None:
            query[name] = getattr(args, name)
    if args.since is not None:
        with _flag_errors():
            query["since"] = parse_duration(args.since, "--since")
    alerts = api_get(args, "/api/v1/alerts?" + urllib.parse.urlencode(query))["alerts"]
    if args.json:
        for a in alerts:
            print(json.dumps(a))
    else:
        format_alerts(alerts, sys.stdout, times=True)
    return _fail_on(args, [a["severity"] for a in alerts if a["status"] == "firing"])


def cmd_jobs(args: argparse.Namespace) -> int:
    query: dict[str, Any] = {}
    if args.since is not None:
        with _flag_errors():
            query["since"] = parse_duration(args.since, "--since")
    if args.job is not None:
        query["job"] = args.job
    path = "/api/v1/jobs" + ("?" + urllib.parse.urlencode(query) if query else "")
    jobs = api_get(args, path)["jobs"]
    if args.job is not None and not jobs:
        raise CtlError(f"no job {args.job!r} has GPU samples in the range (`fleetwatchctl jobs` lists them)")
    if args.json:
        for job in jobs:
            print(json.dumps(job))
    else:
        format_jobs(jobs, sys.stdout)
    return 0


def format_jobs(jobs: list[dict], out: TextIO) -> None:
    """The jobs table: what each job held, for how long, and what it cost in energy."""
    if not jobs:
        print("no jobs with GPU samples in the range", file=out)
        return
    print(
        f"{'JOB':<24} {'STATE':<8} {'STARTED (UTC)':<19} {'FOR':<8} {'NODES':>5} {'GPUS':>5} {'ENERGY kWh':>11} "
        f"{'J/STEP':>9} {'UTIL %':>6} {'POWER W':>8} {'ALERTS':>6} STRAGGLERS",
        file=out,
    )
    for j in jobs:
        per_step = "-" if j["joules_per_step"] is None else f"{j['joules_per_step']:.0f}"
        util = "-" if j["mean_utilization_percent"] is None else f"{j['mean_utilization_percent']:.0f}"
        power = "-" if j["mean_power_watts"] is None else f"{j['mean_power_watts']:.0f}"
        stragglers = ", ".join(sorted({f"{s['node']}/{s['gpu']}" for s in j["stragglers"]})) or "-"
        print(
            f"{j['job']:<24} {j['state']:<8} {_utc(j['first_seen']):<19} {format_duration(j['duration_seconds']):<8} "
            f"{len(j['nodes']):>5} {j['gpu_count']:>5} {j['energy_kwh']:>11.4f} {per_step:>9} {util:>6} {power:>8} "
            f"{len(j['alerts']):>6} {stragglers}",
            file=out,
        )


# The exit status when --fail-on finds alerts at or above its severity firing (1 is an error).
FAIL_ON_EXIT = 3
_SEVERITY_RANK = {"info": 1, "warning": 2, "critical": 3}


def _fail_on(args: argparse.Namespace, firing_severities: list[str]) -> int:
    """FAIL_ON_EXIT when --fail-on is given and an alert at or above it fires, else 0."""
    level = getattr(args, "fail_on", None)
    if level is None:
        return 0
    worst = [s for s in firing_severities if _SEVERITY_RANK.get(s, 0) >= _SEVERITY_RANK[level]]
    if worst:
        print(f"fleetwatchctl: {len(worst)} alert(s) at {level} or above firing (--fail-on {level})", file=sys.stderr)
        return FAIL_ON_EXIT
    return 0


def cmd_silence_add(args: argparse.Namespace) -> int:
    with _flag_errors():
        seconds = parse_duration(args.duration, "--for")
    if args.gpu is not None and args.gpu < 0:
        raise CtlError(f"--gpu must be 0 or more, got {args.gpu}")
    body = {
        "node": args.node,
        "gpu": args.gpu,
        "detector": args.detector,
        "seconds": seconds,
        "comment": args.comment,
        "created_by": args.created_by,
    }
    _print_silences([api_send(args, "POST", "/api/v1/silences", body)], args.json)
    return 0


def cmd_silence_list(args: argparse.Namespace) -> int:
    _print_silences(api_get(args, "/api/v1/silences" + ("?all=1" if args.all else ""))["silences"], args.json)
    return 0


def cmd_silence_expire(args: argparse.Namespace) -> int:
    _print_silences([api_send(args, "DELETE", f"/api/v1/silences/{args.id}")], args.json)
    return 0


def _print_silences(silences: list[dict], as_json: bool) -> None:
    if as_json:
        for silence in silences:
            print(json.dumps(silence))
    else:
        format_silences(silences, sys.stdout)


def _default_created_by() -> str:
    try:
        user = os.getlogin()
    except OSError:  # no controlling terminal (cron, CI)
        user = os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
    return f"{user}@{socket.gethostname()}"


def _add_fail_on(p: argparse.ArgumentParser, when: str) -> None:
    p.add_argument(
        "--fail-on",
        choices=("info", "warning", "critical"),
        help=f"exit {FAIL_ON_EXIT} when {when} at this severity or above (for scripts and health checks)",
    )


def add_silence_parser(sub: Any) -> None:
    p = sub.add_parser(
        "silence",
        help="hold back a node's or GPU's alert deliveries (kept in the collector's database)",
        description="Silences without Alertmanager. Alerts a silence covers are still recorded and shown "
        "(`alerts` marks them), but no notifier sends them while it is active; Alertmanager's feed leaves "
        "them out too. Adding and expiring need the collector's api_admin_token (--token-file).",
    )
    silence = p.add_subparsers(dest="silence_command", required=True)
    add = silence.add_parser(
        "add", help="silence a node, or one of its GPUs, or one detector there, for a while", description=""
    )
    add.add_argument("--node", required=True, help="the node, as `fleetwatchctl status` names it")
    add.add_argument("--gpu", type=int, metavar="N", help="only this GPU's alerts [default: the whole node's]")
    add.add_argument("--detector", metavar="ID", help="only this detector's alerts (e.g. xid) [default: all]")
    add.add_argument(
        "--for",
        dest="duration",
        required=True,
        metavar="DURATION",
        help="how long: seconds, or a number with s, m, h or d (90m, 2h, 7d)",
    )
    add.add_argument("--comment", required=True, help="why: an RMA ticket, a maintenance window")
    add.add_argument("--created-by", default=_default_created_by(), help="who [default: your user name @ this host]")
    add.add_argument("--json", action="store_true", help="print the silence as JSON")
    add.set_defaults(func=cmd_silence_add)
    ls = silence.add_parser("list", help="active and pending silences, newest first")
    ls.add_argument("--all", action="store_true", help="expired ones too")
    ls.add_argument("--json", action="store_true", help="one JSON object a line")
    ls.set_defaults(func=cmd_silence_list)
    expire = silence.add_parser("expire", help="end a silence now")
    expire.add_argument("id", type=int, metavar="ID", help="the silence's id, as `silence list` shows it")
    expire.add_argument("--json", action="store_true", help="print the silence as JSON")
    expire.set_defaults(func=cmd_silence_expire)


def cmd_detect(args: argparse.Namespace) -> int:
    from fleetwatch.detectors.replay import ReplayError, read_records, replay
    from fleetwatch.inventory import Inventory, InventoryError, boards_from_kernel_log, parse_inventory

    inventory = Inventory()
    if args.inventory:
        try:
            with open(args.inventory, encoding="utf-8", errors="replace") as f:
                boards = parse_inventory(f.read())
        except InventoryError as exc:
            raise CtlError(f"{args.inventory}: {exc}") from None
        for board in boards:
            inventory.add(args.node, board)
    path = args.replay or args.kmsg
    source = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - the with below closes it
    try:
        with source:
            if args.kmsg:
                from fleetwatch.agent.sources.kmsg import replay_events
                from fleetwatch.detectors.gpu_lost import GpuLostDetector
                from fleetwatch.detectors.xid import XidDetector

                lines = source.read().splitlines()
                # The log names each board's UUID when the driver takes it ("NVRM: GPU at PCI:...").
                for board in boards_from_kernel_log(lines):
                    inventory.add(args.node, board)
                events = replay_events(
                    lines, args.node, boot_time=args.boot_time, bus_id_to_gpu=inventory.bus_to_index(args.node)
                )
                # A kernel log has events only: sample-driven detectors (node_silent) would read
                # the gaps between lines as a silent node.
                findings = replay(events, [XidDetector(), GpuLostDetector()], skip_idle=True)
            else:
                records = list(read_records(source))
                _learn_boards(inventory, records)
                findings = replay(records)
    except ReplayError as exc:
        raise CtlError(f"{path}: {exc}") from None
    for finding in findings:
        print(inventory.name_board(finding).to_json())
    return 0


def _learn_boards(inventory: Any, records: list[Any]) -> None:
    """The boards a replay file names: GPU samples give index and UUID, XID events the bus id."""
    from fleetwatch.inventory import make_board
    from fleetwatch.records import Event, GpuSample

    for record in records:
        if isinstance(record, GpuSample) and record.uuid:
            inventory.add(record.node, make_board(index=record.gpu, uuid=record.uuid))
        elif isinstance(record, Event) and (record.pci_bus_id or record.uuid):
            inventory.add(record.node, make_board(index=record.gpu, uuid=record.uuid, pci_bus_id=record.pci_bus_id))


def cmd_demo(args: argparse.Namespace) -> int:
    from fleetwatch.sim.demo import run_demo

    summary = run_demo(
        duration_seconds=args.duration,
        nodes=args.nodes,
        gpus=args.gpus,
        json_output=args.json,
        tls=args.tls,
        http_listen=args.http_listen,
    )
    return 0 if summary["alerts"] else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from fleetwatch.sim.evaluate import ScenarioError, evaluate_corpus, format_report

    if args.jobs is not None and args.jobs < 1:
        raise CtlError(f"--jobs must be at least 1, got {args.jobs}")
    started = time.perf_counter()
    try:
        report = evaluate_corpus(args.corpus, names=args.scenario, jobs=args.jobs)
    except ScenarioError as exc:
        raise CtlError(str(exc)) from None
    # The simulator's and the detectors' speed together: how long a soak of N node-days will take.
    wall_seconds = time.perf_counter() - started
    report["wall_seconds"] = round(wall_seconds, 2)
    report["node_days_per_hour"] = round(report["node_days"] / wall_seconds * 3600.0, 1)
    if args.json:
        json.dump(report, sys.stdout)
        print()
    else:
        format_report(report, sys.stdout)
        print(f"evaluated in {wall_seconds:.1f} s: {report['node_days_per_hour']:.0f} simulated node-days an hour")
    return 0  # it reports; thresholds are the test suite's to assert


def _add_series_arguments(p: argparse.ArgumentParser, *, all_fields: str, scope: str = "") -> None:
    """--field, --step and --width: what a history table shows, for `history` and `alerts --id --history`."""
    p.add_argument(
        "--field",
        action="append",
        metavar="F",
        help=f"{scope}a field to show (sm_clock_mhz); repeatable, or a comma list [default: {all_fields}]",
    )
    p.add_argument(
        "--step",
        metavar="DURATION",
        help=f"{scope}one point per step, its mean (with min and max) [default: raw samples when the range is "
        "within raw retention, else 60 s]",
    )
    p.add_argument(
        "--width",
        type=int,
        default=DEFAULT_WIDTH,
        metavar="N",
        help=f"{scope}sparkline width in characters, in the table [default: {DEFAULT_WIDTH}]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetwatchctl", description="Look at and test a fleetwatch deployment.")
    parser.add_argument(
        "--collector",
        default=os.environ.get("FLEETWATCH_COLLECTOR_URL", DEFAULT_COLLECTOR_URL),
        help=f"collector HTTP address, http:// or https:// [default: {DEFAULT_COLLECTOR_URL}; "
        "env FLEETWATCH_COLLECTOR_URL]",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=os.environ.get("FLEETWATCH_TOKEN_FILE") or None,
        help="file holding the collector's API token (its api_read_token), sent as a bearer token "
        "[env FLEETWATCH_TOKEN_FILE]",
    )
    parser.add_argument(
        "--ca-file",
        metavar="FILE",
        default=os.environ.get("FLEETWATCH_CA_FILE") or None,
        help="CA certificate (PEM) that an https:// collector's certificate must chain to "
        "[default: the system's CAs; env FLEETWATCH_CA_FILE]",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", help="nodes and GPUs with their health")
    p.add_argument("--node", metavar="NODE", help="only this node")
    p.add_argument("--json", action="store_true", help="print the status API's JSON")
    _add_fail_on(p, "a node or GPU has a firing alert")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "alerts",
        help="alerts, firing by default; --id N for one, --history for its telemetry",
        description="List alerts, or show one (--id) with its evidence and, with --history, the telemetry "
        "of its node or GPU around it.",
    )
    p.add_argument("--status", choices=("firing", "resolved", "all"), default="firing", help="[default: firing]")
    p.add_argument("--limit", type=int, default=200, help="at most this many, newest first [default: 200]")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object a line (with --id --history: the alert, then the series API's response)",
    )
    p.add_argument("--id", type=int, metavar="N", help="only alert N, with its evidence (--status, --limit unused)")
    p.add_argument("--node", metavar="NODE", help="only alerts on this node")
    p.add_argument("--gpu", type=int, metavar="N", help="only alerts on this GPU index")
    p.add_argument("--detector", metavar="ID", help="only this detector's alerts (e.g. xid, thermal)")
    p.add_argument("--severity", choices=("info", "warning", "critical"), help="only alerts of this severity")
    p.add_argument(
        "--since", metavar="DURATION", help="only alerts firing at some time in the last DURATION (90m, 2h, 7d)"
    )
    _add_fail_on(p, "a listed alert is firing")
    p.add_argument(
        "--history",
        action="store_true",
        help="with --id: also the history table of the alert's node or GPU over its evidence's span "
        "[default span: 10 min before it started to 5 min after it ended, or now]",
    )
    _add_series_arguments(p, all_fields="every field with data", scope="with --history: ")
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser(
        "jobs",
        help="training jobs: the GPUs and nodes each held, how long, energy (kWh, J a step), usage, alerts",
        description="Jobs seen in the GPU samples (Slurm job ids, torchrun run ids, Kubernetes pods), from the "
        "collector's jobs API. Energy is the sum of the increases of each GPU's energy counter while it "
        "named the job.",
    )
    p.add_argument(
        "--since",
        metavar="DURATION",
        help="jobs with samples in the last DURATION (90m, 2h, 7d) [default: 1d; at most the raw retention]",
    )
    p.add_argument("--job", metavar="ID", help="only this job")
    p.add_argument("--json", action="store_true", help="one JSON object a job, a line")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser(
        "history",
        help="a node's or GPU's telemetry over time: min, max, last value and a sparkline a field",
        description="Telemetry of one node (its host series) or one of its GPUs over a time range, from the "
        "collector's series API. TIME is Unix seconds, ISO 8601 / RFC 3339 (2025-12-06T05:00:00Z, "
        "2025-12-06T06:00:00+01:00; without an offset it is UTC) or now. DURATION is seconds, or a number "
        "with s, m, h or d (90s, 15m, 1h, 2d, 1h30m).",
    )
    p.add_argument("node", metavar="NODE", help="the node, as `fleetwatchctl status` names it")
    p.add_argument("--gpu", type=int, metavar="N", help="GPU index on NODE [default: the node's host series]")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--since", metavar="DURATION", help="the range is this long and ends at --end [default: 1h]")
    when.add_argument("--start", metavar="TIME", help="the range starts here (instead of --since)")
    p.add_argument("--end", metavar="TIME", help="the range ends here [default: now]")
    _add_series_arguments(p, all_fields="every field with data in the range")
    p.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table: min, max, last value and a sparkline a field; csv: columns time (ISO 8601 UTC), "
        "t (Unix seconds) and one a field, a row a time; json: the API's response [default: table]",
    )
    p.add_argument("--json", dest="format", action="store_const", const="json", help="the same as --format json")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser(
        "detect", help="run the detectors offline over a replay file or a kernel log; findings as JSON Lines"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--replay", metavar="FILE", help="JSON Lines replay records (see DESIGN.md); - for stdin")
    what.add_argument(
        "--kmsg",
        metavar="FILE",
        help="a kernel log as dmesg, dmesg -T, dmesg --time-format iso, journalctl -k or /dev/kmsg "
        "print it; - for stdin",
    )
    p.add_argument("--node", default="localhost", help="node name for findings from --kmsg [default: localhost]")
    p.add_argument(
        "--inventory",
        metavar="FILE",
        help="the node's GPUs, to name each finding's board (index, UUID, PCI bus id, serial, model): the "
        "output of `nvidia-smi -q`, of `nvidia-smi --query-gpu=index,uuid,pci.bus_id,serial,name "
        "--format=csv`, or a JSON list of {index, uuid, pci_bus_id, serial, name}",
    )
    p.add_argument(
        "--boot-time",
        type=float,
        default=None,
        metavar="UNIX_SECONDS",
        help="with --kmsg: when the node booted, to place lines stamped in seconds since boot (dmesg, /dev/kmsg)",
    )
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser(
        "demo",
        help="a collector, 4 simulated 8-GPU nodes and a webhook receiver on loopback, "
        "with an XID 79 and a thermal slowdown",
    )
    p.add_argument("--duration", type=float, default=30.0, help="seconds to run [default: 30]")
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes [default: 4]")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node [default: 8]")
    p.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")
    p.add_argument(
        "--tls",
        action="store_true",
        help="agents and collector speak mTLS, with a CA and certificates made in the demo's temporary directory",
    )
    p.add_argument(
        "--http-listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where the demo collector serves its fleet page and API, e.g. 127.0.0.1:8080 to open it "
        "in a browser while the demo runs [default: 127.0.0.1:0, a free port; the first line prints it]",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "eval",
        help="score the detectors on a labelled scenario corpus: precision, recall, false alarms, latency, speed",
    )
    p.add_argument("--corpus", required=True, metavar="DIR", help="directory of scenario TOML files (tests/scenarios)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument(
        "--scenario",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="evaluate only these scenarios (file names, with or without .toml); repeatable",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="scenarios evaluated in parallel [default: the CPU count]",
    )
    p.set_defaults(func=cmd_eval)

    add_silence_parser(sub)
    add_certs_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except CtlError as exc:
        print(f"fleetwatchctl: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"fleetwatchctl: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Piped into `head`, which has read enough: stop quietly. stdout is pointed at /dev/null
        # so that the interpreter's last flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
