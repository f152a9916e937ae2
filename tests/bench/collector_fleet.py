"""Benchmark: the collector under a real-time GPU fleet, side by side with Prometheus scraping the same fleet.

A load generator (tests/bench/fleet_load.py, in --workers separate processes) simulates --nodes
nodes x --gpus GPUs sampled at 1 Hz: each node is its own gRPC stream that sends, as the agent
does, one Batch every --batch-seconds holding that many sampling cycles in the dense form
(GpuColumns; --batch-seconds 0: one Batch of GpuSamples a second, as 0.1.0 agents send), 35 H100
fields per GPU from the real agent code over the fake NVML plus the 8 host fields a cycle, the
nodes' phases spread over the batch interval, values moving the way real telemetry moves. Phases run
one after another, never together (the load shares the machine with what it measures):

- fleetwatch SQLite, fleetwatch PostgreSQL (--databases): `fleetwatch-collector` as a subprocess
  on a fresh database (a SQLite file in its own directory; a PostgreSQL schema made for the run
  and dropped after). Over the steady-state window (after --warmup-seconds) it measures the
  collector's CPU (utime+stime from /proc, its child processes included) per metric value acked
  ("CPU per stored value") and as a share of one core, its RSS (end and peak), the ack lag of
  each batch (send to the ack that covers it), and, after the load, batches lost (sent minus
  acked once the streams have drained; must be 0). Disk per value is the database's size (the
  SQLite directory: file, -wal, -shm; PostgreSQL: pg_total_relation_size of every table of the
  schema, indexes and TOAST included) over the values acked: once when the load stops and once
  after --settle-seconds, as the store compacts in the background; the peak is sampled along the
  way. For PostgreSQL the CPU of the server's backends serving the collector is shown beside.
- Prometheus (when `prometheus` is on PATH; `apt-get install prometheus`): the same fleet served
  as text exposition, one target per node, under the agent's metric names, scraped every second
  for the same time; its CPU per sample appended (prometheus_tsdb_head_samples_appended_total),
  RSS and on-disk TSDB (WAL + chunks_head + blocks). A short run never cuts a block, so the
  documented figure for compacted blocks (1-2 bytes per sample) is printed beside it.

Beside each phase it prints the load generator's own CPU share, its achieved send rate against
the target and how late its sends ran (it must not be the bottleneck), and the CPU that other
processes on the machine used in the window (from /proc/stat): CPU per value holds up on a busy
machine, latencies and missed scrapes do not. Prometheus's samples appended include its 5
synthetic series a scrape (up, scrape_duration_seconds, ...), 1.7 % of 293.

Prints a table (with each fleetwatch CPU/value as a multiple of Prometheus's) and one JSON line.
Exit status 1 when a collector fails to start or dies (its log tail is printed), or when a batch
is lost. Child processes are killed and temporary directories and schemas removed in any case.
Rerun: `.venv/bin/python tests/bench/collector_fleet.py --nodes 300 --seconds 180`
(`--databases sqlite --no-prometheus` for one phase; `--keep` keeps the temporary directories).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fleet_load
except ImportError:  # run as a module: python -m tests.bench.collector_fleet
    from tests.bench import fleet_load  # type: ignore[no-redef]

CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_PG_URL = os.environ.get("FLEETWATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
START_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 60.0
TEMPLATES = 6  # simulated nodes sampled through the agent's NVML source; every node starts from one
PROM_DOC_BYTES_PER_SAMPLE = "1-2"  # prometheus.io/docs/prometheus/latest/storage/: compacted blocks
# The daemons' log format is "time LEVEL logger: message" (fleetwatch.systemd.setup_logging).
LOG_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) ")
OTHER_LOAD_WARN = 0.2  # cores used by unrelated processes in a window before the output warns
PROM_SCRAPE_SERIES_PER_TARGET = 5  # up, scrape_duration_seconds, scrape_samples_*, scrape_series_added


class BenchError(Exception):
    """A phase could not be measured (a process failed); the message says which and why."""


# -- /proc ----------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def proc_cpu(pid: int) -> float | None:
    """CPU seconds of `pid`: utime + stime, plus cutime + cstime of the children it has reaped."""
    f = _stat_fields(pid)
    if f is None:
        return None
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK


def proc_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for c in children.read_text().split():
                    out.append(int(c))
                    todo.append(int(c))
    return out


def tree_cpu_rss(pid: int) -> tuple[float, int]:
    """CPU seconds and RSS bytes of `pid` and its live descendants (exited ones are in its cutime)."""
    cpu, rss = proc_cpu(pid) or 0.0, proc_rss(pid)
    for d in descendants(pid):
        cpu += proc_cpu(d) or 0.0
        rss += proc_rss(d)
    return cpu, rss


def dir_size(path: Path) -> dict[str, int]:
    """Bytes under `path` by top-level entry (files of subdirectories summed into their entry)."""
    out: dict[str, int] = {}
    if not path.exists():
        return out
    for entry in path.iterdir():
        with contextlib.suppress(OSError):
            if entry.is_dir():
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            else:
                size = entry.stat().st_size
            out[entry.name] = size
    return out


# -- processes ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the child gets SIGKILL if this benchmark dies without cleaning up.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Child:
    """A server under test: its own process group, its output in a log file, killed at the end."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is None:
            raise BenchError(f"{self.name} was not started")
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:]) or "(log empty)"

    def log_lines(self, pattern: re.Pattern[str]) -> list[str]:
        try:
            with self.log_path.open(errors="replace") as f:
                return [line.rstrip("\n") for line in f if pattern.search(line)]
        except OSError:
            return []

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> tuple[int | None, float]:
        """SIGTERM, then SIGKILL after `timeout`; returns (exit status, seconds it took)."""
        if self.proc is None or self.proc.poll() is not None:
            return (self.proc.returncode if self.proc else None), 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode, time.monotonic() - started

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        else:  # the leader is gone; anything it left in its group goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


class LoadGen:
    """The load-generator processes (spawned, so no gRPC state crosses a fork)."""

    def __init__(self, mode: str, cfgs: list[dict[str, Any]]) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.results: list[Any] = [None] * len(cfgs)
        for cfg in cfgs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=fleet_load.worker_main, args=(mode, cfg, child), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _receive(self, k: int, kind: str) -> Any:
        msg = self.conns[k].recv()
        if msg[0] == "error":
            raise BenchError(f"load generator {k} failed:\n{msg[1]}")
        if msg[0] != kind:
            raise BenchError(f"load generator {k}: expected {kind}, got {msg[0]}")
        return msg[1]

    def wait_all(self, kind: str, timeout: float, tick: Callable[[], None]) -> list[Any]:
        deadline = time.time() + timeout
        got: dict[int, Any] = {}
        while len(got) < len(self.procs):
            if time.time() > deadline:
                missing = sorted(set(range(len(self.procs))) - set(got))
                raise BenchError(f"load generators {missing} sent no {kind} within {timeout:.0f} s")
            for k, conn in enumerate(self.conns):
                if k in got:
                    continue
                if conn.poll(0.05):
                    got[k] = self._receive(k, kind)
                elif not self.procs[k].is_alive():
                    raise BenchError(f"load generator {k} exited (status {self.procs[k].exitcode}) before {kind}")
            tick()
        return [got[k] for k in range(len(self.procs))]

    def send(self, msg: Any) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(msg)

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        for conn in self.conns:
            conn.close()


def split_nodes(nodes: int, workers: int) -> list[list[int]]:
    # Interleaved, so each worker's nodes spread over the whole second.
    return [list(range(w, nodes, workers)) for w in range(max(1, min(workers, nodes)))]


# -- PostgreSQL -----------------------------------------------------------------------------------


class PgTarget:
    """A schema (or database) made for one run, its size, and the server processes serving it."""

    def __init__(self, base_url: str, isolation: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        self.psycopg = psycopg
        self.base = make_url(base_url)
        self.isolation = isolation
        tag = f"fwbench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.name = tag
        self.app = tag  # application_name of the collector's connections: finds its backends
        self._conninfo = {
            "host": self.base.host or "127.0.0.1",
            "port": self.base.port or 5432,
            "user": self.base.username or "postgres",
            "password": self.base.password or None,
            "connect_timeout": 5,
            "autocommit": True,
        }
        self.created = False
        self.conn: Any = None

    def _connect(self, dbname: str) -> Any:
        info = {k: v for k, v in self._conninfo.items() if v is not None}
        return self.psycopg.connect(dbname=dbname, **info)

    def create(self) -> str:
        """Make the schema or database; returns the collector's URL for it."""
        with self._connect(self.base.database or "postgres") as admin:
            if self.isolation == "schema":
                admin.execute(f'CREATE SCHEMA "{self.name}"')
            else:
                admin.execute(f'CREATE DATABASE "{self.name}"')
        self.created = True
        query = {"application_name": self.app}
        database = self.base.database
        if self.isolation == "schema":
            # As the test suite confines a Store: every connection of the URL has this search_path.
            query["options"] = f"-csearch_path={self.name}"
        else:
            database = self.name
        self.conn = self._connect(database or "postgres")
        url = self.base.set(drivername="postgresql+psycopg", database=database).update_query_dict(query)
        return url.render_as_string(hide_password=False)

    def _where(self) -> tuple[str, tuple[Any, ...]]:
        if self.isolation == "schema":
            return "n.nspname = %s", (self.name,)
        return "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'", ()

    def size(self) -> tuple[int, int]:
        """Bytes of every table (partitions, indexes and TOAST included) and how many tables."""
        where, params = self._where()
        row = self.conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0), count(*) FROM pg_class c "
            f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm') AND {where}",
            params,
        ).fetchone()
        return int(row[0]), int(row[1])

    def tables(self) -> list[str]:
        where, params = self._where()
        rows = self.conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE c.relkind IN ('r', 'p') AND {where} ORDER BY 1",
            params,
        ).fetchall()
        return [r[0] for r in rows]

    def server_pids(self) -> tuple[list[int], list[int]]:
        """(backends serving the collector, the server's WAL writer / checkpointer / bgwriter)."""
        rows = self.conn.execute(
            "SELECT pid, application_name, datname, backend_type FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
        ).fetchall()
        mine = [
            r[0]
            for r in rows
            if r[1] == self.app or (self.isolation == "database" and r[2] == self.name and r[3] != "client backend")
        ]
        aux = [r[0] for r in rows if r[3] in ("walwriter", "checkpointer", "background writer")]
        return mine, aux

    def drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
        if not self.created:
            return
        with self._connect(self.base.database or "postgres") as admin:
            if self.isolation == "schema":
                admin.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
            else:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.created = False


class PidCpu:
    """CPU of processes that are not ours (PostgreSQL backends): last value seen per pid, over time."""

    def __init__(self) -> None:
        self.series: dict[int, list[tuple[float, float]]] = {}

    def sample(self, t: float, pids: list[int]) -> None:
        for pid in pids:
            cpu = proc_cpu(pid)
            if cpu is not None:
                self.series.setdefault(pid, []).append((t, cpu))

    def between(self, a: float, b: float) -> float:
        total = 0.0
        for points in self.series.values():
            before = [c for t, c in points if t <= a]
            upto = [c for t, c in points if t <= b]
            if not upto:
                continue
            # A process first seen inside the window counts from zero: it started there (sampled each second).
            total += upto[-1] - (before[-1] if before else 0.0)
        return total


# -- monitoring -----------------------------------------------------------------------------------


@dataclass
class Tick:
    t: float
    cpu: float
    rss: int
    load_cpu: list[float]
    machine_busy: float  # CPU seconds all processes on the machine have used (/proc/stat)
    own: float  # this benchmark's own CPU seconds (the parent process)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (not idle, not iowait) since boot."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        # cpu user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / CLK_TCK
    return 0.0


def other_load(a: Tick, b: Tick, ours: float) -> float:
    """Cores used by processes that are neither measured nor this benchmark's, over the window."""
    window = b.t - a.t
    if window <= 0:
        return 0.0
    return max(0.0, (b.machine_busy - a.machine_busy) - (b.own - a.own) - ours) / window


@dataclass
class Monitor:
    """Samples the process under test every second, its disk every few seconds, and checks it lives."""

    child: Child
    load_pids: list[int]
    disk: Callable[[], int]
    disk_every: float
    pg: PgTarget | None = None
    ticks: list[Tick] = field(default_factory=list)
    disk_samples: list[tuple[float, int]] = field(default_factory=list)
    pg_mine: PidCpu = field(default_factory=PidCpu)
    pg_aux: PidCpu = field(default_factory=PidCpu)
    _next_disk: float = 0.0

    def sample(self) -> Tick:
        self.child.check()
        t = time.time()
        cpu, rss = tree_cpu_rss(self.child.pid)
        tick = Tick(
            t, cpu, rss, [proc_cpu(p) or 0.0 for p in self.load_pids], machine_busy_seconds(), sum(os.times()[:2])
        )
        self.ticks.append(tick)
        if self.pg is not None:
            with contextlib.suppress(Exception):
                mine, aux = self.pg.server_pids()
                self.pg_mine.sample(t, mine)
                self.pg_aux.sample(t, aux)
        if t >= self._next_disk:
            self._next_disk = t + self.disk_every
            with contextlib.suppress(Exception):
                self.disk_samples.append((t, self.disk()))
        return tick

    def run_until(
        self, until: float, marks: list[float], at_mark: Callable[[float], None] | None = None
    ) -> dict[float, Tick]:
        """Sample once a second and exactly at each mark, until `until`; the ticks at the marks."""
        at: dict[float, Tick] = {}
        pending = sorted(m for m in marks if m <= until)
        while True:
            now = time.time()
            nxt = min([now + 1.0, until, *pending])
            if nxt > now:
                time.sleep(nxt - now)
            tick = self.sample()
            while pending and pending[0] <= tick.t:
                mark = pending.pop(0)
                at[mark] = tick
                if at_mark is not None:
                    at_mark(mark)
            if tick.t >= until:
                return at

    def tick_callback(self, every: float = 1.0) -> Callable[[], None]:
        last = [0.0]

        def tick() -> None:
            if time.time() - last[0] >= every:
                last[0] = time.time()
                self.sample()

        return tick

    @property
    def rss_peak(self) -> int:
        return max((t.rss for t in self.ticks), default=0)

    @property
    def disk_peak(self) -> int:
        return max((d for _t, d in self.disk_samples), default=0)


def pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if a.size else None


# -- the collector phase --------------------------------------------------------------------------


def collector_cmd(grpc_port: int, http_port: int, url: str, args: argparse.Namespace) -> list[str]:
    exe = Path(sys.executable).parent / "fleetwatch-collector"
    found = str(exe) if exe.exists() else shutil.which("fleetwatch-collector")
    if not found:
        raise BenchError("fleetwatch-collector not found beside the interpreter or on PATH (make install)")
    return [
        found,
        "--config",
        "/dev/null",
        "--grpc-listen",
        f"127.0.0.1:{grpc_port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--database-url",
        url,
        "--no-log-alerts",
        "--max-agent-streams",
        str(max(64, 2 * args.nodes)),
        "--log-level",
        args.collector_log_level,
        *args.collector_arg,
    ]


def wait_ready(child: Child, url: str, timeout: float) -> float:
    started = time.time()
    while time.time() - started < timeout:
        child.check()
        with contextlib.suppress(OSError):
            status, _ = http_get(url, timeout=2)
            if status == 200:
                return time.time() - started
        time.sleep(0.25)
    raise BenchError(f"{child.name} not ready at {url} within {timeout:.0f} s")


def run_collector(db: str, args: argparse.Namespace, templates: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    label = {"sqlite": "fleetwatch SQLite", "postgres": "fleetwatch PostgreSQL"}[db]
    work = tmp / db
    work.mkdir()
    pg: PgTarget | None = None
    child: Child | None = None
    load: LoadGen | None = None
    out: dict[str, Any] = {"label": label, "ok": False}
    try:
        store_dir = work / "store"
        if db == "sqlite":
            store_dir.mkdir()
            url = f"sqlite:///{store_dir / 'collector.db'}"

            def disk() -> int:
                return sum(dir_size(store_dir).values())

        else:
            pg = PgTarget(args.pg_url, args.pg_isolation)
            url = pg.create()
            out["pg_namespace"] = f"{args.pg_isolation} {pg.name}"

            def disk() -> int:
                assert pg is not None
                return pg.size()[0]

        grpc_port, http_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}
        child = Child(
            "fleetwatch-collector", collector_cmd(grpc_port, http_port, url, args), work / "collector.log", env
        )
        child.start()
        out["start_seconds"] = round(
            wait_ready(child, f"http://127.0.0.1:{http_port}/readyz", START_TIMEOUT_SECONDS), 2
        )
        if pg is not None:
            tables = pg.tables()
            if not tables:
                raise BenchError(
                    f"the collector created no tables in PostgreSQL {pg.isolation} {pg.name} "
                    "(try --pg-isolation database)"
                )
            out["pg_tables_at_start"] = len(tables)

        cfgs = [
            {
                "nodes": part,
                "templates": templates,
                "seed": args.seed * 1000 + w,
                "grpc_port": grpc_port,
                "total_nodes": args.nodes,
                "batch_seconds": args.batch_seconds,
            }
            for w, part in enumerate(split_nodes(args.nodes, args.workers))
        ]
        load = LoadGen("grpc", cfgs)
        monitor = Monitor(child, load.pids, disk, args.disk_every, pg)
        opened = load.wait_all("ready", 60 + args.nodes / 10, monitor.tick_callback())
        out["streams_opened"] = sum(r["opened"] for r in opened)
        t0 = time.time() + 1.0
        end = t0 + args.seconds
        deadline = end + args.drain_seconds
        load.send(("go", t0, end, deadline))
        a_mark, b_mark = t0 + args.warmup_seconds, end
        marks = monitor.run_until(end, [a_mark, b_mark])
        a, b = marks[a_mark], marks[b_mark]
        disk_end_load = disk()
        monitor.disk_samples.append((time.time(), disk_end_load))
        if db == "sqlite":
            out["disk_files_end_of_load"] = dir_size(store_dir)
        results = load.wait_all("result", args.drain_seconds + 60, monitor.tick_callback())
        drained = time.time()
        monitor.run_until(drained + args.settle_seconds, [])
        disk_settled = disk()
        monitor.disk_samples.append((time.time(), disk_settled))
        if db == "sqlite":
            out["disk_files_settled"] = dir_size(store_dir)
        rss_end = monitor.ticks[-1].rss
        stop_rc, stop_seconds = child.stop()
        disk_stopped = sum(dir_size(store_dir).values()) if db == "sqlite" else disk()
        out.update(
            summarize_collector(results, a, b, monitor, pg, disk_end_load, disk_settled, disk_stopped, drained, args)
        )
        out.update(
            {
                "rss_end_mb": round(rss_end / 2**20, 1),
                "stop_exit_status": stop_rc,
                "stop_seconds": round(stop_seconds, 2),
            }
        )
        if db == "sqlite":
            out["disk_files_after_stop"] = dir_size(store_dir)
        warnings = child.log_lines(LOG_PROBLEM)
        out["collector_log_warnings"] = len(warnings)
        out["collector_log_examples"] = [w[:300] for w in warnings[:3]]
        if stop_rc not in (0, None):
            out["error"] = f"the collector exited with status {stop_rc} on SIGTERM"
            out["log_tail"] = child.log_tail()
        else:
            out["ok"] = True
    except Exception as exc:
        out["error"] = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
        if child is not None:
            out["log_tail"] = child.log_tail()
    finally:
        if load is not None:
            load.close()
        if child is not None:
            child.kill()
        if pg is not None:
            try:
                pg.drop()
            except Exception as exc:
                print(f"warning: could not drop PostgreSQL {pg.isolation} {pg.name}: {exc}", file=sys.stderr)
    return out


def summarize_collector(
    results: list[dict[str, Any]],
    a: Tick,
    b: Tick,
    monitor: Monitor,
    pg: PgTarget | None,
    disk_end_load: int,
    disk_settled: int,
    disk_stopped: int,
    drained: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    sched = np.concatenate([r["sched"] for r in results])
    sent = np.concatenate([r["sent"] for r in results])
    acked = np.concatenate([r["acked_at"] for r in results])
    vpb = results[0]["values_per_batch"]
    window = b.t - a.t
    is_acked = ~np.isnan(acked)
    in_window_ack = is_acked & (acked >= a.t) & (acked <= b.t)
    values_window = int(in_window_ack.sum()) * vpb
    cpu = b.cpu - a.cpu
    sent_window = (sent >= a.t) & (sent <= b.t)
    lag = (acked - sent)[sent_window & is_acked]
    delay = (sent - sched)[sent_window]
    load_cpu = [y - x for x, y in zip(a.load_cpu, b.load_cpu)]
    values_by_end = int((is_acked & (acked <= b.t)).sum()) * vpb
    values_total = int(is_acked.sum()) * vpb
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out: dict[str, Any] = {
        "window_seconds": round(window, 1),
        "values_per_batch": vpb,
        "values_acked_window": values_window,
        "values_per_second": round(values_window / window) if window > 0 else None,
        "cpu_seconds_window": round(cpu, 2),
        "cpu_us_per_value": round(cpu / values_window * 1e6, 3) if values_window else None,
        "core_share": round(cpu / window, 3) if window > 0 else None,
        "rss_peak_mb": round(monitor.rss_peak / 2**20, 1),
        "disk_bytes_end_of_load": disk_end_load,
        "disk_bytes_settled": disk_settled,
        "disk_bytes_after_stop": disk_stopped,
        "disk_bytes_peak": max(monitor.disk_peak, disk_end_load, disk_settled),
        "values_acked_by_end_of_load": values_by_end,
        "values_acked_total": values_total,
        "disk_bytes_per_value_end_of_load": round(disk_end_load / values_by_end, 2) if values_by_end else None,
        "disk_bytes_per_value_settled": round(disk_settled / values_total, 2) if values_total else None,
        "ack_lag_p50_s": pct(lag, 50),
        "ack_lag_p99_s": pct(lag, 99),
        "ack_lag_max_s": float(lag.max()) if lag.size else None,
        "batches_sent": int(sent.size),
        "batches_acked": int(is_acked.sum()),
        "batches_lost": int(sent.size - is_acked.sum()),
        "drain_seconds": round(drained - b.t, 1),
        "send_rate_per_second": round(float(sent_window.sum()) / window, 1) if window > 0 else None,
        "send_rate_target": round(args.nodes / max(1, args.batch_seconds), 1),
        "send_delay_p99_s": pct(delay, 99),
        "loadgen_core_share": round(sum(load_cpu) / window, 3) if window > 0 else None,
        "loadgen_core_share_max_worker": round(max(load_cpu) / window, 3) if window > 0 and load_cpu else None,
        "stream_writes": sum(r["writes"] for r in results),
        "reconnects": sum(r["reconnects"] for r in results),
        "stream_errors": errors,
        "stream_error_examples": [e for r in results for e in r["error_examples"]][:5],
    }
    for k in ("ack_lag_p50_s", "ack_lag_p99_s", "ack_lag_max_s", "send_delay_p99_s"):
        if out[k] is not None:
            out[k] = round(out[k], 3)
    mine = aux = 0.0
    if pg is not None:
        mine = monitor.pg_mine.between(a.t, b.t)
        aux = monitor.pg_aux.between(a.t, b.t)
        out["pg_backend_cpu_seconds_window"] = round(mine, 2)
        out["pg_backend_core_share"] = round(mine / window, 3) if window > 0 else None
        out["pg_aux_core_share"] = round(aux / window, 3) if window > 0 else None
        if values_window:
            out["cpu_us_per_value_with_pg_backends"] = round((cpu + mine) / values_window * 1e6, 3)
    out["other_load_core_share"] = round(other_load(a, b, cpu + sum(load_cpu) + mine + aux), 3)
    return out


# -- the Prometheus phase -------------------------------------------------------------------------


def prom_counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def prom_query(port: int, query: str, at: float) -> float | None:
    qs = urllib.parse.urlencode({"query": query, "time": f"{at:.3f}"})
    with contextlib.suppress(Exception):
        status, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?{qs}", timeout=30)
        data = json.loads(body)
        if status == 200 and data["data"]["result"]:
            return float(data["data"]["result"][0]["value"][1])
    return None


def tsdb_size(path: Path) -> dict[str, int]:
    parts = dir_size(path)
    out = {"wal": parts.pop("wal", 0), "chunks_head": parts.pop("chunks_head", 0)}
    out["blocks"] = sum(v for k, v in parts.items() if len(k) == 26 and k.isalnum())
    out["other"] = sum(v for k, v in parts.items() if not (len(k) == 26 and k.isalnum()))
    return out


def run_prometheus(args: argparse.Namespace, templates: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    binary = shutil.which("prometheus")
    out: dict[str, Any] = {"label": "Prometheus", "ok": False}
    work = tmp / "prometheus"
    work.mkdir()
    cfgs = [
        {"nodes": part, "templates": templates, "seed": args.seed * 1000 + w, "gzip_level": 1}
        for w, part in enumerate(split_nodes(args.nodes, args.workers))
    ]
    tsdb = work / "tsdb"
    assert binary is not None
    child = Child("prometheus", [], work / "prometheus.log")
    load: LoadGen | None = None
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        words = (version.stdout or version.stderr).split()
        out["version"] = words[2] if len(words) > 2 and words[1] == "version" else " ".join(words[:3])
        load = LoadGen("prom", cfgs)
        ready = load.wait_all("ready", 120, lambda: None)
        series_per_target = ready[0]["series_per_node"]
        # One target per node, each on its own port, labelled with the node's name.
        targets = [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"instance": node}}
            for r in ready
            for node, port in sorted(r["targets"].items())
        ]
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1m"},
            "scrape_configs": [{"job_name": "fleet", "static_configs": targets}],
        }
        (work / "prometheus.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
        web_port = free_port()  # only now: the exporters' ports are taken
        child.cmd = [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={tsdb}",
            f"--web.listen-address=127.0.0.1:{web_port}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
        ]
        child.start()
        out["start_seconds"] = round(
            wait_ready(child, f"http://127.0.0.1:{web_port}/-/ready", START_TIMEOUT_SECONDS), 2
        )
        monitor = Monitor(child, load.pids, lambda: sum(tsdb_size(tsdb).values()), args.disk_every)
        t0 = time.time()
        a_mark, b_mark = t0 + args.warmup_seconds, t0 + args.seconds

        own_metrics: dict[float, str] = {}

        def read_own_metrics(mark: float) -> None:
            # Right after the tick that read its CPU: the two readings are milliseconds apart.
            own_metrics[mark] = http_get(f"http://127.0.0.1:{web_port}/metrics", timeout=10)[1].decode()

        marks = monitor.run_until(b_mark, [a_mark, b_mark], read_own_metrics)
        a, b = marks[a_mark], marks[b_mark]
        disk_b = tsdb_size(tsdb)
        metrics_b = own_metrics[b_mark]
        appended_a = prom_counter(own_metrics[a_mark], "prometheus_tsdb_head_samples_appended_total")
        appended_b = prom_counter(metrics_b, "prometheus_tsdb_head_samples_appended_total")
        samples_window = appended_b - appended_a
        window = b.t - a.t
        # Scrapes of the window: a range of whole seconds, so each target scraped every second
        # has exactly that many points in it; it ends 2 s before B, when the scrapes in flight
        # at B have surely been appended.
        span_seconds = max(1, int(window) - 2)
        span, at = f"{span_seconds}s", b.t - 2
        scrapes = prom_query(web_port, f'sum(count_over_time(up{{job="fleet"}}[{span}]))', at)
        scrapes_ok = prom_query(web_port, f'sum(sum_over_time(up{{job="fleet"}}[{span}]))', at)
        duration = {
            q: prom_query(web_port, f'{q}({q}_over_time(scrape_duration_seconds{{job="fleet"}}[{span}]))', at)
            for q in ("avg", "max")
        }
        rss_end = monitor.ticks[-1].rss
        stop_rc, stop_seconds = child.stop()
        disk_stopped = tsdb_size(tsdb)
        load.send(("stop",))
        served = load.wait_all("result", 30, lambda: None)
        cpu = b.cpu - a.cpu
        load_cpu = [y - x for x, y in zip(a.load_cpu, b.load_cpu)]
        # WAL + chunks_head + blocks; "other" is the lock and the fixed-size queries.active file.
        total_disk = disk_b["wal"] + disk_b["chunks_head"] + disk_b["blocks"]
        total_stopped = disk_stopped["wal"] + disk_stopped["chunks_head"] + disk_stopped["blocks"]
        out.update(
            {
                "ok": stop_rc in (0, None),
                "window_seconds": round(window, 1),
                "series_per_target": series_per_target,
                "samples_appended_total": int(appended_b),
                "samples_appended_window": int(samples_window),
                "head_series": int(prom_counter(metrics_b, "prometheus_tsdb_head_series")),
                "cpu_seconds_window": round(cpu, 2),
                "cpu_us_per_value": round(cpu / samples_window * 1e6, 3) if samples_window else None,
                "core_share": round(cpu / window, 3),
                "rss_end_mb": round(rss_end / 2**20, 1),
                "rss_peak_mb": round(monitor.rss_peak / 2**20, 1),
                "disk_end_of_load": disk_b,
                "disk_after_stop": disk_stopped,
                "disk_bytes_end_of_load": total_disk,
                "disk_bytes_after_stop": total_stopped,
                "disk_bytes_per_value_end_of_load": round(total_disk / appended_b, 2) if appended_b else None,
                "disk_bytes_per_value_settled": round(total_stopped / appended_b, 2) if appended_b else None,
                "disk_bytes_per_sample_documented": PROM_DOC_BYTES_PER_SAMPLE,
                "scrapes_expected_window": span_seconds * args.nodes,
                "scrapes_window": int(scrapes or 0),
                "scrapes_ok_window": int(scrapes_ok or 0),
                "scrape_interval_p99_s": prom_quantile(metrics_b, "0.99"),
                "scrape_duration_avg_s": round(duration["avg"], 4) if duration["avg"] is not None else None,
                "scrape_duration_max_s": round(duration["max"], 3) if duration["max"] is not None else None,
                "loadgen_core_share": round(sum(load_cpu) / window, 3),
                "loadgen_core_share_max_worker": round(max(load_cpu) / window, 3),
                "other_load_core_share": round(other_load(a, b, cpu + sum(load_cpu)), 3),
                "exporter_scrapes_served": sum(s["scrapes"] for s in served),
                "exporter_bytes_per_scrape": round(
                    sum(s["bytes"] for s in served) / max(1, sum(s["scrapes"] for s in served))
                ),
                "stop_exit_status": stop_rc,
                "stop_seconds": round(stop_seconds, 2),
            }
        )
    except Exception as exc:
        out["error"] = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
        out["log_tail"] = child.log_tail()
    finally:
        if load is not None:
            load.close()
        child.kill()
    return out


def prom_quantile(text: str, quantile: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("prometheus_target_interval_length_seconds{") and f'quantile="{quantile}"' in line:
            with contextlib.suppress(ValueError):
                value = float(line.rsplit(" ", 1)[1])
                return None if math.isnan(value) else round(value, 3)
    return None


# -- output ---------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def render(phases: list[dict[str, Any]], args: argparse.Namespace) -> str:
    prom = next((p for p in phases if p["label"] == "Prometheus" and p.get("ok")), None)
    base = prom.get("cpu_us_per_value") if prom else None
    head = (
        f"{'':22} {'CPU/value':>10} {'vs Prom':>8} {'core':>6} {'RSS MB':>13} {'disk B/value':>15} "
        f"{'ack lag s p50/p99/max':>22} {'lost':>5}"
    )
    sub = f"{'':22} {'us':>10} {'':>8} {'share':>6} {'end/peak':>13} {'load/settled':>15} {'':>22} {'':>5}"
    lines = [
        f"collector_fleet: {args.nodes} nodes x {args.gpus} GPUs at 1 Hz, {args.seconds:.0f} s "
        f"(steady window after {args.warmup_seconds:.0f} s), settle {args.settle_seconds:.0f} s",
        head,
        sub,
    ]
    for p in phases:
        if not p.get("ok") and "cpu_us_per_value" not in p:
            lines.append(f"{p['label']:22} FAILED: {p.get('error', 'unknown')}")
            continue
        ratio = (
            "1.00x"
            if p is prom
            else (f"{p['cpu_us_per_value'] / base:.1f}x" if base and p.get("cpu_us_per_value") else "-")
        )
        lag = (
            "-"
            if p is prom
            else f"{_f(p.get('ack_lag_p50_s'))}/{_f(p.get('ack_lag_p99_s'))}/{_f(p.get('ack_lag_max_s'))}"
        )
        lost = "-" if p is prom else str(p.get("batches_lost"))
        lines.append(
            f"{p['label']:22} {_f(p.get('cpu_us_per_value')):>10} {ratio:>8} {_f(p.get('core_share')):>6} "
            f"{_f(p.get('rss_end_mb'), '{:.0f}') + '/' + _f(p.get('rss_peak_mb'), '{:.0f}'):>13} "
            f"{_f(p.get('disk_bytes_per_value_end_of_load'), '{:.1f}') + '/' + _f(p.get('disk_bytes_per_value_settled'), '{:.1f}'):>15} "
            f"{lag:>22} {lost:>5}"
        )
    lines.append("")
    for p in phases:
        if "cpu_us_per_value" not in p:
            continue
        if p["label"] == "Prometheus":
            d = p["disk_end_of_load"]
            lines.append(
                f"Prometheus ({p.get('version', '?')}): {p['samples_appended_window']:,} samples in the window "
                f"({p['series_per_target']}+{PROM_SCRAPE_SERIES_PER_TARGET} a scrape), scrapes ok "
                f"{p['scrapes_ok_window']:,}/{p['scrapes_expected_window']:,} ({p['scrapes_window']:,} tried), scrape interval p99 "
                f"{_f(p['scrape_interval_p99_s'], '{:.3f}')} s, scrape duration avg/max "
                f"{_f(p['scrape_duration_avg_s'], '{:.4f}')}/{_f(p['scrape_duration_max_s'], '{:.3f}')} s; TSDB at end of load {p['disk_bytes_end_of_load'] / 2**20:.1f} MiB "
                f"(wal {d['wal'] / 2**20:.1f}, chunks_head {d['chunks_head'] / 2**20:.1f}, blocks {d['blocks'] / 2**20:.1f}), "
                f"after stop {p['disk_bytes_after_stop'] / 2**20:.1f} MiB; documented once compacted into blocks: "
                f"{PROM_DOC_BYTES_PER_SAMPLE} B/sample (the WAL is larger); exporter load "
                f"{p['loadgen_core_share']:.2f} of a core; other processes on the machine "
                f"{p['other_load_core_share']:.2f} of a core"
            )
            continue
        extra = ""
        if "pg_backend_core_share" in p:
            extra = (
                f"; PostgreSQL backends serving it {p['pg_backend_core_share']:.2f} of a core "
                f"(with them {_f(p.get('cpu_us_per_value_with_pg_backends'))} us/value), "
                f"WAL writer/checkpointer/bgwriter {_f(p.get('pg_aux_core_share'))}"
            )
        lines.append(
            f"{p['label']}: {p['values_acked_window']:,} values acked in the window ({p['values_per_second']:,}/s, "
            f"{p['values_per_batch']} a batch); batches sent {p['batches_sent']:,}, acked {p['batches_acked']:,}, "
            f"lost {p['batches_lost']} (drain {p['drain_seconds']} s); send rate {p['send_rate_per_second']}/s "
            f"of {p['send_rate_target']}/s target, send delay p99 {_f(p['send_delay_p99_s'], '{:.3f}')} s; "
            f"load generator {p['loadgen_core_share']:.2f} of a core (busiest worker {p['loadgen_core_share_max_worker']:.2f}); "
            f"disk at end of load {p['disk_bytes_end_of_load'] / 2**20:.1f} MiB, after settle "
            f"{p['disk_bytes_settled'] / 2**20:.1f} MiB, peak {p['disk_bytes_peak'] / 2**20:.1f} MiB, after stop "
            f"{p['disk_bytes_after_stop'] / 2**20:.1f} MiB; stop {p['stop_seconds']} s (status {p['stop_exit_status']}); "
            f"reconnects {p['reconnects']}, stream errors {p['stream_errors'] or 0}, log warnings {p['collector_log_warnings']}"
            f"{extra}; other processes on the machine {p['other_load_core_share']:.2f} of a core"
        )
    busy = [p["label"] for p in phases if (p.get("other_load_core_share") or 0) > OTHER_LOAD_WARN]
    if busy:
        lines.append(
            f"WARNING: other processes used more than {OTHER_LOAD_WARN} of a core during {', '.join(busy)}: "
            "CPU/value holds up, latencies and missed scrapes do not; rerun on a quiet machine"
        )
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=300, help="simulated nodes, one stream/target each [300]")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node [8]")
    parser.add_argument("--seconds", type=float, default=180, help="load duration of each phase [180]")
    parser.add_argument("--warmup-seconds", type=float, default=20, help="skipped at the start of the load [20]")
    parser.add_argument(
        "--settle-seconds", type=float, default=15, help="idle collector before the final disk size [15]"
    )
    parser.add_argument("--drain-seconds", type=float, default=60, help="longest wait for the last acks [60]")
    parser.add_argument("--databases", default="sqlite,postgres", help="collector phases: sqlite,postgres")
    parser.add_argument("--no-prometheus", action="store_true", help="skip the Prometheus phase")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories (and print where)")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes [2]")
    parser.add_argument("--disk-every", type=float, default=3.0, help="seconds between disk-size samples [3]")
    parser.add_argument(
        "--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server and database to make the run's schema in"
    )
    parser.add_argument(
        "--pg-isolation",
        choices=("schema", "database"),
        default="schema",
        help="a schema made for the run (search_path in the URL) or a database [schema]",
    )
    parser.add_argument(
        "--batch-seconds",
        type=int,
        default=10,
        help="sampling cycles per batch, the agent's batch_interval_seconds at 1 Hz: the dense form "
        "(GpuColumns) the agent sends since 0.2; 0: fleetwatch 0.1.0's one Batch of GpuSamples a second [10]",
    )
    parser.add_argument("--collector-log-level", default="warning")
    parser.add_argument(
        "--collector-arg",
        action="append",
        default=[],
        help="one more argument for fleetwatch-collector (repeatable), e.g. --collector-arg=--detect-interval-seconds=2",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.warmup_seconds >= args.seconds:
        parser.error("--warmup-seconds must be shorter than --seconds")
    if args.nodes < 1 or args.gpus < 1:
        parser.error("--nodes and --gpus must be at least 1")
    args.databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    for d in args.databases:
        if d not in ("sqlite", "postgres"):
            parser.error(f"--databases: unknown {d!r} (sqlite, postgres)")
    return args


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    # SIGTERM runs the same clean-up as Ctrl-C.
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fleetwatch-bench-"))
    phases: list[dict[str, Any]] = []
    try:
        with terminate_as_interrupt():
            templates = fleet_load.build_templates(TEMPLATES, args.gpus)
            if args.no_prometheus:
                print("prometheus: skipped (--no-prometheus)", flush=True)
            elif shutil.which("prometheus") is None:
                print(
                    "prometheus: skipped, no `prometheus` on PATH "
                    "(install it: apt-get install -y prometheus, or `make bench` does)",
                    flush=True,
                )
            else:
                print(f"prometheus: {args.nodes} targets for {args.seconds:.0f} s ...", flush=True)
                phases.append(run_prometheus(args, templates, tmp))
            for db in args.databases:
                print(f"{db}: {args.nodes} streams for {args.seconds:.0f} s ...", flush=True)
                phases.append(run_collector(db, args, templates, tmp))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(render(phases, args))
    for p in phases:
        if p.get("error"):
            print(f"\n{p['label']} FAILED: {p['error']}\n--- log tail ---\n{p.get('log_tail', '')}", file=sys.stderr)
    report = {
        "benchmark": "collector_fleet",
        "nodes": args.nodes,
        "gpus": args.gpus,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup_seconds,
        "settle_seconds": args.settle_seconds,
        "phases": {p["label"]: {k: v for k, v in p.items() if k not in ("label", "log_tail")} for p in phases},
    }
    print(json.dumps(report, sort_keys=True))
    failed = [p["label"] for p in phases if not p.get("ok")]
    lost = [p["label"] for p in phases if p.get("batches_lost")]
    if lost:
        print(f"batches lost in: {', '.join(lost)}", file=sys.stderr)
    return 1 if failed or lost else 0


if __name__ == "__main__":
    sys.exit(main())
