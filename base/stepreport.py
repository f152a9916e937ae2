"""Step reporter: a training process tells the node's fleetwatch agent how long each step took.

Standard library only, so a training image can vendor this one file. Each report is one small
JSON datagram sent without blocking to the agent's Unix datagram socket; with no agent listening
(or a busy one) the report is dropped and counted, never raised, never waited for.
See docs/step-reports.md for how a training loop uses it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import operator
import os
import socket
import threading
import time
from collections.abc import Iterator

DEFAULT_SOCKET = "/run/fleetwatch/steps.sock"
SOCKET_ENV = "FLEETWATCH_STEP_SOCKET"
# The agent reads no more than this per datagram; a longer one is rejected as malformed.
MAX_DATAGRAM_BYTES = 512
MAX_JOB_CHARS = 128
MAX_RANK = 1_000_000
# The store keeps step numbers in a signed 64-bit column.
MAX_STEP = 2**63 - 1
# A step longer than a day is a stuck job or a wrong unit, not a step time.
MAX_STEP_SECONDS = 86_400.0
# First match wins. An explicit FLEETWATCH_JOB overrides what the launcher provides.
JOB_ENV_VARS = ("FLEETWATCH_JOB", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
# RANK (torchrun's global rank) before SLURM_PROCID: under `srun torchrun` the Slurm task id
# numbers launchers, one per node, not training ranks.
RANK_ENV_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
# The rank's place in a hybrid-parallel job, where the caller does not pass it. Launchers have no
# common variables for these (Megatron, NeMo and torchtitan compute them in the process), so they
# are fleetwatch's own: set them per rank, or pass them to StepReporter.
COORDINATE_ENV_VARS = {
    "dp_rank": "FLEETWATCH_DP_RANK",
    "pp_stage": "FLEETWATCH_PP_STAGE",
    "tp_rank": "FLEETWATCH_TP_RANK",
}
# After "nobody is listening" errors the reporter stops trying for this long, so a job on a node
# without an agent pays a clock read per step instead of a system call, and an agent that starts
# (or restarts) later is picked up within this delay.
NO_RECEIVER_RETRY_SECONDS = 1.0
# Errors that mean no agent can be reached at the path, as opposed to a busy one (EAGAIN,
# ENOBUFS), whose queue frees up within milliseconds.
_NO_RECEIVER_ERRNOS = frozenset(
    {errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.ENOTSOCK, errno.EACCES, errno.EPERM}
)
# Normal operation, logged at debug level: no agent on this node, or an agent a moment behind.
# Anything else (a socket this user may not write, say) is a set-up problem worth one warning.
_QUIET_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.EAGAIN, errno.ENOBUFS})
# The worst-case tail after the job and rank: 19 digits of step, two floats' reprs, punctuation.
_MAX_TAIL_BYTES = len(',"step":') + 19 + len(',"seconds":') + 24 + len(',"wall_seconds":') + 24 + 1
# The worst-case coordinates after the rank, every one at MAX_RANK.
_MAX_COORDINATE_BYTES = sum(len(f',"{name}":1000000') for name in COORDINATE_ENV_VARS)

# A fixed name rather than __name__, so a vendored copy logs under the same logger.
log = logging.getLogger("fleetwatch.stepreport")


def _default_job() -> str:
    for name in JOB_ENV_VARS:
        value = os.environ.get(name, "")
        # torchrun sets TORCHELASTIC_RUN_ID to "none" when no --rdzv-id was given.
        if value and value != "none" and _job_problem(value) is None:
            return value
    # No launcher told us the job: ranks started by one launcher on this node share its pid.
    # A multi-node job outside Slurm and torchrun should set FLEETWATCH_JOB.
    return f"{socket.gethostname()}-{os.getppid()}"[:MAX_JOB_CHARS]


def _default_rank() -> int:
    for name in RANK_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value.isascii() and value.isdigit() and int(value) <= MAX_RANK:
            return int(value)
    return 0


def _default_coordinate(name: str) -> int | None:
    value = os.environ.get(COORDINATE_ENV_VARS[name], "").strip()
    if value.isascii() and value.isdigit() and int(value) <= MAX_RANK:
        return int(value)
    return None


def _rank_problem(name: str, value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RANK:
        return f"{name} must be an integer from 0 to {MAX_RANK}: {value!r}"
    return None


def _job_problem(job: object) -> str | None:
    """Why ``job`` cannot be sent (None when it can): the agent's rules, plus the size bound."""
    if not isinstance(job, str) or not job:
        return "job must be a non-empty string"
    if len(job) > MAX_JOB_CHARS:
        return f"job must be at most {MAX_JOB_CHARS} characters"
    if not job.isprintable():  # the agent refuses control characters (a NUL, a newline) in a job
        return "job must be printable (no control characters)"
    try:
        encoded = json.dumps(job, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "job must be encodable as UTF-8"
    if len(encoded) + len('{"job":,"rank":1000000') + _MAX_COORDINATE_BYTES + _MAX_TAIL_BYTES > MAX_DATAGRAM_BYTES:
        return f"job too long to fit a {MAX_DATAGRAM_BYTES}-byte report"
    return None


class StepReporter:
    """Sends ``(job, rank, step, seconds)`` to the local agent; never raises, never blocks.

    In a hybrid-parallel job pass the rank's ``dp_rank`` (data-parallel replica), ``pp_stage``
    (pipeline stage) and ``tp_rank`` (tensor-parallel rank), or set ``FLEETWATCH_DP_RANK``,
    ``FLEETWATCH_PP_STAGE`` and ``FLEETWATCH_TP_RANK``: the collector then compares each rank with
    the same stage on the other replicas, not with ranks that do other work. ``report`` also
    takes the step's wall time (compute and waits), from which a straggler's cost to the job is
    measured.

    ``dropped`` counts reports the agent did not get (no agent, agent busy, reporter closed);
    ``invalid`` counts reports refused here because step or seconds were out of range. At most
    one log record is written per reporter: at debug level when no agent is listening (normal on
    a node without one) or the agent is momentarily behind, at warning level for anything else.
    """

    def __init__(
        self,
        job: str | None = None,
        rank: int | None = None,
        socket_path: str | None = None,
        *,
        dp_rank: int | None = None,
        pp_stage: int | None = None,
        tp_rank: int | None = None,
    ) -> None:
        # Explicit arguments are checked here, once, before training starts: a wrong job or rank
        # is a bug in the caller. Values from the environment fall back instead of raising.
        if job is None:
            job = _default_job()
        problem = _job_problem(job)
        if problem is not None:
            raise ValueError(f"{problem}: {job!r}")
        if rank is None:
            rank = _default_rank()
        problem = _rank_problem("rank", rank)
        if problem is not None:
            raise ValueError(problem)
        coordinates: dict[str, int] = {}
        for name, value in (("dp_rank", dp_rank), ("pp_stage", pp_stage), ("tp_rank", tp_rank)):
            if value is None:
                value = _default_coordinate(name)
            elif (problem := _rank_problem(name, value)) is not None:
                raise ValueError(problem)
            if value is not None:
                coordinates[name] = value
        self.job = job
        self.rank = rank
        self.coordinates = coordinates
        self.socket_path = socket_path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
        self.dropped = 0
        self.invalid = 0
        self.next_step = 0
        self._logged = False
        self._retry_after_monotonic = 0.0
        # The job and rank never change: encode them once, so a report only formats two numbers.
        self._prefix = (
            json.dumps({"job": job, "rank": rank, **coordinates}, ensure_ascii=False, separators=(",", ":"))[:-1]
            + ',"step":'
        ).encode("utf-8")
        self._socket: socket.socket | None = None
        try:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        except OSError as exc:  # out of file descriptors, or no AF_UNIX: every report is dropped
            self._socket = None
            self._log_once(logging.WARNING, "step reports off: cannot create a socket: %s", exc)

    def report(self, step: int, seconds: float, wall_seconds: float | None = None) -> None:
        """Send one step time (in seconds) to the agent, or drop and count it; never raises.

        ``seconds`` is the rank's own compute time; ``wall_seconds``, where known, the step's
        whole time including collective waits."""
        try:
            step = operator.index(step)  # ints, numpy integers; not floats
            seconds = float(seconds)  # floats, numpy floats, 0-d tensors
            wall = None if wall_seconds is None else float(wall_seconds)
        except Exception:
            self._refuse(step, seconds, wall_seconds)
            return
        if not (0 <= step <= MAX_STEP and 0.0 < seconds < MAX_STEP_SECONDS) or not (
            wall is None or 0.0 < wall < MAX_STEP_SECONDS
        ):  # NaN fails too
            self._refuse(step, seconds, wall_seconds)
            return
        sock = self._socket
        if sock is None or time.monotonic() < self._retry_after_monotonic:
            self.dropped += 1
            return
        payload = b'%s%d,"seconds":%s' % (self._prefix, step, repr(seconds).encode("ascii"))
        payload += b"}" if wall is None else b',"wall_seconds":%s}' % repr(wall).encode("ascii")
        try:
            # sendto with the path on every report, not connect() once: a connected socket keeps
            # pointing at a restarted agent's old, dead socket; the path finds the new one.
            sock.sendto(payload, self.socket_path)
        except OSError as exc:
            self.dropped += 1
            if exc.errno in _NO_RECEIVER_ERRNOS:
                self._retry_after_monotonic = time.monotonic() + NO_RECEIVER_RETRY_SECONDS
            level = logging.DEBUG if exc.errno in _QUIET_ERRNOS else logging.WARNING
            self._log_once(level, "step reports to %s are being dropped (first: %s)", self.socket_path, exc)

    @contextlib.contextmanager
    def step(self, step: int | None = None) -> Iterator[int]:
        """Time the block with ``time.perf_counter`` and report it as one step.

        Steps number themselves from 0; pass ``step`` to set the number (after resuming from a
        checkpoint, say), and later steps continue from it. Yields the step number. A block
        that raises is not reported (its time is not a step time), but its number is used up.
        """
        number = self.next_step if step is None else step
        self.next_step = number + 1
        started_seconds = time.perf_counter()
        yield number
        self.report(number, time.perf_counter() - started_seconds)

    def close(self) -> None:
        """Close the socket; later reports are dropped and counted."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> StepReporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _refuse(self, step: object, seconds: object, wall_seconds: object = None) -> None:
        self.invalid += 1
        self._log_once(
            logging.WARNING,
            "step report refused: step must be an integer from 0 to %d, seconds and wall_seconds (if given) "
            "numbers in (0, %g): step=%r seconds=%r wall_seconds=%r",
            MAX_STEP,
            MAX_STEP_SECONDS,
            step,
            seconds,
            wall_seconds,
        )

    def _log_once(self, level: int, message: str, *args: object) -> None:
        # A training job reports thousands of steps per rank: one record per reporter at most.
        if not self._logged:
            self._logged = True
            log.log(level, message, *args)


_default_reporter: StepReporter | None = None
_default_lock = threading.Lock()


def report_step(step: int, seconds: float, wall_seconds: float | None = None) -> None:
    """Report one step through a reporter created on first use from the environment."""
    global _default_reporter
    reporter = _default_reporter
    if reporter is None:
        with _default_lock:
            if _default_reporter is None:
                _default_reporter = StepReporter()
            reporter = _default_reporter
    reporter.report(step, seconds, wall_seconds)
