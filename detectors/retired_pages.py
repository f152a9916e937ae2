"""Retired-pages detector: pre-Ampere page retirement at its limit, or pages waiting to be retired.

Before Ampere, a GPU takes a framebuffer page with a double-bit error (or repeated single-bit
errors) out of use by retiring it; Ampere and later remap rows instead (row_remap), and Hopper
boards report the retirement fields as not supported, so on them this detector never fires.
Two findings per GPU, told apart by `key`, each holding while the newest sample shows it:

- `limit` (critical, inspect_hardware): single-bit plus double-bit retired pages at or over
  `max_retired_pages`. DCGM's memory health watch fails the GPU there (DCGM_FR_RETIRED_PAGES_LIMIT,
  next step: run the field diagnostic); Azure NHC fails a V100 node whose retirement table is
  full (62 pages or more with a retirement pending, azure_gpu_ecc.nhc). Retired pages are
  permanent, so the finding holds for as long as the GPU reports them.
- `pending` (warning, reset_gpu): `retired_pages_pending` is 1, a page is marked for retirement
  that takes effect at the next driver reload or GPU reset. DCGM warns
  (DCGM_FR_PENDING_PAGE_RETIREMENTS, "this GPU can still perform workload") and, when a DBE caused
  it, says "Drain the GPU and reset it or reboot the node" (DCGM_FR_DBE_PENDING_PAGE_RETIREMENTS);
  NVIDIA's dynamic page retirement guide logs it as XID 63, "reload the driver to activate".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.counters import flag_raised, newest_carrying, start_of_run, unsettled
from fleetwatch.detectors.model import Window, gpu_table
from fleetwatch.detectors.table import COLUMN, Condition, Rows
from fleetwatch.records import Finding

RETIRED_SBE = "retired_pages_sbe"
RETIRED_DBE = "retired_pages_dbe"
PENDING = "retired_pages_pending"
_FIELDS = (RETIRED_SBE, RETIRED_DBE, PENDING)


@dataclass(frozen=True, slots=True)
class RetiredPagesThresholds:
    # pages; SBE + DBE retired pages at or over this fail: DCGM_LIMIT_MAX_RETIRED_PAGES
    # (dcgm_gpu_hardware_limits.h; 60 until DCGM matched it to the field diagnostic)
    max_retired_pages: int = 63
    # s; the newest sample must be this recent to say anything about now; a quiet node is
    # node_silent's finding (as thermal)
    max_sample_age_seconds: float = 30.0
    # samples; a field missing from the newest sample (a failed read) is read from the newest of
    # this many, so one bad read does not close a finding (our choice)
    field_lookback_samples: int = 3

    def __post_init__(self) -> None:
        if self.field_lookback_samples < 1:
            raise ValueError("field_lookback_samples must be at least 1")
        if self.max_retired_pages < 1:
            raise ValueError("max_retired_pages must be at least 1")
        if self.max_sample_age_seconds <= 0:
            raise ValueError("max_sample_age_seconds must be positive")


def _retired(metrics: Mapping[str, float | int]) -> float | None:
    """SBE + DBE retired pages, from whichever of the two the GPU reports; None: neither."""
    sbe, dbe = metrics.get(RETIRED_SBE), metrics.get(RETIRED_DBE)
    if sbe is None and dbe is None:
        return None
    return float(sbe or 0) + float(dbe or 0)


@dataclass(slots=True)
class RetiredPagesDetector:
    """Newest GPU samples -> per GPU a `limit` and a `pending` finding while they hold."""

    thresholds: RetiredPagesThresholds = field(default_factory=RetiredPagesThresholds)
    id: ClassVar[str] = "retired_pages"

    @property
    def window_seconds(self) -> float:
        return self.thresholds.max_sample_age_seconds

    @property
    def gpu_fields(self) -> Mapping[str, float]:
        return dict.fromkeys(_FIELDS, self.window_seconds)

    @property
    def gpu_conditions(self) -> tuple[Condition, ...]:
        return (self.flagged,)

    @property
    def flagged(self) -> Condition:
        """Samples at the limit or with a retirement pending: a finding needs a fresh one."""
        limit = self.thresholds.max_retired_pages

        def test(rows: Rows) -> np.ndarray:
            sbe, dbe = rows[RETIRED_SBE], rows[RETIRED_DBE]
            at_limit = (np.fmax(sbe, 0.0) + np.fmax(dbe, 0.0) >= limit) & ((sbe == sbe) | (dbe == dbe))
            return at_limit | (rows[PENDING] >= 1)

        return Condition(f"retired_pages.flagged:{limit}", _FIELDS, test, 0.0)

    def detect(self, window: Window) -> list[Finding]:
        now = window.now
        table = gpu_table(window)
        limit = self.thresholds.max_retired_pages
        oldest_t = now - self.thresholds.max_sample_age_seconds
        findings = []
        lookback = self.thresholds.field_lookback_samples
        if not len(table) or table.latest_hit_t(self.flagged) < oldest_t:
            return []  # no fresh sample of any GPU at the limit or with a retirement pending
        # The whole fleet at once: retired pages under the limit and no retirement pending at the
        # newest sample (Ampere and later report none of these fields); the rest one by one.
        newest = table.newest_rows
        sbe, dbe = newest[:, COLUMN[RETIRED_SBE]], newest[:, COLUMN[RETIRED_DBE]]
        # SBE + DBE, either alone where the other is absent (fmax skips NaN; counts are >= 0).
        look = (np.fmax(sbe, 0.0) + np.fmax(dbe, 0.0) >= limit) & ((sbe == sbe) | (dbe == dbe))
        look |= newest[:, COLUMN[PENDING]] >= 1
        look |= unsettled(table, (RETIRED_SBE,), _FIELDS) | unsettled(table, (RETIRED_DBE,), _FIELDS)
        look |= unsettled(table, (PENDING,), _FIELDS)
        look &= table.fresh(self.thresholds.max_sample_age_seconds)
        if not np.count_nonzero(look):
            return []
        keys = table.keys
        for p in look.nonzero()[0].tolist():
            node, gpu = keys[p]
            series = table.series(p, _FIELDS)
            index = len(series) - 1
            counted = max(
                newest_carrying(series, index, RETIRED_SBE, oldest_t, lookback),
                newest_carrying(series, index, RETIRED_DBE, oldest_t, lookback),
            )
            retired = _retired(series[counted].metrics) if counted >= 0 else None
            if retired is not None and retired >= limit:
                latest = series[counted].metrics
                parts = ", ".join(
                    f"{latest[name]:g} {what}"
                    for name, what in ((RETIRED_SBE, "single-bit"), (RETIRED_DBE, "double-bit"))
                    if latest.get(name) is not None
                )
                findings.append(
                    Finding(
                        detector=self.id,
                        severity="critical",
                        action="inspect_hardware",
                        summary=(
                            f"GPU {gpu} on {node}: {retired:g} retired pages ({parts}), at or over the limit of {limit}"
                        ),
                        start=start_of_run(
                            series,
                            counted,
                            oldest_t,
                            (RETIRED_SBE, RETIRED_DBE),
                            lambda m: (_retired(m) or 0) >= limit,
                        ),
                        node=node,
                        gpu=gpu,
                        evidence=_evidence(latest, retired, limit),
                        key="limit",
                    )
                )
            pending = flag_raised(series, index, PENDING, oldest_t, lookback)
            if pending is not None:
                latest, start = pending
                findings.append(
                    Finding(
                        detector=self.id,
                        severity="warning",
                        action="reset_gpu",
                        summary=(
                            f"GPU {gpu} on {node}: page retirement pending, reset the GPU "
                            "(or reload the driver) to retire the pages"
                        ),
                        start=start,
                        node=node,
                        gpu=gpu,
                        evidence=_evidence(latest, _retired(latest), limit),
                        key="pending",
                    )
                )
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu, f.key))
        return findings


def _evidence(metrics: Mapping[str, float | int], retired: float | None, limit: int) -> dict[str, object]:
    evidence: dict[str, object] = {
        name: metrics[name] for name in (RETIRED_SBE, RETIRED_DBE, PENDING) if metrics.get(name) is not None
    }
    if retired is not None:
        evidence["retired_pages"] = retired
        evidence["limit"] = limit
    return evidence
