"""Tests for step reports: the training-side reporter and the agent's receiver, on real sockets."""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetwatch import stepreport
from fleetwatch.agent.sources.steps import MAX_DATAGRAM_BYTES, StepReceiver, parse_step
from fleetwatch.stepreport import StepReporter, report_step

STEPREPORT_FILE = Path(stepreport.__file__)
FIXED_T = 1_700_000_000.0
LAUNCHER_ENV = (
    "FLEETWATCH_JOB",
    "SLURM_JOB_ID",
    "TORCHELASTIC_RUN_ID",
    "RANK",
    "SLURM_PROCID",
    "OMPI_COMM_WORLD_RANK",
    "FLEETWATCH_STEP_SOCKET",
    *stepreport.COORDINATE_ENV_VARS.values(),
)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Not tmp_path: a Unix socket path must fit in 108 bytes, and pytest's can be longer.
    directory = Path(tempfile.mkdtemp(prefix="fw-steps-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite may itself run under Slurm or torchrun.
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def receiver(socket_dir: Path) -> Iterator[StepReceiver]:
    r = StepReceiver(str(socket_dir / "run" / "steps.sock"), clock=lambda: FIXED_T)
    r.open()
    yield r
    r.close()


def send_raw(path: str, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)  # a test must fail, not hang, if the receiver's queue is full
        for d in datagrams:
            s.sendto(d, path)


def send_all_and_receive(receiver: StepReceiver, datagrams: list[bytes]) -> list[dict[str, object]]:
    """Send every datagram, receiving whenever the kernel's queue is full; all records received.

    The queue holds net.unix.max_dgram_qlen datagrams: 10 on a stock kernel, 512 on some distros.
    """
    records: list[dict[str, object]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        s.setblocking(False)
        for d in datagrams:
            for _ in range(100):
                try:
                    s.sendto(d, receiver.socket_path)
                    break
                except BlockingIOError:
                    records += receiver.receive(0.1)
            else:
                raise AssertionError("the receiver never made room")
    return records + receiver.receive(0.1)


def good(step: int = 1, **override: object) -> bytes:
    report = {"job": "j7", "rank": 3, "step": step, "seconds": 0.5} | override
    return json.dumps(report).encode()


# -- round trip ------------------------------------------------------------------------------


def test_round_trip(receiver: StepReceiver) -> None:
    with StepReporter(job="j7", rank=6, socket_path=receiver.socket_path) as reporter:
        reporter.report(1811, 0.93)
        reporter.report(1812, 1)  # an int number of seconds is fine
        records = receiver.receive(1.0)
    assert records == [
        {"t": FIXED_T, "job": "j7", "rank": 6, "step": 1811, "seconds": 0.93},
        {"t": FIXED_T, "job": "j7", "rank": 6, "step": 1812, "seconds": 1.0},
    ]
    assert reporter.dropped == 0 and reporter.invalid == 0
    assert type(records[1]["seconds"]) is float


def test_round_trip_of_largest_job_and_numbers(receiver: StepReceiver) -> None:
    job = "é" * 128  # two bytes each in UTF-8
    with StepReporter(job=job, rank=1_000_000, socket_path=receiver.socket_path) as reporter:
        reporter.report(2**63 - 1, 86_399.999_999_999)
        reporter.report(0, 5e-324)
    assert [(r["job"], r["rank"], r["step"], r["seconds"]) for r in receiver.receive(1.0)] == [
        (job, 1_000_000, 2**63 - 1, 86_399.999_999_999),
        (job, 1_000_000, 0, 5e-324),
    ]


def test_parallel_coordinates_and_wall_time_round_trip(receiver: StepReceiver) -> None:
    with StepReporter(
        job="j7", rank=13, socket_path=receiver.socket_path, dp_rank=1, pp_stage=3, tp_rank=0
    ) as reporter:
        reporter.report(1811, 0.9, wall_seconds=1.25)
        reporter.report(1812, 0.9)  # the wall time is per report: this one has none
    assert receiver.receive(1.0) == [
        {
            "t": FIXED_T,
            "job": "j7",
            "rank": 13,
            "step": 1811,
            "seconds": 0.9,
            "dp_rank": 1,
            "pp_stage": 3,
            "tp_rank": 0,
            "wall_seconds": 1.25,
        },
        {
            "t": FIXED_T,
            "job": "j7",
            "rank": 13,
            "step": 1812,
            "seconds": 0.9,
            "dp_rank": 1,
            "pp_stage": 3,
            "tp_rank": 0,
        },
    ]


def test_largest_report_with_every_optional_key_fits_the_datagram(receiver: StepReceiver) -> None:
    job = "é" * 128
    top = 1_000_000
    with StepReporter(job=job, rank=top, socket_path=receiver.socket_path, dp_rank=top, pp_stage=top, tp_rank=top) as r:
        r.report(2**63 - 1, 86_399.999_999_999, wall_seconds=86_399.999_999_999)
    assert r.dropped == 0 and r.invalid == 0
    (record,) = receiver.receive(1.0)
    assert (record["job"], record["tp_rank"], record["wall_seconds"]) == (job, top, 86_399.999_999_999)


def test_coordinates_from_the_environment(monkeypatch: pytest.MonkeyPatch, receiver: StepReceiver) -> None:
    monkeypatch.setenv("FLEETWATCH_DP_RANK", "3")
    monkeypatch.setenv("FLEETWATCH_PP_STAGE", " 1 ")
    monkeypatch.setenv("FLEETWATCH_TP_RANK", "two")  # not a number: ignored, like a bad RANK
    with StepReporter(job="j", rank=0, socket_path=receiver.socket_path) as reporter:
        assert reporter.coordinates == {"dp_rank": 3, "pp_stage": 1}
        reporter.report(1, 0.5)
    (record,) = receiver.receive(1.0)
    assert (record["dp_rank"], record["pp_stage"], "tp_rank" in record) == (3, 1, False)
    # An explicit argument wins over the environment.
    assert StepReporter(job="j", rank=0, socket_path="/nonexistent/s", pp_stage=0).coordinates["pp_stage"] == 0


@pytest.mark.parametrize("name", ["dp_rank", "pp_stage", "tp_rank"])
@pytest.mark.parametrize("value", [-1, 1_000_001, True, 1.0, "1"])
def test_reporter_refuses_a_bad_coordinate_at_construction(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        StepReporter(job="j", rank=0, socket_path="/nonexistent/steps.sock", **{name: value})  # type: ignore[arg-type]


def test_reporter_refuses_a_bad_wall_time_without_raising(receiver: StepReceiver) -> None:
    with StepReporter(job="j", rank=0, socket_path=receiver.socket_path) as reporter:
        for wall in (0.0, -1.0, float("nan"), float("inf"), 86_400.0, "slow"):
            reporter.report(1, 0.5, wall_seconds=wall)  # type: ignore[arg-type]
        reporter.report(2, 0.5, wall_seconds=0.75)
    assert reporter.invalid == 6
    assert [(r["step"], r["wall_seconds"]) for r in receiver.receive(1.0)] == [(2, 0.75)]


@pytest.mark.parametrize(
    "extra",
    [
        {"dp_rank": -1},
        {"pp_stage": 1_000_001},
        {"tp_rank": True},
        {"dp_rank": 1.5},
        {"pp_stage": "2"},
        {"wall_seconds": 0},
        {"wall_seconds": -0.5},
        {"wall_seconds": 86_400},
        {"wall_seconds": "1.0"},
        {"wall_seconds": True},
    ],
)
def test_parse_step_refuses_bad_optional_keys(extra: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(extra))):
        parse_step(good(**extra))


def test_parse_step_takes_null_optional_keys_as_absent() -> None:
    assert parse_step(good(dp_rank=None, wall_seconds=None)) == {"job": "j7", "rank": 3, "step": 1, "seconds": 0.5}


def test_socket_and_directory_permissions(receiver: StepReceiver) -> None:
    # Training processes of any user must be able to reach and write the socket.
    assert stat.S_IMODE(os.stat(receiver.socket_path).st_mode) == 0o666
    assert stat.S_IMODE(os.stat(os.path.dirname(receiver.socket_path)).st_mode) == 0o755
    assert stat.S_ISSOCK(os.stat(receiver.socket_path).st_mode)


def test_receive_waits_up_to_the_timeout_and_no_longer(receiver: StepReceiver) -> None:
    started = time.monotonic()
    assert receiver.receive(0.05) == []
    assert 0.04 <= time.monotonic() - started < 1.0
    assert receiver.receive(0) == []


def test_fileno_is_the_bound_socket(receiver: StepReceiver) -> None:
    send_raw(receiver.socket_path, good())
    readable, _, _ = select.select([receiver.fileno()], [], [], 1.0)
    assert readable == [receiver.fileno()]


# -- no agent, busy agent ----------------------------------------------------------------------


def test_no_agent_is_silent_fast_and_counted(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fleetwatch.stepreport")
    reporter = StepReporter(job="j", rank=0, socket_path=str(socket_dir / "absent" / "steps.sock"))
    started = time.thread_time()  # CPU time: the suite's other workers share the cores
    for step in range(1000):
        reporter.report(step, 0.1)
    elapsed_seconds = time.thread_time() - started
    reporter.close()
    assert elapsed_seconds < 0.010
    assert reporter.dropped == 1000
    assert reporter.invalid == 0
    # One debug line at most: a node without an agent is normal, not worth a training log line.
    records = [r for r in caplog.records if r.name == "fleetwatch.stepreport"]
    assert len(records) <= 1 and all(r.levelno == logging.DEBUG for r in records)


def test_no_agent_every_report_tries_again_without_the_backoff(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The backoff only skips the system call; with it off every report still fails fast.
    monkeypatch.setattr(stepreport, "NO_RECEIVER_RETRY_SECONDS", 0.0)
    reporter = StepReporter(job="j", rank=0, socket_path=str(socket_dir / "steps.sock"))
    started = time.thread_time()  # CPU time: the suite's other workers share the cores
    for step in range(1000):
        reporter.report(step, 0.1)
    assert time.thread_time() - started < 0.050
    assert reporter.dropped == 1000
    reporter.close()


def test_stale_socket_with_nobody_bound_is_dropped_not_raised(socket_dir: Path) -> None:
    path = str(socket_dir / "steps.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.close()  # the file stays: ECONNREFUSED on send
    with StepReporter(job="j", rank=0, socket_path=path) as reporter:
        reporter.report(0, 0.1)
    assert reporter.dropped == 1


def test_agent_started_later_is_picked_up(socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stepreport, "NO_RECEIVER_RETRY_SECONDS", 0.0)
    path = str(socket_dir / "steps.sock")
    reporter = StepReporter(job="j", rank=2, socket_path=path)
    reporter.report(0, 0.1)
    assert reporter.dropped == 1
    receiver = StepReceiver(path)
    receiver.open()
    try:
        reporter.report(1, 0.2)
        assert [r["step"] for r in receiver.receive(1.0)] == [1]
        # An agent restart: a new socket at the same path, which a connect()ed sender would miss.
        receiver.close()
        reporter.report(2, 0.2)
        receiver = StepReceiver(path)
        receiver.open()
        reporter.report(3, 0.2)
        assert [r["step"] for r in receiver.receive(1.0)] == [3]
    finally:
        receiver.close()
        reporter.close()
    assert reporter.dropped == 2


def test_full_receiver_does_not_block_the_reporter(receiver: StepReceiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fleetwatch.stepreport")
    reporter = StepReporter(job="j", rank=0, socket_path=receiver.socket_path)
    # Fill the receiver's queue by never receiving, until the kernel refuses more.
    sent = 0
    while reporter.dropped == 0 and sent < 1_000_000:
        reporter.report(sent, 0.1)
        sent += 1
    assert reporter.dropped == 1
    started = time.thread_time()  # CPU time: the suite's other workers share the cores
    for step in range(1000):
        reporter.report(sent + step, 0.1)
    elapsed_seconds = time.thread_time() - started
    assert elapsed_seconds < 0.050
    assert reporter.dropped == 1001
    # Whatever was queued is intact and in order.
    queued = sent - 1
    steps = [r["step"] for r in receiver.receive(1.0)]
    assert steps == list(range(queued))
    reporter.close()
    # An agent a moment behind is normal: one debug line, nothing in the training log.
    records = [r for r in caplog.records if r.name == "fleetwatch.stepreport"]
    assert [r.levelno for r in records] == [logging.DEBUG]


def test_a_set_up_problem_warns_once(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A stream socket at the path (EPROTOTYPE) is a misconfiguration, not a missing agent.
    path = str(socket_dir / "steps.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wrong_kind:
        wrong_kind.bind(path)
        wrong_kind.listen()
        with StepReporter(job="j", rank=0, socket_path=path) as reporter:
            for step in range(100):
                reporter.report(step, 0.1)
    assert reporter.dropped == 100
    records = [r for r in caplog.records if r.name == "fleetwatch.stepreport"]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert path in records[0].getMessage()


def test_receiver_bounds_one_call(socket_dir: Path) -> None:
    receiver = StepReceiver(str(socket_dir / "steps.sock"), max_queued=3)
    receiver.open()
    try:
        send_raw(receiver.socket_path, *(good(step) for step in range(5)))
        assert [r["step"] for r in receiver.receive(1.0)] == [0, 1, 2]
        assert receiver.dropped == 2
        assert receiver.receive(0) == []
    finally:
        receiver.close()


# -- validation --------------------------------------------------------------------------------

MALFORMED = [
    b"",
    b"\xff\xfe\x00garbage",
    b"not json",
    b"[1, 2, 3]",
    b'"j7"',
    b"[" * 400 + b"]" * 400,
    b'{"job": "j7", "rank": 3, "step": 1}',
    good(job=7),
    good(job=""),
    good(job="x" * 129),
    # Control characters the collector would refuse: a NUL (PostgreSQL text cannot hold it), a
    # newline that forges log lines, an escape, a bidirectional override.
    good(job="j7\u0000"),
    good(job="j7\nERROR forged line"),
    good(job="\u001b[31mred"),
    good(job="j\u202e7"),
    good(rank="3"),
    good(rank=True),
    good(rank=1.0),
    good(rank=-1),
    good(rank=1_000_001),
    good(step=-1),
    good(step=1.5),
    good(step=2**63),
    good(seconds="0.5"),
    good(seconds=None),
    good(seconds=0),
    good(seconds=-0.5),
    good(seconds=86_400),
    b'{"job": "j7", "rank": 3, "step": 1, "seconds": NaN}',
    b'{"job": "j7", "rank": 3, "step": 1, "seconds": Infinity}',
    b'{"job": "j7", "rank": 3, "step": 1, "seconds": 1e400}',
    b'{"job": "j7", "rank": 3, "step": 1, "seconds": 1' + b"0" * 400 + b"}",
    good(job="x" * 100, pad="y" * 400),  # valid fields, but over the size bound
    good(pad="y" * 70_000),  # far over: the kernel truncates it to what we read
]


def test_malformed_datagrams_are_counted_and_skipped(receiver: StepReceiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fleetwatch.agent.sources.steps")
    records = send_all_and_receive(receiver, [*MALFORMED, good(42, extra="ignored")])
    assert records == [{"t": FIXED_T, "job": "j7", "rank": 3, "step": 42, "seconds": 0.5}]
    assert receiver.malformed == len(MALFORMED)
    # Rate limited: one line however many bad datagrams arrived in the minute.
    warnings = [r for r in caplog.records if r.name == "fleetwatch.agent.sources.steps"]
    assert len(warnings) == 1
    assert "malformed" in warnings[0].getMessage()


@pytest.mark.parametrize("datagram", MALFORMED[:-1])
def test_parse_step_refuses(datagram: bytes) -> None:
    with pytest.raises(ValueError):
        parse_step(datagram)


def test_parse_step_bound_matches_the_reporter() -> None:
    assert MAX_DATAGRAM_BYTES == stepreport.MAX_DATAGRAM_BYTES


def test_reporter_refuses_bad_values_without_raising(receiver: StepReceiver) -> None:
    class Broken:
        def __float__(self) -> float:
            raise RuntimeError("a tensor on a lost GPU")

    with StepReporter(job="j", rank=0, socket_path=receiver.socket_path) as reporter:
        for step, seconds in [
            (-1, 0.1),
            (1.5, 0.1),
            ("1", 0.1),
            (None, 0.1),
            (2**63, 0.1),
            (1, float("nan")),
            (1, float("inf")),
            (1, 0.0),
            (1, -1.0),
            (1, 86_400.0),
            (1, "fast"),
            (1, Broken()),
        ]:
            reporter.report(step, seconds)  # type: ignore[arg-type]
        reporter.report(7, 0.25)
    assert reporter.invalid == 12
    assert reporter.dropped == 0
    assert [r["step"] for r in receiver.receive(1.0)] == [7]


@pytest.mark.parametrize(
    ("job", "rank"),
    [
        ("", 0),
        ("x" * 129, 0),
        (7, 0),
        ("😀" * 128, 0),
        ("j\x00", 0),
        ("j\n", 0),
        ("j", -1),
        ("j", 1_000_001),
        ("j", True),
        ("j", 1.0),
    ],
)
def test_reporter_refuses_bad_identity_at_construction(job: object, rank: object) -> None:
    with pytest.raises(ValueError):
        StepReporter(job=job, rank=rank, socket_path="/nonexistent/steps.sock")  # type: ignore[arg-type]


# -- the context manager -------------------------------------------------------------------------


def test_step_context_manager_times_and_counts(receiver: StepReceiver) -> None:
    with StepReporter(job="j", rank=0, socket_path=receiver.socket_path) as reporter:
        numbers = []
        for _ in range(3):
            with reporter.step() as number:
                time.sleep(0.01)
            numbers.append(number)
        with reporter.step(100):  # resumed from a checkpoint
            pass
        with pytest.raises(RuntimeError), reporter.step():
            raise RuntimeError("out of memory")
        with reporter.step():
            pass
    records = receiver.receive(1.0)
    assert numbers == [0, 1, 2]
    # The failed step 101 is not reported, but its number is used up.
    assert [r["step"] for r in records] == [0, 1, 2, 100, 102]
    assert all(0.01 <= r["seconds"] < 1.0 for r in records[:3])
    assert all(0 < r["seconds"] < 0.01 for r in records[3:])


# -- defaults from the environment -----------------------------------------------------------------


def test_defaults_from_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "5")
    reporter = StepReporter()
    assert (reporter.job, reporter.rank) == ("4242", 5)
    assert reporter.socket_path == stepreport.DEFAULT_SOCKET == "/run/fleetwatch/steps.sock"
    reporter.close()


def test_defaults_from_torchrun_under_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    # srun starts one torchrun per node (SLURM_PROCID numbers those); RANK is the training rank.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv-9")
    monkeypatch.setenv("RANK", "13")
    reporter = StepReporter()
    assert (reporter.job, reporter.rank) == ("4242", 13)
    reporter.close()


def test_defaults_from_torchrun_and_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv-9")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    reporter = StepReporter()
    assert (reporter.job, reporter.rank) == ("rdzv-9", 3)
    reporter.close()


def test_explicit_env_and_arguments_override(monkeypatch: pytest.MonkeyPatch, socket_dir: Path) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("FLEETWATCH_JOB", "pretrain-70b")
    monkeypatch.setenv("RANK", "not-a-number")  # skipped, not fatal
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("FLEETWATCH_STEP_SOCKET", str(socket_dir / "env.sock"))
    reporter = StepReporter()
    assert (reporter.job, reporter.rank, reporter.socket_path) == ("pretrain-70b", 2, str(socket_dir / "env.sock"))
    reporter.close()
    reporter = StepReporter(job="mine", rank=9, socket_path=str(socket_dir / "arg.sock"))
    assert (reporter.job, reporter.rank, reporter.socket_path) == ("mine", 9, str(socket_dir / "arg.sock"))
    reporter.close()


def test_defaults_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's value when no --rdzv-id is given
    reporter = StepReporter()
    assert reporter.job == f"{socket.gethostname()}-{os.getppid()}"
    assert reporter.rank == 0
    reporter.close()


def test_report_step_uses_a_default_reporter(monkeypatch: pytest.MonkeyPatch, receiver: StepReceiver) -> None:
    monkeypatch.setattr(stepreport, "_default_reporter", None)
    monkeypatch.setenv("FLEETWATCH_STEP_SOCKET", receiver.socket_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "4")
    report_step(10, 0.5)
    report_step(11, 0.5)
    default = stepreport._default_reporter
    assert default is not None
    default.close()
    assert [(r["job"], r["rank"], r["step"]) for r in receiver.receive(1.0)] == [("77", 4, 10), ("77", 4, 11)]


# -- the socket file -----------------------------------------------------------------------------


def test_stale_socket_file_is_replaced_on_open(socket_dir: Path) -> None:
    path = str(socket_dir / "steps.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(path)
    stale.close()  # as a killed agent leaves it
    os.chmod(path, 0o600)
    receiver = StepReceiver(path)
    receiver.open()  # bind() on the old file would fail with EADDRINUSE
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        send_raw(path, good(5))
        assert [r["step"] for r in receiver.receive(1.0)] == [5]
    finally:
        receiver.close()
    assert not os.path.exists(path)


def test_open_does_not_steal_a_live_socket(socket_dir: Path) -> None:
    path = str(socket_dir / "steps.sock")
    first = StepReceiver(path)
    first.open()
    try:
        second = StepReceiver(path)
        with pytest.raises(OSError) as raised:
            second.open()
        assert raised.value.errno == errno.EADDRINUSE
        send_raw(path, good(1))
        assert [r["step"] for r in first.receive(1.0)] == [1]
    finally:
        first.close()


def test_open_does_not_remove_a_file_that_is_not_a_socket(socket_dir: Path) -> None:
    path = socket_dir / "steps.sock"
    path.write_text("someone's file")
    with pytest.raises(FileExistsError):
        StepReceiver(str(path)).open()
    assert path.read_text() == "someone's file"


def test_close_leaves_a_socket_another_process_bound_since(socket_dir: Path) -> None:
    path = str(socket_dir / "steps.sock")
    receiver = StepReceiver(path)
    receiver.open()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    other.bind(path)
    try:
        receiver.close()
        assert os.path.exists(path)
    finally:
        other.close()


def test_receive_on_a_closed_receiver_says_so(socket_dir: Path) -> None:
    receiver = StepReceiver(str(socket_dir / "steps.sock"))
    with pytest.raises(RuntimeError):
        receiver.receive(0)


def test_reports_after_close_are_dropped(receiver: StepReceiver) -> None:
    reporter = StepReporter(job="j", rank=0, socket_path=receiver.socket_path)
    reporter.close()
    reporter.report(0, 0.1)
    reporter.close()  # twice is fine
    assert reporter.dropped == 1


# -- the client is one vendorable, stdlib-only file ---------------------------------------------------


def test_stepreport_imports_only_the_standard_library(socket_dir: Path, receiver: StepReceiver) -> None:
    # Vendored: copied alone next to a training script, run without site-packages (-I -S), and
    # every module it pulls in must be the standard library's.
    vendored = socket_dir / "vendor"
    vendored.mkdir()
    shutil.copy(STEPREPORT_FILE, vendored / "stepreport.py")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(vendored)!r})\n"
        "before = set(sys.modules)\n"
        "import stepreport\n"
        "added = {m.partition('.')[0] for m in set(sys.modules) - before} - {'stepreport'}\n"
        "outside = sorted(m for m in added if m not in sys.stdlib_module_names)\n"
        "assert not outside, outside\n"
        f"r = stepreport.StepReporter(job='vendored', rank=1, socket_path={receiver.socket_path!r})\n"
        "r.report(3, 0.75)\n"
        "r.close()\n"
        "print(sorted(added))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        cwd=vendored,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert [(r["job"], r["rank"], r["step"], r["seconds"]) for r in receiver.receive(1.0)] == [("vendored", 1, 3, 0.75)]
