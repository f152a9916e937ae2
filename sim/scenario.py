"""Typed fault injection for the simulated node: what goes wrong, on which GPU, and when.

A fault happens `at_seconds` after the node's start and, where it is a condition rather than a
one-off, lasts `duration_seconds` (None: until the end of the run). The compact CLI form is
`KIND[:XID]@GPU+SECONDS[/DURATION]`, e.g. `xid:79@5+8`, `thermal_slowdown@2+6/30`.

KINDS are the original kinds; MORE_KINDS were added for the fleet scenarios (fleetwatch.sim.fleet) and
are accepted everywhere KINDS are (FAULT_KINDS is both).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

KINDS: tuple[str, ...] = (
    "xid",
    "ecc_dbe",
    "row_remap_pending",
    "row_remap_failure",
    "nvlink_errors",
    "nvlink_down",
    "pcie_replays",
    "pcie_downtrain",
    "thermal_slowdown",
    "power_brake",
    "gpu_lost",
)

MORE_KINDS: tuple[str, ...] = (
    "hw_slowdown",  # HW slowdown (0x8) alone: the board's external slowdown signal, no thermal/brake bit
    "slow_rank",  # the rank computes `factor` times slower with no hardware sign (data or app problem)
    "ecc_sbe_burst",  # correctable (single-bit) ECC errors at rate_per_second
    "single_sbe",  # one correctable ECC error: healthy noise a detector must not alarm on
    "retired_pages",  # page retirement: pre-Ampere boards only (Hopper remaps rows instead)
    "gpu_missing",  # the GPU is no longer enumerated: its handle fails, its samples stop, no XID
)
FAULT_KINDS: tuple[str, ...] = KINDS + MORE_KINDS

# The XID the driver logs alongside each kind (from base/xid_catalog.csv); `xid` on a
# fault overrides it, e.g. `ecc_dbe:94` for a contained ECC error.
DEFAULT_XID: dict[str, int] = {
    "ecc_dbe": 48,
    "row_remap_pending": 63,
    "row_remap_failure": 64,
    "nvlink_down": 74,
    "gpu_lost": 79,
}

# One-off or permanent kinds: a duration would mean nothing (counters never go back down, a lost
# GPU stays lost until the node reboots).
_NO_DURATION = frozenset({"xid", "ecc_dbe", "row_remap_failure", "gpu_lost", "single_sbe", "retired_pages"})

# Default climb rates (events per second) for the counter faults.
DEFAULT_NVLINK_CRC_FLITS_PER_SECOND = 20.0
DEFAULT_PCIE_REPLAYS_PER_SECOND = 2.0  # 120/min; more than 8 a minute is already unhealthy
# A burst of correctable ECC errors from a weakening HBM cell: one every couple of seconds.
DEFAULT_SBE_PER_SECOND = 0.5
# slow_rank: how much longer the rank's own compute takes by default.
DEFAULT_SLOW_RANK_FACTOR = 1.3


@dataclass(frozen=True)
class Fault:
    """One injected fault; per-kind parameters have defaults and are ignored by other kinds."""

    kind: str
    gpu: int
    at_seconds: float
    xid: int | None = None
    duration_seconds: float | None = None
    # nvlink_errors / nvlink_down: which link (0-based).
    link: int = 0
    # nvlink_errors: CRC flit errors per second (data CRC, replay, recovery climb proportionally);
    # pcie_replays: replays per second.
    rate_per_second: float | None = None
    # pcie_downtrain: the generation and width the link trains at (a common real failure is a
    # Gen5 x16 slot coming up at Gen4 or x8).
    pcie_gen: int = 4
    pcie_width: int = 8
    # slow_rank: compute-time multiplier (default DEFAULT_SLOW_RANK_FACTOR); thermal_slowdown,
    # power_brake, hw_slowdown: compute-time multiplier instead of the kind's own clock drop
    # (the SM clock falls to 1/factor of its maximum).
    factor: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; kinds: {', '.join(FAULT_KINDS)}")
        if isinstance(self.gpu, bool) or not isinstance(self.gpu, int) or self.gpu < 0:
            raise ValueError(f"fault gpu must be a non-negative integer, got {self.gpu!r}")
        if not math.isfinite(self.at_seconds) or self.at_seconds < 0:
            raise ValueError(f"fault at_seconds must be >= 0, got {self.at_seconds!r}")
        if self.kind == "xid" and self.xid is None:
            raise ValueError("fault kind 'xid' needs an XID number (e.g. xid:79)")
        if self.xid is not None and (isinstance(self.xid, bool) or int(self.xid) != self.xid or self.xid <= 0):
            raise ValueError(f"XID must be a positive integer, got {self.xid!r}")
        if self.duration_seconds is not None:
            if self.kind in _NO_DURATION:
                raise ValueError(f"fault kind {self.kind!r} takes no duration")
            if not math.isfinite(self.duration_seconds) or self.duration_seconds <= 0:
                raise ValueError(f"fault duration_seconds must be > 0, got {self.duration_seconds!r}")
        if self.link < 0:
            raise ValueError(f"fault link must be >= 0, got {self.link!r}")
        if self.rate_per_second is not None and not self.rate_per_second > 0:
            raise ValueError(f"fault rate_per_second must be > 0, got {self.rate_per_second!r}")
        if self.pcie_gen < 1 or self.pcie_width < 1:
            raise ValueError("fault pcie_gen and pcie_width must be >= 1")
        if self.factor is not None and not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise ValueError(f"fault factor must be a finite number >= 1, got {self.factor!r}")

    @property
    def effective_xid(self) -> int | None:
        """The XID logged when this fault happens (its own, else the kind's default, else none)."""
        return self.xid if self.xid is not None else DEFAULT_XID.get(self.kind)

    @property
    def end_seconds(self) -> float:
        """Seconds after start when the condition clears (inf when it never does)."""
        if self.duration_seconds is None:
            return math.inf
        return self.at_seconds + self.duration_seconds

    def __str__(self) -> str:
        xid = f":{self.xid}" if self.xid is not None else ""
        duration = f"/{self.duration_seconds:g}" if self.duration_seconds is not None else ""
        return f"{self.kind}{xid}@{self.gpu}+{self.at_seconds:g}{duration}"


_NUMBER = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)$")


def _seconds(text: str, what: str, spec: str) -> float:
    if not _NUMBER.match(text):
        raise ValueError(f"bad fault spec {spec!r}: {what} {text!r} is not a number of seconds")
    return float(text)


def parse_fault(spec: str) -> Fault:
    """Parse `KIND[:XID]@GPU+SECONDS[/DURATION]`; ValueError names what is wrong."""
    text = spec.strip()
    if "@" not in text:
        raise ValueError(
            f"bad fault spec {spec!r}: expected KIND[:XID]@GPU+SECONDS[/DURATION], "
            "e.g. xid:79@5+8 or thermal_slowdown@2+6/30"
        )
    head, _, where = text.partition("@")
    kind, sep, xid_text = head.partition(":")
    kind = kind.strip()
    if kind not in FAULT_KINDS:
        raise ValueError(f"bad fault spec {spec!r}: unknown kind {kind!r}; kinds: {', '.join(FAULT_KINDS)}")
    xid: int | None = None
    if sep:
        if not xid_text.isdigit() or int(xid_text) <= 0:
            raise ValueError(f"bad fault spec {spec!r}: XID {xid_text!r} is not a positive integer")
        xid = int(xid_text)
    elif kind == "xid":
        raise ValueError(f"bad fault spec {spec!r}: kind 'xid' needs a number, e.g. xid:79@5+8")
    if "+" not in where:
        raise ValueError(f"bad fault spec {spec!r}: missing '+SECONDS' after the GPU index")
    gpu_text, _, timing = where.partition("+")
    if not gpu_text.isdigit():
        raise ValueError(f"bad fault spec {spec!r}: GPU {gpu_text!r} is not a GPU index")
    at_text, slash, duration_text = timing.partition("/")
    at_seconds = _seconds(at_text, "start", spec)
    duration = _seconds(duration_text, "duration", spec) if slash else None
    try:
        return Fault(kind=kind, gpu=int(gpu_text), at_seconds=at_seconds, xid=xid, duration_seconds=duration)
    except ValueError as exc:
        raise ValueError(f"bad fault spec {spec!r}: {exc}") from None


def node_names(count: int) -> list[str]:
    """A fleet's node names, n01..nNN, as tests/scenarios/README.md names them."""
    width = max(2, len(str(count)))
    return [f"n{i:0{width}d}" for i in range(1, count + 1)]
