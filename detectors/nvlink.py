"""NVLink detector: a link that went down, or replay, recovery and CRC errors at DCGM's limits.

One finding per GPU (one fault shows several ways at once: a link that drops is retrained, which
counts a recovery; CRC errors are what make the link replay), critical, holding while either
condition does:

- Link down (action reboot): fewer links up (`nvlink_links_up`) than the GPU had earlier in the
  window with the same `nvlink_links_total`, or than its peers on the node have (a peer with all
  its links up and the same total: on an NVSwitch board every link of every GPU is up, so this
  keeps a link that stays down reported after the drop has left the window, and across a
  collector restart), for `link_down_samples` samples running. GPUs whose links are all down
  from the start on a node where none has them all up (NVLink unused, e.g. PCIe boards without
  bridges) are not reported. DCGM fails a GPU with a link down (DCGM_FR_NVLINK_DOWN), Azure NHC
  fails the node on any inactive link (azure_gpu_nvlink.nhc, NHC2016) and gpud suggests
  REBOOT_SYSTEM for inactive NVLinks; the XID the driver logs, 74, is critical / reboot in
  base/xid_catalog.csv.
- Errors (action inspect_hardware): within `error_window_seconds`, at least
  `replay_recovery_errors` replay or recovery errors, or CRC flit or data errors at
  `crc_errors_per_second` or more. These are DCGM's NVLink health rules: replay and recovery
  errors fail at 1 (DCGM_LIMIT_MAX_NVLINK_ERROR, DCGM_FR_NVLINK_ERROR_CRITICAL, "run the field
  diagnostic"); CRC errors fail at 100 a second (DCGM_LIMIT_MAX_NVLINK_CRC_ERROR: "RM has informed
  us that CRC errors only matter at rates of 100+ per second"). DCGM treats a single replay as a
  failure, so we do too; the threshold is here for fleets that see otherwise. CRC errors below
  their rate are listed in a finding's summary but raise none on their own (DCGM only warns:
  "Monitor the NVLink. It can still perform workload."). The finding holds `error_hold_seconds`
  after the last sample over a limit.

The counters are the agent's sums over the GPU's links. A value lower than the previous sample's
is a reset (driver reload, reboot), not errors; the sample after it is the new baseline. A counter
the GPU does not keep (e.g. CRC data on Hopper) is absent and judged by nothing.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.counters import (
    CounterWindows,
    FleetCounterWindows,
    counter_moved,
    newest_carrying_all,
    node_boot_seen_at,
    unsettled,
)
from fleetwatch.detectors.model import Window, gpu_table, held_episode
from fleetwatch.detectors.table import COLUMN, Condition, TableSeries, changed
from fleetwatch.records import Finding

UP, TOTAL = "nvlink_links_up", "nvlink_links_total"
# (field, what the summary calls one, is it a CRC counter judged by its rate per second)
COUNTERS = (
    ("nvlink_replay_errors_total", "replay", False),
    ("nvlink_recovery_errors_total", "recovery", False),
    ("nvlink_crc_flit_errors_total", "CRC flit error", True),
    ("nvlink_crc_data_errors_total", "CRC data error", True),
)
_COUNTER_NAMES = tuple(name for name, _, _ in COUNTERS)
_FIELDS = (UP, TOTAL, *_COUNTER_NAMES)
_UP, _TOTAL = COLUMN[UP], COLUMN[TOTAL]
# Samples with fewer links up than the GPU has, and samples whose error counts differ from the
# GPU's sample before: a link down needs a fresh one, counted errors a moved count.
_DOWN = Condition("nvlink.down", (UP, TOTAL), lambda rows: rows[UP] < rows[TOTAL], 0.0)
_MOVED = Condition("nvlink.moved", _COUNTER_NAMES, lambda rows: changed(rows, _COUNTER_NAMES), 0.0, uses_prior=True)
_PLURALS = {"replay": "replays", "recovery": "recoveries"}


@dataclass(frozen=True, slots=True)
class NvlinkThresholds:
    # errors in one window; replay or recovery errors that fail the GPU:
    # DCGM_LIMIT_MAX_NVLINK_ERROR (dcgm_gpu_hardware_limits.h)
    replay_recovery_errors: int = 1
    # errors/s; CRC flit or data errors that fail the GPU: DCGM_LIMIT_MAX_NVLINK_CRC_ERROR
    # ("RM has informed us that CRC errors only matter at rates of 100+ per second")
    crc_errors_per_second: float = 100.0
    # s; errors are counted over this window: DCGM's NVLink health watch window (one minute)
    error_window_seconds: float = 60.0
    # s; an error finding outlives its last over-limit sample by this, so errors hovering at a
    # limit do not flap (our choice)
    error_hold_seconds: float = 120.0
    # samples; fewer links up on this many samples running is a link down, one odd reading is
    # not (our choice)
    link_down_samples: int = 2
    # s; the newest sample must be this recent to say anything about now; a quiet node is
    # node_silent's finding (as thermal)
    max_sample_age_seconds: float = 30.0
    # samples; a field missing from the newest sample (a failed read) is read from the newest of
    # this many, so one bad read does not close a finding (our choice)
    field_lookback_samples: int = 3

    def __post_init__(self) -> None:
        if self.field_lookback_samples < 1:
            raise ValueError("field_lookback_samples must be at least 1")
        if self.replay_recovery_errors < 1 or self.crc_errors_per_second <= 0:
            raise ValueError("error limits must be positive")
        if self.error_window_seconds <= 0 or self.max_sample_age_seconds <= 0:
            raise ValueError("error_window_seconds and max_sample_age_seconds must be positive")
        if self.error_hold_seconds < 0:
            raise ValueError("error_hold_seconds must not be negative")
        if self.link_down_samples < 1:
            raise ValueError("link_down_samples must be at least 1")


def _count(count: float, noun: str) -> str:
    return f"{count:g} {noun if count == 1 else _PLURALS.get(noun, noun + 's')}"


@dataclass(slots=True)
class _LinkDown:
    start: float
    up: float
    total: float
    expected: float  # links up before the drop, or on the node's healthy peers
    by_peers: bool


@dataclass(slots=True)
class _Counter:
    """One error counter's readings in the window and its counts over the error window."""

    name: str
    noun: str
    windows: CounterWindows
    over: list[int]  # indexes of the points whose window reached the limit


@dataclass(slots=True)
class _Errors:
    start: float
    seconds: float
    totals: dict[str, float]  # summary noun -> errors since the episode's first window
    in_window: dict[str, float]  # field -> errors in the newest error window


@dataclass(slots=True)
class NvlinkDetector:
    """GPU samples -> one finding per GPU with a link down or NVLink errors over DCGM's limits."""

    thresholds: NvlinkThresholds = field(default_factory=NvlinkThresholds)
    id: ClassVar[str] = "nvlink"

    @property
    def window_seconds(self) -> float:
        t = self.thresholds
        return max(t.error_window_seconds + t.error_hold_seconds, t.max_sample_age_seconds)

    @property
    def gpu_fields(self) -> Mapping[str, float]:
        return dict.fromkeys(_FIELDS, self.window_seconds)

    @property
    def gpu_conditions(self) -> tuple[Condition, ...]:
        return (_DOWN, _MOVED)

    def detect(self, window: Window) -> list[Finding]:
        now = window.now
        table = gpu_table(window)
        if not len(table):
            return []
        oldest_t = now - self.thresholds.max_sample_age_seconds
        if table.latest_hit_t(_DOWN) < oldest_t and table.latest_hit_t(_MOVED) <= now - self.window_seconds:
            return []  # no GPU with a link down lately, no error count moved in the window
        lookback = self.thresholds.field_lookback_samples
        # The whole fleet at once: links all up (or none to compare) at the newest sample and every
        # counter equal at both ends of the window; only the other GPUs are looked at one by one.
        newest = table.newest_rows
        up, total = newest[:, _UP], newest[:, _TOTAL]
        fresh = table.fresh(self.thresholds.max_sample_age_seconds)
        link_look = ((up < total) | unsettled(table, (UP, TOTAL), _FIELDS)) & fresh
        keys = table.keys
        # The error counts of every GPU whose counter may have moved, gathered in one go per
        # counter; only GPUs over a limit within the hold can hold an error finding.
        th = self.thresholds
        counted: dict[str, FleetCounterWindows] = {}
        rated: set[int] = set()
        for name, _, is_crc in COUNTERS:
            old, new = table.first_column(name, _FIELDS), newest[:, COLUMN[name]]
            moved = np.flatnonzero((old != new) & ((old == old) | (new == new)) & fresh).tolist()  # not both absent
            boots = [node_boot_seen_at(window, keys[p][0]) for p in moved]
            since, seconds = now - self.window_seconds, th.error_window_seconds
            counted[name] = FleetCounterWindows(table, moved, name, _FIELDS, since, now, seconds, boots)
            limit = th.crc_errors_per_second * th.error_window_seconds if is_crc else th.replay_recovery_errors
            rated |= counted[name].may_hold(float(limit), now - th.error_hold_seconds)
        look = link_look.copy()
        look[list(rated)] = True
        if not np.count_nonzero(look):
            return []
        # Per node, the link totals of GPUs whose links are all up: the peers a GPU is held to. Only
        # the nodes of GPUs that may have a link down need them (a fleet-wide loop each pass else).
        all_up: dict[str, set[float]] = {}
        suspect = {keys[p][0] for p in np.flatnonzero(link_look & ~(up >= total)).tolist()}
        healthy = fresh & (total > 0) & (up >= total)
        for p in np.flatnonzero(healthy).tolist() if suspect else ():
            if keys[p][0] in suspect:
                all_up.setdefault(keys[p][0], set()).add(float(total[p]))
        for p in np.flatnonzero(np.isnan(up + total) & link_look).tolist():  # counts missing here
            series = table.series(p, _FIELDS)
            links = newest_carrying_all(series, len(series) - 1, (UP, TOTAL), oldest_t, lookback)
            if links >= 0:
                gpu_up, gpu_total = series.values(UP)[links], series.values(TOTAL)[links]
                if gpu_up is not None and gpu_total is not None and 0 < gpu_total <= gpu_up:
                    all_up.setdefault(keys[p][0], set()).add(float(gpu_total))

        findings = []
        for p in look.nonzero()[0].tolist():
            node, gpu = keys[p]
            series = table.series(p, _FIELDS)
            index = len(series) - 1
            down = errors = None
            if link_look[p]:
                links = newest_carrying_all(series, index, (UP, TOTAL), oldest_t, lookback)
                if links >= 0 and (series.values(UP)[links] or 0) < (series.values(TOTAL)[links] or 0):
                    down = self._link_down(series, links, now, all_up.get(node, set()))
            for name in _COUNTER_NAMES if p in rated else ():
                if counted[name].get(p) is not None and self._moved(series, index, name):
                    errors = self._errors(p, series, index, now, node_boot_seen_at(window, node), counted)
                    break
            if down is not None or errors is not None:
                findings.append(self._finding(node, gpu, down, errors))
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu))
        return findings

    # --- links down ----------------------------------------------------------------------------

    def _link_down(
        self,
        series: TableSeries,
        index: int,
        now: float,
        peers_all_up: set[float],
    ) -> _LinkDown | None:
        """`peers_all_up`: the link totals of the node's GPUs that have every link up."""
        times, ups, totals = series.times(), series.values(UP), series.values(TOTAL)
        up, total = float(ups[index] or 0.0), float(totals[index] or 0.0)  # the caller saw up < total
        # `index` is the newest sample with the counts; the run below starts from it.
        oldest_t = now - self.window_seconds
        # Peers: another GPU of the node with the same links, all up (this GPU is not among them).
        by_peers = total in peers_all_up
        expected = total if by_peers else up
        if not by_peers:
            # Earlier in the window with the same total: was any sample's count higher? A count
            # equal at both ends of the kept series has not dropped (the fast path).
            if totals[0] == total and ups[0] == up:
                return None
            for i in range(len(times) - 1, -1, -1):
                t = times[i]
                if t > now:
                    continue
                if t < oldest_t:
                    break
                sample_up = ups[i]
                if totals[i] == total and sample_up is not None and sample_up > expected:
                    expected = float(sample_up)
            if expected <= up:
                return None
        # The run of samples with fewer links up than expected, ending at the newest sample.
        run = 0
        start = times[index]
        for i in range(index, -1, -1):
            if times[i] < oldest_t:
                break
            sample_up, sample_total = ups[i], totals[i]
            if sample_up is None or sample_total is None:
                continue
            if sample_total != total or sample_up >= expected:
                break
            run += 1
            start = times[i]
        if run < self.thresholds.link_down_samples:
            return None
        return _LinkDown(start=start, up=up, total=total, expected=expected, by_peers=by_peers)

    # --- error counters ------------------------------------------------------------------------

    def _moved(self, series: TableSeries, index: int, name: str) -> bool:
        """Whether counter `name` may have moved in the kept series. A counter that reads the same
        at both ends has not (a reset that climbed back to the same value in between is missed);
        one absent at both ends is one the GPU does not keep (CRC data on Hopper, every counter on
        a board without NVLink)."""
        values = series.values(name)
        if values[0] == values[index]:
            return False  # the fast path, taken too by a counter absent at both ends
        return counter_moved(series, index, name, self.thresholds.field_lookback_samples)

    def _errors(
        self,
        p: int,
        series: TableSeries,
        index: int,
        now: float,
        boot_seen_at: float | None,
        counted: Mapping[str, FleetCounterWindows],
    ) -> _Errors | None:
        """GPU p's errors held at `now`; `counted`: per counter, the windows of the GPUs whose
        counter may have moved."""
        t = self.thresholds
        moved: list[_Counter] = []
        for name, noun, is_crc in COUNTERS:
            windows = counted[name].get(p)
            if windows is None or not self._moved(series, index, name):
                continue
            if is_crc:
                limit = t.crc_errors_per_second * t.error_window_seconds
            else:
                limit = t.replay_recovery_errors
            over = windows.over(limit)
            moved.append(_Counter(name, noun, windows, over))
        times = {c.name: c.windows.t.tolist() for c in moved}
        violations = sorted({times[c.name][i] for c in moved for i in c.over})
        episode = held_episode(violations, now, t.error_hold_seconds, boot_seen_at)
        if not episode:
            return None
        start = episode[0]
        # Errors are counted from the sample the episode's first over-limit window started at.
        since = min(times[c.name][c.windows.bases[i]] for c in moved for i in c.over if times[c.name][i] == start)
        totals: dict[str, float] = {}
        in_window: dict[str, float] = {}
        last_t = since
        for c in moved:
            base = max(bisect_right(times[c.name], since) - 1, 0)
            total = c.windows.increase_since(base)
            if total > 0:
                totals[c.noun] = total
            in_window[c.name] = float(c.windows.counts[-1])
            last_t = max(last_t, times[c.name][-1])
        return _Errors(start=start, seconds=last_t - since, totals=totals, in_window=in_window)

    # --- the finding ---------------------------------------------------------------------------

    def _finding(self, node: str, gpu: int, down: _LinkDown | None, errors: _Errors | None) -> Finding:
        parts = []
        evidence: dict[str, object] = {}
        starts = []
        if down is not None:
            lost = down.expected - down.up
            link = "link" if lost == 1 else "links"
            against = "its peers have all" if down.by_peers else "earlier"
            parts.append(f"{lost:g} NVLink {link} down ({down.up:g} of {down.total:g} up, {against} {down.expected:g})")
            evidence.update(
                {
                    "nvlink_links_up": down.up,
                    "nvlink_links_total": down.total,
                    "links_expected_up": down.expected,
                    "links_down": lost,
                }
            )
            starts.append(down.start)
        if errors is not None:
            listed = ", ".join(
                _count(total, noun) + (f" ({total / errors.seconds:.3g}/s)" if "CRC" in noun and errors.seconds else "")
                for noun, total in errors.totals.items()
            )
            parts.append(f"NVLink errors in the last {errors.seconds:g} s: {listed}")
            evidence["errors"] = dict(errors.totals)
            evidence["seconds"] = errors.seconds
            evidence["in_window"] = dict(errors.in_window)
            evidence["window_seconds"] = self.thresholds.error_window_seconds
            starts.append(errors.start)
        return Finding(
            detector=self.id,
            severity="critical",
            action="reboot" if down is not None else "inspect_hardware",
            summary=f"GPU {gpu} on {node}: " + "; ".join(parts),
            start=min(starts),
            node=node,
            gpu=gpu,
            evidence=evidence,
        )
