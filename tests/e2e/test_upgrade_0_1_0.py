"""A real collector started on a 0.1.0 SQLite database upgrades it and serves its nodes and alerts."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from fleetwatch.collector.storage.migrations import script_directory
from tests.e2e.e2e_support import Collector, clean_env, free_port

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "db-0.1.0" / "collector-0.1.0.sqlite"
HEAD = script_directory().get_current_head()


def copy_0_1_0(tmp_path: Path) -> Path:
    # A copy: the committed file stays as 0.1.0 wrote it, without WAL files beside it.
    db = tmp_path / "collector.db"
    shutil.copy(FIXTURE, db)
    return db


def ctl(http_port: int, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", "--collector", f"http://127.0.0.1:{http_port}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def migrate_only(db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetwatch.collector.main",
            "--config",
            "/dev/null",
            "--database-url",
            f"sqlite:///{db}",
            "--migrate-only",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


def revision(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_collector_upgrades_a_0_1_0_database_and_shows_its_alerts_and_nodes(tmp_path: Path) -> None:
    db = copy_0_1_0(tmp_path)
    log = tmp_path / "collector.log"
    collector = Collector(db, free_port(), free_port(), log)
    collector.start()
    try:
        alerts = ctl(collector.http_port, "alerts", "--status", "all", "--json")
        status = ctl(collector.http_port, "status")
        status_json = json.loads(ctl(collector.http_port, "status", "--json"))
    finally:
        collector.stop()
        print(log.read_text()[-5000:])

    assert f"database schema upgraded from 0001 to {HEAD}" in log.read_text()
    assert revision(db) == HEAD
    rows = [json.loads(line) for line in alerts.splitlines()]
    assert {(row["detector"], row["node"], str(row["gpu"])) for row in rows} == {
        ("xid", "rack1|n01", "1"),
        ("thermal", "n02", "0"),
        ("straggler.telemetry", "n02", "0"),
    }
    # Node lines (GPU alert lines are indented; the last line counts alerts): one mark per GPU.
    nodes = [line.split() for line in status.splitlines()[1:-1] if not line.startswith(" ")]
    assert [(node[0], len(node[3])) for node in nodes] == [("n02", 2), ("rack1|n01", 2)]

    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        newest = {
            (row["node"], row["gpu"]): row
            for row in conn.execute("SELECT * FROM gpu_samples ORDER BY ts, id")  # later rows win
        }
    gpus = {(node["node"], gpu["gpu"]): gpu for node in status_json["nodes"] for gpu in node["gpus"]}
    assert set(gpus) == {("n02", 0), ("n02", 1), ("rack1|n01", 0), ("rack1|n01", 1)}
    for key, gpu in gpus.items():
        assert gpu["uuid"] == newest[key]["uuid"]
        for metric in ("sm_clock_mhz", "temp_gpu_celsius", "power_watts"):
            assert gpu["metrics"][metric] == newest[key][metric]


def test_migrate_only_upgrades_and_exits(tmp_path: Path) -> None:
    db = copy_0_1_0(tmp_path)
    proc = migrate_only(db)
    assert proc.returncode == 0, proc.stderr
    assert f"database schema upgraded from 0001 to {HEAD}" in proc.stderr
    assert revision(db) == HEAD

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    proc = migrate_only(db)
    assert proc.returncode == 1
    assert "migration failed" in proc.stderr and "'0099_from_the_future'" in proc.stderr
