"""InfiniBand detector: ports that went down, flap, or trained below their rate; one finding a node.

Reads Window.ib (IbSample per (node, device, port), from the agent's sysfs InfiniBand source). Per
port, in the current boot and the last `window_seconds`:
- down: the port is out of ACTIVE for `down_seconds` after having been ACTIVE (a port never ACTIVE,
  e.g. an unused second port, is not down). A port ACTIVE only before the node rebooted gets
  `boot_grace_seconds` to come back (the subnet manager needs a sweep to activate it). Critical,
  drain: the node cannot take part in multi-node jobs.
- link-downs: the link went down and came back. Counted from `ib_link_downed_total` increments and
  from ACTIVE -> not ACTIVE transitions (the larger of the two: the counter misses nothing shorter
  than a sample but saturates at 255; the state misses downs shorter than a sample). One is a
  warning; `flap_count` in the window is flapping: critical, drain.
- rate low: ACTIVE at a rate below the port's own earlier rate in the window, or below the rate a
  clear majority of the fleet's ports with the same device and port number run at, for
  `rate_low_seconds`. Warning.
The counters are the PortCounters fields, 8 bits (link_downed, link_error_recovery) or 16 bits
(symbol_error, port_rcv_errors), and saturate instead of wrapping; a counter that goes down was
reset (driver reload, reboot, perfquery -R) and counts nothing for that step. Counters are only
compared within one boot.

One finding per node (key ""): the ports' conditions are listed worst first, and severity and
action are the worst port's, so a switch or cable fault that takes several ports pages once.
Reading is cheap: a port whose link_downed counter and state are the same at both ends of the
window, with the counter below saturation, had no link-down in between and is not scanned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

from fleetwatch.detectors.model import NodeState, Window, fmt_number
from fleetwatch.records import Finding, IbSample

# PortCounters field widths (IBTA; the kernel's sysfs counters; agent/sources/infiniband.py).
LINK_DOWNED_MAX = 255
COUNTER_MAX = {
    "ib_link_downed_total": 255,
    "ib_link_error_recovery_total": 255,
    "ib_symbol_error_total": 65535,
    "ib_rcv_errors_total": 65535,
}
_SEVERITY_RANK = {"warning": 1, "critical": 2}
_CONDITION_RANK = {"down": 4, "flapping": 3, "link_down": 2, "rate_low": 1}


@dataclass(frozen=True, slots=True)
class InfinibandThresholds:
    # s; out of ACTIVE this long after ACTIVE = down: 5 samples at 1 Hz, well inside 30 s (ours)
    down_seconds: float = 5.0
    # s; a port last ACTIVE before the reboot gets this long: gpud defaultIbPortDropThreshold 4 min
    boot_grace_seconds: float = 240.0
    # s; a port down this long without coming back is stale news: a day (as gpu_lost's hold limit)
    down_hold_limit_seconds: float = 86400.0
    # s; link-downs counted and held this long: 10 min of samples (ours; Azure NHC 6 h, gpud 12 h)
    window_seconds: float = 600.0
    # link-downs in the window = flapping: Azure NHC azure_ib_link_flapping.nhc fails on the 2nd
    flap_count: int = 2
    # s; below its rate this long = trained down, not a reading mid-retrain (our choice)
    rate_low_seconds: float = 10.0
    # ports with the same device and port number needed before a fleet rate is "usual" (our choice)
    min_peer_ports: int = 4
    # fraction of those ports that must share the rate for it to be "usual" (our choice)
    peer_agreement: float = 0.75
    # s; older samples say nothing about now, a quiet node is node_silent's (as thermal)
    max_sample_age_seconds: float = 30.0

    def __post_init__(self) -> None:
        if min(self.down_seconds, self.rate_low_seconds, self.boot_grace_seconds) < 0:
            raise ValueError("durations must not be negative")
        if self.down_hold_limit_seconds <= 0:
            raise ValueError("down_hold_limit_seconds must be positive")
        if self.window_seconds <= 0 or self.max_sample_age_seconds <= 0:
            raise ValueError("window_seconds and max_sample_age_seconds must be positive")
        if self.flap_count < 1 or self.min_peer_ports < 1:
            raise ValueError("flap_count and min_peer_ports must be at least 1")
        if not 0 < self.peer_agreement <= 1:
            raise ValueError("peer_agreement must be in (0, 1]")


@dataclass(slots=True)
class _PortIssue:
    device: str
    port: int
    condition: str  # down, flapping, link_down, rate_low
    severity: str
    action: str
    summary: str
    start: float
    evidence: dict[str, object]

    @property
    def rank(self) -> tuple[int, int]:
        return (_SEVERITY_RANK[self.severity], _CONDITION_RANK[self.condition])


@dataclass(slots=True)
class _History:
    """What a scan of one port's samples (current boot, window) found."""

    downs: list[float]  # times of link-down occurrences, oldest first
    increments: int  # link_downed counter increments
    transitions: int  # ACTIVE -> not ACTIVE
    max_active_rate: float | None
    last_active: float | None  # the newest ACTIVE sample
    down_since: float | None  # the first sample out of ACTIVE after it (or of the scan, if none)
    saturated: bool  # link_downed at its maximum: increments no longer visible
    deltas: dict[str, int]  # increments of every counter over the scan


def _number(sample: IbSample, name: str) -> float | None:
    value = sample.metrics.get(name)
    if value is None or isinstance(value, str):
        return None
    return float(value)


def _first_at_or_after(series: Sequence[IbSample], t: float) -> int:
    """The index of the first sample at or after t (series oldest first); len(series) if none."""
    if not series or series[0].t >= t:
        return 0  # the common case: retention already cut the series at the window's start
    low, high = 1, len(series)
    while low < high:
        middle = (low + high) // 2
        if series[middle].t < t:
            low = middle + 1
        else:
            high = middle
    return low


def _scan(samples: Sequence[IbSample]) -> _History:
    downs_by_state: list[float] = []
    downs_by_counter: list[float] = []
    increments = 0
    max_active_rate: float | None = None
    last_active: float | None = None
    down_since: float | None = None
    previous_active: bool | None = None
    previous_counts: dict[str, float] = {}
    deltas = dict.fromkeys(COUNTER_MAX, 0)
    for sample in samples:
        for name in COUNTER_MAX:
            value = _number(sample, name)
            if value is None:
                continue
            before = previous_counts.get(name)
            if before is not None and value > before:
                deltas[name] += int(value - before)
                if name == "ib_link_downed_total":
                    increments += int(value - before)
                    downs_by_counter.extend([sample.t] * int(value - before))
            # value < before: the counter was reset; it counts nothing for this step.
            previous_counts[name] = value
        active = sample.active
        if active is None:
            continue
        if active:
            last_active, down_since = sample.t, None
            rate = _number(sample, "ib_rate_gbps")
            if rate is not None and (max_active_rate is None or rate > max_active_rate):
                max_active_rate = rate
        else:
            if previous_active:
                downs_by_state.append(sample.t)
            if down_since is None:
                down_since = sample.t
        previous_active = active
    last_count = previous_counts.get("ib_link_downed_total")
    # The larger count wins; its times date the link-downs.
    downs = downs_by_counter if len(downs_by_counter) >= len(downs_by_state) else downs_by_state
    return _History(
        downs=downs,
        increments=increments,
        transitions=len(downs_by_state),
        max_active_rate=max_active_rate,
        last_active=last_active,
        down_since=down_since,
        saturated=last_count is not None and last_count >= LINK_DOWNED_MAX,
        deltas=deltas,
    )


def _quiet(oldest: IbSample, newest: IbSample, newest_active: bool | None) -> bool:
    """No link-down can have happened between the two samples (same boot): skip the scan."""
    before = _number(oldest, "ib_link_downed_total")
    after = _number(newest, "ib_link_downed_total")
    if before is None or after is None or before != after or after >= LINK_DOWNED_MAX:
        return False
    oldest_active = oldest.active
    return oldest_active is not None and oldest_active == newest_active


@dataclass(slots=True)
class InfinibandDetector:
    """InfiniBand port samples -> a finding per node with a port down, flapping or slow."""

    thresholds: InfinibandThresholds = field(default_factory=InfinibandThresholds)
    id: ClassVar[str] = "infiniband"

    @property
    def window_seconds(self) -> float:
        return max(self.thresholds.window_seconds, self.thresholds.max_sample_age_seconds)

    # Reads InfiniBand port samples only: no GPU sample fields (RecentData.for_detectors).
    gpu_window_seconds: ClassVar[float] = 0.0
    gpu_fields: ClassVar[Mapping[str, float]] = MappingProxyType({})

    def detect(self, window: Window) -> list[Finding]:
        if not window.ib:
            return []
        oldest_fresh = window.now - self.thresholds.max_sample_age_seconds
        fresh: list[tuple[tuple[str, str, int], Sequence[IbSample], IbSample, bool | None]] = []
        for key, series in window.ib.items():
            if not series:
                continue
            newest = series[-1]
            if newest.t >= oldest_fresh:  # else stale: the node is quiet, node_silent's
                fresh.append((key, series, newest, newest.active))
        usual = self._usual_rates(fresh)
        issues: dict[str, list[_PortIssue]] = {}
        for (node, device, port), series, newest, active in fresh:
            issue = self._port(window, node, device, port, series, newest, active, usual.get((device, port)))
            if issue is not None:
                issues.setdefault(node, []).append(issue)
        findings = [self._finding(node, node_issues) for node, node_issues in issues.items()]
        findings.sort(key=lambda f: (f.start, f.node or ""))
        return findings

    def _usual_rates(
        self, fresh: list[tuple[tuple[str, str, int], Sequence[IbSample], IbSample, bool | None]]
    ) -> dict[tuple[str, int], float]:
        """Per (device, port): the ACTIVE rate a clear majority of the fleet's ports run at."""
        rates: dict[tuple[str, int], Counter[float]] = {}
        for (_node, device, port), _series, newest, active in fresh:
            rate = newest.metrics.get("ib_rate_gbps")
            if not active or rate is None or isinstance(rate, str):
                continue
            rates.setdefault((device, port), Counter())[float(rate)] += 1
        usual = {}
        for key, counts in rates.items():
            total = sum(counts.values())
            rate, count = max(counts.items(), key=lambda item: (item[1], item[0]))
            t = self.thresholds
            if total >= t.min_peer_ports and count >= t.peer_agreement * total:
                usual[key] = rate
        return usual

    def _port(
        self,
        window: Window,
        node: str,
        device: str,
        port: int,
        series: Sequence[IbSample],
        newest: IbSample,
        active: bool | None,
        usual_rate: float | None,
    ) -> _PortIssue | None:
        t = self.thresholds
        now = window.now
        state = window.nodes.get(node)
        boot_seen_at = state.boot_seen_at if state is not None else None
        since = now - t.window_seconds
        if boot_seen_at is not None:
            since = max(since, boot_seen_at)
        first = _first_at_or_after(series, since)
        if first >= len(series):
            return None  # nothing from this boot yet
        oldest = series[first]
        history = None if _quiet(oldest, newest, active) else _scan(series[first:])

        if active is False:
            issue = self._down(window, device, port, series, oldest, state, boot_seen_at, history)
            if issue is not None:
                return issue
        if history is not None and history.downs:
            return self._link_downs(device, port, newest, history)
        if active:
            earlier = history.max_active_rate if history is not None else None
            if oldest.active:
                oldest_rate = _number(oldest, "ib_rate_gbps")
                if oldest_rate is not None and (earlier is None or oldest_rate > earlier):
                    earlier = oldest_rate
            return self._rate_low(device, port, series, first, earlier, usual_rate)
        return None

    # --- the rules -------------------------------------------------------------------------------

    def _down(
        self,
        window: Window,
        device: str,
        port: int,
        series: Sequence[IbSample],
        oldest: IbSample,
        state: NodeState | None,
        boot_seen_at: float | None,
        history: _History | None,
    ) -> _PortIssue | None:
        t = self.thresholds
        now = window.now
        # When it was last ACTIVE: the engine remembers beyond the window; else what we see.
        last_active = state.ib_last_active.get((device, port)) if state is not None else None
        if history is not None:
            down_since = history.down_since
            if history.last_active is not None and (last_active is None or history.last_active > last_active):
                last_active = history.last_active
        else:
            # Nothing changed between the window's first sample and now: down all along.
            down_since = oldest.t
        if last_active is None or down_since is None:
            return None  # never ACTIVE (as far as we know): an unused port, not a down one
        if now - last_active > t.down_hold_limit_seconds:
            return None
        newest = series[-1]
        state_name = str(newest.metrics.get("ib_state"))
        evidence: dict[str, object] = {
            "device": device,
            "port": port,
            "condition": "down",
            "ib_state": state_name,
            "last_active": last_active,
        }
        if boot_seen_at is not None and last_active < boot_seen_at:
            # ACTIVE before the reboot, not yet since: give the subnet manager time.
            down_seconds = now - boot_seen_at
            if down_seconds < t.boot_grace_seconds:
                return None
            start = boot_seen_at
            summary = (
                f"{device} port {port} not ACTIVE since the node rebooted "
                f"{fmt_number(down_seconds)} s ago ({state_name})"
            )
        else:
            start = max(down_since, last_active)
            down_seconds = now - start
            if down_seconds < t.down_seconds:
                return None
            summary = f"{device} port {port} down for {fmt_number(down_seconds)} s ({state_name})"
        evidence["down_seconds"] = down_seconds
        if history is not None and history.downs:
            evidence["link_downs"] = len(history.downs)
            if len(history.downs) > 1:
                summary += f", {len(history.downs)} link-downs in the last {fmt_number(t.window_seconds)} s"
        self._counters(evidence, newest, history)
        return _PortIssue(device, port, "down", "critical", "drain", summary, start, evidence)

    def _link_downs(self, device: str, port: int, newest: IbSample, history: _History) -> _PortIssue:
        t = self.thresholds
        count = len(history.downs)
        flapping = count >= t.flap_count
        what = "flapping" if flapping else "link went down"
        times = "time" if count == 1 else "times"
        summary = f"{device} port {port} {what}: down {count} {times} in the last {fmt_number(t.window_seconds)} s"
        if newest.active:
            rate = _number(newest, "ib_rate_gbps")
            summary += ", ACTIVE again" + (f" at {fmt_number(rate)} Gb/s" if rate is not None else "")
        evidence: dict[str, object] = {
            "device": device,
            "port": port,
            "condition": "flapping" if flapping else "link_down",
            "link_downs": count,
            "state_transitions": history.transitions,
            "link_downed_increments": history.increments,
            "first_down": history.downs[0],
            "last_down": history.downs[-1],
        }
        state_name = newest.metrics.get("ib_state")
        if state_name is not None:
            evidence["ib_state"] = state_name
        self._counters(evidence, newest, history)
        if flapping:
            return _PortIssue(device, port, "flapping", "critical", "drain", summary, history.downs[0], evidence)
        return _PortIssue(
            device,
            port,
            "link_down",
            "warning",
            "inspect_hardware",
            summary,
            history.downs[0],
            evidence,
        )

    def _rate_low(
        self,
        device: str,
        port: int,
        series: Sequence[IbSample],
        first: int,
        earlier_rate: float | None,
        usual_rate: float | None,
    ) -> _PortIssue | None:
        newest = series[-1]
        rate = _number(newest, "ib_rate_gbps")
        expected = max((r for r in (earlier_rate, usual_rate) if r is not None), default=None)
        if rate is None or expected is None or rate >= expected:
            return None
        # How long has it been this slow? Walk back over the current low run (rare: slow ports).
        low_since = newest.t
        for index in range(len(series) - 1, first - 1, -1):
            sample = series[index]
            sample_rate = _number(sample, "ib_rate_gbps")
            if not sample.active or sample_rate is None or sample_rate >= expected:
                break
            low_since = sample.t
        if newest.t - low_since < self.thresholds.rate_low_seconds:
            return None
        basis = []
        if earlier_rate is not None and earlier_rate > rate:
            basis.append(f"{fmt_number(earlier_rate)} Gb/s earlier")
        if usual_rate is not None and usual_rate > rate:
            basis.append(f"{fmt_number(usual_rate)} Gb/s on its peers")
        summary = (
            f"{device} port {port} ACTIVE at {fmt_number(rate)} Gb/s for "
            f"{fmt_number(newest.t - low_since)} s, below {' and '.join(basis)}"
        )
        evidence: dict[str, object] = {
            "device": device,
            "port": port,
            "condition": "rate_low",
            "ib_rate_gbps": rate,
            "expected_rate_gbps": expected,
        }
        if earlier_rate is not None:
            evidence["earlier_rate_gbps"] = earlier_rate
        if usual_rate is not None:
            evidence["peer_rate_gbps"] = usual_rate
        return _PortIssue(device, port, "rate_low", "warning", "inspect_hardware", summary, low_since, evidence)

    @staticmethod
    def _counters(evidence: dict[str, object], newest: IbSample, history: _History | None) -> None:
        total = _number(newest, "ib_link_downed_total")
        if total is not None:
            evidence["ib_link_downed_total"] = int(total)
            if total >= LINK_DOWNED_MAX:
                evidence["link_downed_saturated"] = True
        if history is not None:
            for name, delta in history.deltas.items():
                if delta and name != "ib_link_downed_total":
                    evidence[name.replace("_total", "_increase")] = delta

    def _finding(self, node: str, issues: list[_PortIssue]) -> Finding:
        issues.sort(key=lambda i: (-i.rank[0], -i.rank[1], i.device, i.port))
        worst = issues[0]
        shown = [i.summary for i in issues[:3]]
        if len(issues) > 3:
            shown.append(f"{len(issues) - 3} more ports")
        summary = f"InfiniBand on {node}: " + "; ".join(shown)
        evidence: dict[str, object] = {
            "ports": [dict(i.evidence) for i in issues],
            "ports_affected": len(issues),
        }
        return Finding(
            detector=self.id,
            severity=worst.severity,
            action=worst.action,
            summary=summary,
            start=min(i.start for i in issues),
            node=node,
            evidence=evidence,
        )
