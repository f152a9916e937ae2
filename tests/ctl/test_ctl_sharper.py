"""fleetwatchctl for scripts and people: filters, times, --fail-on, one-line errors, quiet pipes."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetwatch.ctl.main import FAIL_ON_EXIT, build_parser, format_duration
from fleetwatch.ctl.main import main as ctl
from tests.collector.test_collector_app import exchange
from tests.collector.test_webhook_fidelity import eventually, start, xid_batch
from tests.e2e.e2e_support import clean_env
from tests.e2e.test_alertmanager import hello

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ctl(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_alerts_filter_show_times_and_fail_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = await start(tmp_path)
    base = f"http://127.0.0.1:{app.http_port}"
    try:
        # n01: XID 48 (critical) on GPU 1, XID 13 (warning) on GPU 0; n02: XID 13 on GPU 0.
        await exchange(app.grpc_port, [hello("n01"), xid_batch("n01", 1, [(1, 48), (0, 13)])], expect=2)
        await exchange(app.grpc_port, [hello("n02"), xid_batch("n02", 1, [(0, 13)])], expect=2)
        await eventually(lambda: len(app.store.firing_alerts()) == 3, 10, "three alerts")

        def cli(*argv: str) -> tuple[int, str, str]:
            return run(capsys, "--collector", base, *argv)

        code, out, _ = await asyncio.to_thread(cli, "alerts", "--node", "n01", "--json")
        assert code == 0 and {json.loads(line)["gpu"] for line in out.splitlines()} == {0, 1}
        code, out, _ = await asyncio.to_thread(cli, "alerts", "--node", "n01", "--gpu", "1", "--json")
        assert [json.loads(line)["key"] for line in out.splitlines()] == ["48"]
        code, out, _ = await asyncio.to_thread(cli, "alerts", "--severity", "warning", "--json")
        assert sorted(json.loads(line)["node"] for line in out.splitlines()) == ["n01", "n02"]
        code, out, _ = await asyncio.to_thread(cli, "alerts", "--detector", "thermal")
        assert code == 0 and out.strip() == "no alerts"
        code, out, _ = await asyncio.to_thread(cli, "alerts", "--since", "10m")
        header, *rows = out.splitlines()
        assert header.split()[:5] == ["ID", "STARTED", "(UTC)", "ENDED", "FOR"] and len(rows) == 3
        assert all(" - " in row for row in rows)  # still firing: no end

        # --fail-on: critical fires on n01 only.
        code, _, err = await asyncio.to_thread(cli, "alerts", "--fail-on", "critical")
        assert code == FAIL_ON_EXIT and "1 alert(s) at critical or above firing" in err
        code, _, _ = await asyncio.to_thread(cli, "alerts", "--node", "n02", "--fail-on", "critical")
        assert code == 0
        code, out, _ = await asyncio.to_thread(cli, "status", "--node", "n02", "--fail-on", "warning")
        assert code == FAIL_ON_EXIT and "n02" in out and "n01" not in out
        code, _, _ = await asyncio.to_thread(cli, "status", "--node", "n02", "--fail-on", "critical")
        assert code == 0
        code, _, err = await asyncio.to_thread(cli, "status", "--node", "n99")
        assert code == 1 and err.count("\n") == 1 and "no node named 'n99'" in err
        code, _, err = await asyncio.to_thread(cli, "alerts", "--since", "soon")
        assert code == 1 and "--since" in err
    finally:
        await app.stop(grace_seconds=0.2)


@pytest.mark.parametrize("url", ["nonsense", "ftp://host/", "http://:9471", "http://host:notaport"])
def test_a_collector_url_that_is_not_one_is_one_line(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, err = run(capsys, "--collector", url, "status")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"fleetwatchctl: --collector {url!r} is not an http:// or https:// URL")


def test_piped_into_head_it_ends_quietly() -> None:
    # A kernel log with many XIDs gives many lines; head takes one and closes the pipe.
    kmsg = ROOT / "tests" / "fixtures" / "kmsg" / "dmesg.txt"
    command = f"{sys.executable} -m fleetwatch.ctl.main detect --kmsg {kmsg} | head -n 1"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert result.returncode == 0 and result.stdout.count("\n") == 1
    assert result.stderr == ""


def test_agent_given_a_fault_on_a_gpu_it_lacks_says_so_in_one_line() -> None:
    argv = ["--config", "/dev/null", "--simulate", "--sim-gpus", "2", "--sim-faults", "xid:79@5+3", "--once"]
    result = subprocess.run(
        [sys.executable, "-m", "fleetwatch.agent.main", *argv], capture_output=True, text=True, env=clean_env()
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "fleetwatch-agent: configuration error: sim_faults: 'xid:79@5+3' targets GPU 5, but the simulated node "
        "has 2 (sim_gpus; GPUs 0-1)\n"
    )


def test_durations_read_as_people_write_them() -> None:
    assert [format_duration(s) for s in (0, 45, 600, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "0s",
        "45s",
        "10m",
        "3h05m",
        "2d04h",
    ]


@pytest.mark.parametrize("daemon", ["fleetwatch.agent.main", "fleetwatch.collector.main"])
def test_a_config_path_that_does_not_exist_is_one_line(daemon: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    proc = subprocess.run(
        [sys.executable, "-m", daemon, "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and str(missing) in proc.stderr and "Traceback" not in proc.stderr


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """(command path, parser) of every fleetwatchctl command that runs (subcommands of subcommands too)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(*path, parser)]  # type: ignore[list-item]
    return [leaf for name, sub in subs[0].choices.items() for leaf in _leaf_parsers(sub, (*path, name))]


def test_every_command_speaks_json() -> None:
    # detect prints findings as JSON Lines already; every other command has --json.
    missing = [
        " ".join(leaf[:-1])
        for leaf in _leaf_parsers(build_parser())
        if leaf[0] != "detect" and "--json" not in leaf[-1]._option_string_actions
    ]
    assert missing == []


def test_status_lists_the_collectors_when_several_share_the_database() -> None:
    import io

    from fleetwatch.ctl.main import format_status

    collector = {"alive": True, "streams": 10, "nodes": 10, "leases": [], "self": False}
    status = {
        "nodes": [{"node": "n01", "connected": True, "health": "ok", "gpus": [], "collector": "c1"}],
        "alerts_firing": 0,
        "collectors": [
            {**collector, "id": "c1", "leases": ["alerts", "fleet_detection", "retention"], "self": True},
            {**collector, "id": "c2"},
            {**collector, "id": "c3", "alive": False, "streams": 0, "nodes": 0},
        ],
    }
    out = io.StringIO()
    format_status(status, out)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("c1 (this)") and "alerts, fleet_detection, retention" in line for line in lines)
    assert any(line.startswith("c3") and " dead " in line for line in lines)
    # One collector is the whole story: no table.
    out = io.StringIO()
    format_status({**status, "collectors": status["collectors"][:1]}, out)
    assert "COLLECTOR" not in out.getvalue()
