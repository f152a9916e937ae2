"""Step-report source: receives training ranks' step times on a local Unix datagram socket.

Training processes send one JSON datagram per step with ``agent/stepreport.py``; this side
binds the socket, drains it without blocking, validates every field strictly and returns step
records for the sampler to forward. Nothing a sender does can make it raise or grow unbounded.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

# The receiver enforces the bounds the client promises (defined in the client) with the checks the
# collector applies to the steps it is sent (fleetwatch.limits), so a report taken here is stored.
from fleetwatch.limits import MAX_RANK, MAX_STEP, MAX_STEP_SECONDS, STEP_JOB_MAX_CHARS, text_problem
from fleetwatch.stepreport import MAX_DATAGRAM_BYTES

log = logging.getLogger(__name__)

MALFORMED_LOG_INTERVAL_SECONDS = 60.0
# The socket is world-writable (see open()); the directory must let every user reach it.
SOCKET_DIR_MODE = 0o755
SOCKET_MODE = 0o666


class MalformedStep(ValueError):
    """A datagram that is not a valid step report; the message says why."""


def _reject_constant(name: str) -> Any:
    raise MalformedStep(f"{name} is not a number")


# Optional keys of a report (reporters since 0.3): the rank's parallel coordinates and the step's
# wall time. Absent, null or (from an older reporter) never sent: not forwarded.
COORDINATE_KEYS = ("dp_rank", "pp_stage", "tp_rank")


def parse_step(datagram: bytes) -> dict[str, Any]:
    """``{"job", "rank", "step", "seconds"}``, plus ``dp_rank``, ``pp_stage``, ``tp_rank`` and
    ``wall_seconds`` where the report has them, from one datagram; or MalformedStep saying what is
    wrong."""
    if len(datagram) > MAX_DATAGRAM_BYTES:
        raise MalformedStep(f"longer than {MAX_DATAGRAM_BYTES} bytes")
    try:
        # parse_constant refuses NaN and Infinity, which Python's json accepts by default.
        report = json.loads(datagram.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedStep(f"not JSON: {exc}") from None
    if not isinstance(report, dict):
        raise MalformedStep("not a JSON object")
    # Keys beyond these and the optional ones are ignored (a newer reporter may add some) and never
    # forwarded.
    job, rank, step, seconds = (report.get(k) for k in ("job", "rank", "step", "seconds"))
    if not isinstance(job, str):
        raise MalformedStep(f"job must be a string of 1 to {STEP_JOB_MAX_CHARS} printable characters")
    # Printable only: a NUL (which PostgreSQL text cannot hold), a newline or an escape sequence
    # in a job name would reach the collector's database and logs.
    problem = text_problem(job, STEP_JOB_MAX_CHARS, required=True)
    if problem is not None:
        raise MalformedStep(f"job {problem}")
    # bool is an int subclass; JSON true is not a rank.
    if type(rank) is not int or not 0 <= rank <= MAX_RANK:
        raise MalformedStep(f"rank must be an integer from 0 to {MAX_RANK}")
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise MalformedStep(f"step must be an integer from 0 to {MAX_STEP}")
    # The range test first: it also refuses 1e400 (parsed as inf) and ints too big for a float.
    if (type(seconds) is not int and type(seconds) is not float) or not (
        0 < seconds < MAX_STEP_SECONDS and math.isfinite(seconds)
    ):
        raise MalformedStep(f"seconds must be a finite number in (0, {MAX_STEP_SECONDS:g})")
    record: dict[str, Any] = {"job": job, "rank": rank, "step": step, "seconds": float(seconds)}
    for key in COORDINATE_KEYS:
        value = report.get(key)
        if value is None:
            continue
        if type(value) is not int or not 0 <= value <= MAX_RANK:
            raise MalformedStep(f"{key} must be an integer from 0 to {MAX_RANK}")
        record[key] = value
    wall = report.get("wall_seconds")
    if wall is not None:
        if (type(wall) is not int and type(wall) is not float) or not (
            0 < wall < MAX_STEP_SECONDS and math.isfinite(wall)
        ):
            raise MalformedStep(f"wall_seconds must be a finite number in (0, {MAX_STEP_SECONDS:g})")
        record["wall_seconds"] = float(wall)
    return record


def _identity(status: os.stat_result) -> tuple[int, int, int]:
    # The change time with the inode: a freed inode number is soon reused for the next file.
    return status.st_dev, status.st_ino, status.st_ctime_ns


class StepReceiver:
    """The agent's end of the step-report socket.

    ``malformed`` counts datagrams refused by validation; ``dropped`` counts valid reports
    beyond ``max_queued`` in one receive() call.
    """

    name = "steps"

    def __init__(self, socket_path: str, *, max_queued: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1: {max_queued}")
        self.socket_path = socket_path
        self.max_queued = max_queued
        self.clock = clock
        self.malformed = 0
        self.dropped = 0
        self._socket: socket.socket | None = None
        self._poll: select.poll | None = None
        self._bound_identity: tuple[int, int, int] | None = None
        self._malformed_unlogged = 0
        self._malformed_logged_monotonic: float | None = None

    def open(self) -> None:
        """Bind the socket at ``socket_path``, replacing a stale one; OSError if that cannot be done.

        The socket is made writable by every user (0o666) so training processes of any user can
        send: it is local only, senders can only write to it (nothing is ever sent back), each
        receive() is bounded, and every datagram is parsed strictly, so the worst a sender can
        do is have its own or others' step reports dropped and counted.
        """
        if self._socket is not None:
            return
        directory = os.path.dirname(self.socket_path) or "."
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=SOCKET_DIR_MODE, exist_ok=True)
            os.chmod(directory, SOCKET_DIR_MODE)  # makedirs' mode is filtered by the umask
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.socket_path)
            os.chmod(self.socket_path, SOCKET_MODE)
            self._bound_identity = _identity(os.lstat(self.socket_path))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self._poll = select.poll()  # poll, not select(): the agent may hold fds above 1024
        self._poll.register(sock.fileno(), select.POLLIN)
        log.info("receiving step reports on %s", self.socket_path)

    def _remove_stale_socket(self) -> None:
        try:
            mode = os.lstat(self.socket_path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket; not removing it", self.socket_path)
        # A socket file outlives an agent that was killed; one that still accepts datagrams
        # belongs to a running agent, whose reports we must not steal.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(self.socket_path)
        except OSError:
            pass  # ECONNREFUSED: nobody is bound to it any more
        else:
            raise OSError(errno.EADDRINUSE, "another process is receiving step reports on it", self.socket_path)
        finally:
            probe.close()
        log.info("removing stale step-report socket %s", self.socket_path)
        os.unlink(self.socket_path)

    def close(self) -> None:
        """Close the socket and remove its file, unless another process has bound the path since."""
        sock, self._socket, self._poll = self._socket, None, None
        if sock is None:
            return
        sock.close()
        try:
            if _identity(os.lstat(self.socket_path)) == self._bound_identity:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._bound_identity = None

    def fileno(self) -> int:
        return self._open_socket().fileno()

    def receive(self, timeout_seconds: float) -> list[dict[str, Any]]:
        """Wait up to ``timeout_seconds`` for step reports and return those that arrived.

        Returns parse_step()'s dicts with "t" added, at most ``max_queued``. One
        call reads at most twice that many datagrams, so a flood cannot hold it; valid reports
        past ``max_queued`` are dropped and counted, and whatever is still queued waits for the
        next call. Malformed datagrams are counted and skipped. OSError only if the socket fails.
        """
        sock = self._open_socket()
        assert self._poll is not None
        # Rounded up: poll() takes milliseconds, and 0.4 ms must wait, not return at once.
        if not self._poll.poll(max(0, math.ceil(timeout_seconds * 1000))):
            return []
        records: list[dict[str, Any]] = []
        for _ in range(2 * self.max_queued):
            try:
                # One byte more than allowed, so an oversize datagram is seen (and refused), not
                # silently truncated into something that parses.
                datagram = sock.recv(MAX_DATAGRAM_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                break
            try:
                record = parse_step(datagram)
            except MalformedStep as exc:
                self._count_malformed(str(exc))
                continue
            if len(records) >= self.max_queued:
                self.dropped += 1
                continue
            record["t"] = self.clock()
            records.append(record)
        return records

    def _open_socket(self) -> socket.socket:
        if self._socket is None:
            raise RuntimeError(f"step-report socket {self.socket_path} is not open")
        return self._socket

    def _count_malformed(self, reason: str) -> None:
        self.malformed += 1
        self._malformed_unlogged += 1
        # Anyone on the node can write here: one line a minute, however many bad datagrams.
        now = time.monotonic()
        last = self._malformed_logged_monotonic
        if last is None or now - last >= MALFORMED_LOG_INTERVAL_SECONDS:
            log.warning(
                "%d malformed step report(s) on %s skipped (latest: %s); %d in all",
                self._malformed_unlogged,
                self.socket_path,
                reason,
                self.malformed,
            )
            self._malformed_logged_monotonic = now
            self._malformed_unlogged = 0
