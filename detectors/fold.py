"""One page per fault: a straggler whose GPU's own hardware finding is firing rides on that finding.

A GPU in thermal slowdown that slows its job is found twice: by the hardware detector that judges
its clock (thermal, power or clocks) and by a straggler detector that sees the job wait for it.
Paging twice for one fault trains operators to ignore the second page, so the Tracker folds the
straggler into the hardware finding on the same GPU: the hardware finding's summary gains which
job and rank it slows and what the job loses, its evidence a `stragglers` entry per folded
straggler (detector, job, rank, job_loss, since: when it was folded in, until: when it stopped
straggling, None while it still does), and the straggler is not reported on its own. A straggler
with no such finding firing on its GPU stays its own finding.

The two usually qualify within seconds of each other, in either order. A straggler whose GPU shows
a throttle reason one of those detectors judges waits up to HARDWARE_WAIT_SECONDS for that finding
before it is reported alone, so the slower of the two does not turn one fault into two pages. A
straggler already reported alone is folded once the hardware finding fires: its own finding
closes and the hardware one carries it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from fleetwatch.nvml_bits import HW_POWER_BRAKE_SLOWDOWN, HW_SLOWDOWN, HW_THERMAL_SLOWDOWN, SW_THERMAL_SLOWDOWN
from fleetwatch.records import Finding

# The detectors whose finding on a GPU explains its slow clock: a straggler on that GPU is theirs.
CLOCK_DETECTORS = frozenset({"thermal", "power", "clocks"})
STRAGGLER_DETECTORS = frozenset({"straggler.steps", "straggler.telemetry"})
# Clock event reasons those detectors judge (thermal: 0x20, 0x40; power: 0x80; clocks: 0x08).
JUDGED_REASONS = SW_THERMAL_SLOWDOWN | HW_THERMAL_SLOWDOWN | HW_POWER_BRAKE_SLOWDOWN | HW_SLOWDOWN
# s; the sustained rule of thermal, power and clocks opens ~15 s after onset (80% of a 20 s window),
# the straggler detectors ~10 s after: a straggler waits up to 30 s for the hardware finding that
# explains it (our choice: the widest gap in the corpus is 1 s, and 30 s is the corpus's latency bound)
HARDWARE_WAIT_SECONDS = 30.0


class StragglerFolding:
    """Folds stragglers into the firing hardware finding of their GPU, pass after pass: remembers
    which stragglers wait for one, and which rode on each hardware finding while it stays open
    (one that stops straggling stays in its evidence, with when it stopped: `until`)."""

    def __init__(self, wait_seconds: float = HARDWARE_WAIT_SECONDS) -> None:
        if wait_seconds < 0:
            raise ValueError(f"wait_seconds must not be negative, got {wait_seconds!r}")
        self.wait_seconds = wait_seconds
        self._waiting_since: dict[str, float] = {}  # straggler fingerprint -> first pass it waited
        # hardware fingerprint -> straggler fingerprint -> its `stragglers` evidence entry
        self._riders: dict[str, dict[str, dict[str, Any]]] = {}

    def apply(self, seen: Mapping[str, Finding], now: float, firing: Mapping[str, Finding]) -> dict[str, Finding]:
        """`seen` (fingerprint -> finding, one evaluation's) with stragglers folded into their GPU's
        hardware finding or held while they wait for one. `firing`: the findings open before this
        evaluation (a straggler already reported alone waits no longer)."""
        hardware: dict[tuple[str | None, int], str] = {}
        for fingerprint, finding in seen.items():
            if finding.detector in CLOCK_DETECTORS and finding.gpu is not None:
                hardware.setdefault((finding.node, finding.gpu), fingerprint)
        out = dict(seen)
        riding: dict[str, dict[str, Finding]] = {}  # this pass's: host -> straggler fingerprint -> it
        waiting: dict[str, float] = {}
        for fingerprint, finding in seen.items():
            if finding.detector not in STRAGGLER_DETECTORS or finding.gpu is None:
                continue
            host = hardware.get((finding.node, finding.gpu))
            if host is not None:
                riding.setdefault(host, {})[fingerprint] = finding
                del out[fingerprint]
            elif fingerprint not in firing and _judged_throttle(finding):
                since = waiting[fingerprint] = self._waiting_since.get(fingerprint, now)
                if now - since < self.wait_seconds:
                    del out[fingerprint]
        self._waiting_since = waiting
        # A hardware finding not seen this pass has closed: what rode on it goes with it.
        riders = {host: entries for host, entries in self._riders.items() if host in seen}
        for host, stragglers in riding.items():
            entries = riders.setdefault(host, {})
            for fingerprint, straggler in stragglers.items():
                entry = entries.get(fingerprint)
                since = now if entry is None or entry["until"] is not None else entry["since"]
                entries[fingerprint] = _entry(straggler, since)
        for host, entries in riders.items():
            current = riding.get(host, {})
            for fingerprint, entry in entries.items():
                if fingerprint not in current and entry["until"] is None:
                    entry["until"] = now
            out[host] = _carrying(out[host], entries.values(), current.values())
        self._riders = riders
        return out


def _entry(straggler: Finding, since: float) -> dict[str, Any]:
    return {
        "detector": straggler.detector,
        "job": straggler.job,
        "rank": straggler.rank,
        "job_loss": straggler.evidence.get("job_loss"),
        "since": since,
        "until": None,
        "summary": straggler.summary,
    }


def _judged_throttle(finding: Finding) -> bool:
    """The straggler's GPU shows a throttle reason a clock detector judges."""
    reasons = finding.evidence.get("clock_event_reasons")
    return isinstance(reasons, int) and bool(reasons & JUDGED_REASONS)


def _carrying(hardware: Finding, entries: Iterable[dict[str, Any]], current: Iterable[Finding]) -> Finding:
    """The hardware finding with its stragglers in its evidence, those straggling now in its summary."""
    clauses: list[str] = []
    for straggler in sorted(current, key=lambda f: (f.job or "", -1 if f.rank is None else f.rank)):
        clause = f"it slows job {straggler.job}" if straggler.job is not None else "it slows its peers"
        if straggler.rank is not None:
            clause += f" (rank {straggler.rank})"
        loss = straggler.evidence.get("job_loss")
        if isinstance(loss, (int, float)):
            clause += f", which loses about {loss:.0%} of its speed"
        clauses.append(clause)
    summary = hardware.summary + "".join(f"; {clause}" for clause in clauses)
    stragglers = sorted(
        (dict(entry) for entry in entries),
        key=lambda e: (e["since"], e["job"] or "", -1 if e["rank"] is None else e["rank"]),
    )
    return replace(hardware, summary=summary, evidence={**hardware.evidence, "stragglers": stragglers})


def folded_stragglers(finding: Finding) -> list[tuple[Finding, float]]:
    """The stragglers a hardware finding carries, each as the finding it would have been on its
    own (summary as its detector wrote it) and the data time it was folded in."""
    out = []
    for entry in finding.evidence.get("stragglers", ()):
        straggler = replace(
            finding,
            detector=entry["detector"],
            job=entry["job"],
            rank=entry["rank"],
            summary=entry["summary"],
            evidence={"folded_into": finding.detector, "job_loss": entry["job_loss"]},
            key="",
        )
        out.append((straggler, float(entry["since"])))
    return out
