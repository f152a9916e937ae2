"""ECC detector: volatile double-bit errors, and single-bit errors arriving faster than DCGM allows.

Two findings per GPU, told apart by `key`:

- `dbe` (critical, reset_gpu): the volatile double-bit (uncorrectable) count is above zero. DCGM's
  memory health watch fails a GPU for any volatile DBE (DcgmHealthWatch::MonitorMemVolatileDbes,
  DCGM_FR_VOLATILE_DBE_DETECTED) and says "Drain the GPU and reset it or reboot the node"
  (DCGM_FR_VOLATILE_DBE_DETECTED_NEXT); reset_gpu is the lighter of the two and the scheduler
  drains a GPU before anyone resets it. Volatile counts start from 0 at every driver load, so the
  condition holds until the GPU is reset, the driver reloaded or the node rebooted, and the
  finding with it: a DBE does not heal by waiting. `start` is the first sample showing the errors
  (the sample where the count rose, when that is still in the window). Following DCGM, a GPU that
  already carries volatile DBEs when watching starts is reported too: it has not been reset since.
- `sbe_rate` (warning, inspect_hardware): at least `sbe_per_window` new single-bit (corrected)
  errors within `sbe_window_seconds`. DCGM's memory health watch warns at 10 volatile SBEs in its
  one-minute window (DCGM_LIMIT_MAX_SBE_RATE, DCGM_FR_VOLATILE_SBE_DETECTED); a climbing SBE rate
  is what the driver reports as XID 92 ("High single-bit ECC error rate", warning and
  inspect_hardware in base/xid_catalog.csv). A one-off SBE is healthy noise and never fires.
  The finding holds `sbe_hold_seconds` after the last sample over the limit.

Counters: a value lower than the previous sample's is a reset (driver reload, reboot, GPU reset),
not an error; the sample after it is the new baseline. A field the GPU does not report is absent
and its rule does not run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.counters import (
    CounterWindows,
    FleetCounterWindows,
    counter_moved,
    ends_moved,
    held_over_limit,
    newest_carrying,
    node_boot_seen_at,
    unsettled,
)
from fleetwatch.detectors.model import Window, fmt_count, gpu_table
from fleetwatch.detectors.table import COLUMN, Condition, TableSeries, changed
from fleetwatch.records import Finding

DBE = "ecc_dbe_volatile_total"
SBE = "ecc_sbe_volatile_total"
_FIELDS = (DBE, SBE)
_DBE_COLUMN = COLUMN[DBE]
# Samples with volatile DBEs, and samples whose SBE count differs from the GPU's sample before:
# where none came lately, no GPU has anything to report (counted errors need the count to move).
_DBE_SEEN = Condition("ecc.dbe", (DBE,), lambda rows: rows[DBE] > 0, 0.0)
_SBE_MOVED = Condition("ecc.sbe_moved", (SBE,), lambda rows: changed(rows, (SBE,)), 0.0, uses_prior=True)


@dataclass(frozen=True, slots=True)
class EccThresholds:
    # errors; new SBEs in one window that warn: DCGM_LIMIT_MAX_SBE_RATE (dcgm_gpu_hardware_limits.h)
    sbe_per_window: int = 10
    # s; the window SBEs are counted over: DCGM's health watch default (the minute before a check)
    sbe_window_seconds: float = 60.0
    # s; an SBE finding outlives its last over-limit sample by this, so a rate hovering at the
    # limit does not flap (our choice)
    sbe_hold_seconds: float = 120.0
    # s; the newest sample must be this recent to say anything about now; a quiet node is
    # node_silent's finding (as thermal)
    max_sample_age_seconds: float = 30.0
    # samples; a field missing from the newest sample (a failed read) is read from the newest of
    # this many, so one bad read does not close a finding (our choice)
    field_lookback_samples: int = 3

    def __post_init__(self) -> None:
        if self.field_lookback_samples < 1:
            raise ValueError("field_lookback_samples must be at least 1")
        if self.sbe_per_window < 1:
            raise ValueError("sbe_per_window must be at least 1")
        if self.sbe_window_seconds <= 0 or self.max_sample_age_seconds <= 0:
            raise ValueError("sbe_window_seconds and max_sample_age_seconds must be positive")
        if self.sbe_hold_seconds < 0:
            raise ValueError("sbe_hold_seconds must not be negative")


@dataclass(slots=True)
class EccDetector:
    """GPU samples -> per GPU a `dbe` finding (volatile DBEs) and an `sbe_rate` finding."""

    thresholds: EccThresholds = field(default_factory=EccThresholds)
    id: ClassVar[str] = "ecc"

    @property
    def window_seconds(self) -> float:
        t = self.thresholds
        return max(t.sbe_window_seconds + t.sbe_hold_seconds, t.max_sample_age_seconds)

    @property
    def gpu_fields(self) -> Mapping[str, float]:
        return dict.fromkeys(_FIELDS, self.window_seconds)

    @property
    def gpu_conditions(self) -> tuple[Condition, ...]:
        return (_DBE_SEEN, _SBE_MOVED)

    def detect(self, window: Window) -> list[Finding]:
        now = window.now
        table = gpu_table(window)
        if not len(table):
            return []
        # Nothing in the whole fleet: no DBE read while fresh, no SBE count moved in the window.
        if (
            table.latest_hit_t(_DBE_SEEN) < now - self.thresholds.max_sample_age_seconds
            and table.latest_hit_t(_SBE_MOVED) <= now - self.window_seconds
        ):
            return []
        fresh_t = now - self.thresholds.max_sample_age_seconds
        lookback = self.thresholds.field_lookback_samples
        # The whole fleet at once: most GPUs read no volatile DBE at their newest sample and the
        # same SBE count at both ends of the window; only the others are looked at one by one.
        dbe = table.newest_rows[:, _DBE_COLUMN]
        fresh = table.fresh(self.thresholds.max_sample_age_seconds)
        dbe_look = ((dbe > 0) | unsettled(table, (DBE,), _FIELDS)) & fresh
        sbe_moved = ends_moved(table, SBE, _FIELDS, lookback) & fresh
        if not np.count_nonzero(dbe_look | sbe_moved):
            return []
        keys = table.keys
        moved = np.flatnonzero(sbe_moved).tolist()
        boots = [node_boot_seen_at(window, keys[p][0]) for p in moved]
        th = self.thresholds
        sbe = FleetCounterWindows(
            table, moved, SBE, _FIELDS, now - self.window_seconds, now, th.sbe_window_seconds, boots
        )
        # Only GPUs over the limit within the hold can hold a rate finding: a stray SBE stops here.
        rated = sbe.may_hold(float(th.sbe_per_window), now - th.sbe_hold_seconds)
        findings = []
        for p in sorted(set(np.flatnonzero(dbe_look).tolist()) | rated):
            node, gpu = keys[p]
            series = table.series(p, _FIELDS)
            index = len(series) - 1
            if dbe_look[p]:
                index_dbe = newest_carrying(series, index, DBE, fresh_t, lookback)
                if index_dbe >= 0 and (series.values(DBE)[index_dbe] or 0) > 0:
                    findings.append(self._dbe(node, gpu, series, index_dbe, now))
            windows = sbe.get(p)
            if p in rated and windows is not None and counter_moved(series, index, SBE, lookback):
                finding = self._sbe_rate(node, gpu, windows, now, node_boot_seen_at(window, node))
                if finding is not None:
                    findings.append(finding)
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu, f.key))
        return findings

    def _dbe(self, node: str, gpu: int, series: TableSeries, index: int, now: float) -> Finding:
        times, values = series.times(), series.values(DBE)
        total = float(values[index] or 0.0)
        # Walk back over the run of samples that show these errors: it ends (going back) at a
        # sample with none, at a reset (an older value above a newer one) or at the window's edge.
        oldest_t = now - self.window_seconds
        start = times[index]
        newer = total
        baseline = None
        for i in range(index, -1, -1):
            if times[i] < oldest_t:
                break
            value = values[i]
            if value is None:
                continue
            if value <= 0:
                baseline = 0.0
                break
            if value > newer:
                break  # reset between this sample and the newer one: the run began after it
            start = times[i]
            newer = value
        evidence: dict[str, object] = {"ecc_dbe_volatile_total": total}
        if baseline is not None:
            new = total - baseline
            evidence["new_dbe"] = new
            what = f"{fmt_count(new, 'new double-bit ECC error')} (volatile total {total:g})"
        else:
            what = f"{fmt_count(total, 'double-bit ECC error')} since the driver loaded (volatile total {total:g})"
        return Finding(
            detector=self.id,
            severity="critical",
            action="reset_gpu",
            summary=f"GPU {gpu} on {node}: {what}",
            start=start,
            node=node,
            gpu=gpu,
            evidence=evidence,
            key="dbe",
        )

    def _sbe_rate(
        self,
        node: str,
        gpu: int,
        windows: CounterWindows,
        now: float,
        boot_seen_at: float | None,
    ) -> Finding | None:
        t = self.thresholds
        over = windows.over(t.sbe_per_window)
        episode = held_over_limit(windows, over, now, t.sbe_hold_seconds, boot_seen_at)
        if episode is None:
            return None
        new, seconds = episode.increase, episode.seconds
        return Finding(
            detector=self.id,
            severity="warning",
            action="inspect_hardware",
            summary=(
                f"GPU {gpu} on {node}: {fmt_count(new, 'single-bit ECC error')} in the last "
                f"{seconds:g} s "
                f"(limit {t.sbe_per_window} in {t.sbe_window_seconds:g} s)"
            ),
            start=episode.start,
            node=node,
            gpu=gpu,
            evidence={
                "sbe_new": new,
                "seconds": seconds,
                "sbe_in_window": float(windows.counts[-1]),
                "window_seconds": t.sbe_window_seconds,
                "limit": t.sbe_per_window,
                "ecc_sbe_volatile_total": float(windows.values[-1]),
            },
            key="sbe_rate",
        )
