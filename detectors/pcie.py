"""PCIe detector: a replay rate above what the link's bit error rate allows, or a downtrained link.

Two findings per GPU, told apart by `key`:

- `replay_rate` (warning, inspect_hardware): more PCIe replays in `replay_window_seconds` than a
  healthy link makes. DCGM's PCIe health watch expects at most a bit error rate of 1e-12 per
  lane, i.e. ceil(1e-12 x lane rate x 60 s x width) replays a minute (Gen5 x16: 31, Gen4 x16: 16,
  Gen3 x16: 8), and warns above it (DcgmHealthWatch::GetExpectedPcieReplayRate,
  DCGM_FR_PCI_REPLAY_RATE, next step "Reconnect PCIe card. Run system side PCIE diagnostic
  utilities..."); where the link's generation or width is unknown, the older fixed limit of
  8 a minute applies (DCGM_LIMIT_MAX_PCIREPLAY_RATE, "the maximum recommended by RM"). The
  finding holds `replay_hold_seconds` after the last sample over the limit.
- `link` (warning, inspect_hardware): the link trained below its maximum width
  (`pcie_link_width` < `pcie_link_width_max`) or, while the GPU is busy, below its maximum
  generation (`pcie_link_gen` < `pcie_link_gen_max`), for `link_samples` samples running. GPUs
  lower the link generation when idle to save power ("These may be reduced when the GPU is not in
  use", nvidia-smi's pcie.link.gen.current), so the generation is only judged on samples with
  `gpu_util_percent` at or above `busy_util_percent`; a width below the maximum has no such
  excuse (a GPU in a Gen5 x16 slot that comes up at x8 is one of the commonest PCIe faults; the
  StepFun fault trace counts "PCIe link width low" among its GPU faults). NVML's maximums are
  already what the slot and the GPU together allow, so a Gen4 host is not a Gen5 GPU's fault.

Counters: a replay count lower than the previous sample's is a reset, not replays; the sample after
it is the new baseline. A field the GPU does not report is absent and its rule does not run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.counters import (
    CounterWindows,
    FleetCounterWindows,
    counter_moved,
    ends_moved,
    float_reading,
    held_over_limit,
    newest_carrying_all,
    node_boot_seen_at,
    unsettled,
)
from fleetwatch.detectors.model import Window, fmt_count, gpu_table
from fleetwatch.detectors.table import COLUMN, Condition, GpuTable, Rows, TableSeries, changed
from fleetwatch.records import Finding

REPLAYS = "pcie_replay_total"
GEN, GEN_MAX = "pcie_link_gen", "pcie_link_gen_max"
WIDTH, WIDTH_MAX = "pcie_link_width", "pcie_link_width_max"
UTIL = "gpu_util_percent"
_FIELDS = (REPLAYS, GEN, GEN_MAX, WIDTH, WIDTH_MAX, UTIL)
# Samples whose replay count differs from the GPU's sample before: counted replays need one.
_REPLAYS_MOVED = Condition(
    "pcie.replays_moved", (REPLAYS,), lambda rows: changed(rows, (REPLAYS,)), 0.0, uses_prior=True
)

# GT/s per lane of PCIe generations 1-6 (the PCIe specifications; DCGM's table is the same).
LANE_GIGATRANSFERS_PER_SECOND = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}


@dataclass(frozen=True, slots=True)
class PcieThresholds:
    # errors per bit; the bit error rate per lane DCGM's replay rule allows
    # (DcgmHealthWatch::GetExpectedPcieReplayRate)
    replay_bit_error_rate: float = 1e-12
    # replays a minute; the limit when gen or width is unknown: DCGM_LIMIT_MAX_PCIREPLAY_RATE,
    # "8 replays per minute is the maximum recommended by RM"
    fallback_replays_per_minute: float = 8.0
    # s; replays are counted over this window: DCGM's PCIe health watch window (one minute)
    replay_window_seconds: float = 60.0
    # s; a replay finding outlives its last over-limit sample by this, so a rate hovering at the
    # limit does not flap (our choice)
    replay_hold_seconds: float = 120.0
    # samples; a link below its maximum on this many judged samples running fires, not a reading
    # taken mid-retrain (our choice)
    link_samples: int = 5
    # samples; the generation is judged on the busy ones among the newest this many, so a short
    # dip in load neither hides nor closes a finding (our choice)
    link_lookback_samples: int = 10
    # %; gpu_util_percent from which the link must run at its maximum generation (our choice;
    # training keeps GPUs at 90-100 %)
    busy_util_percent: float = 50.0
    # bool; judge the width on busy samples only, like the generation (off: a narrow link is a
    # fault even when idle, though nvidia-smi's docs say width too "may be reduced" when idle)
    width_requires_busy: bool = False
    # s; the newest sample must be this recent to say anything about now; a quiet node is
    # node_silent's finding (as thermal)
    max_sample_age_seconds: float = 30.0
    # samples; a field missing from the newest sample (a failed read) is read from the newest of
    # this many, so one bad read does not close a finding (our choice)
    field_lookback_samples: int = 3

    def __post_init__(self) -> None:
        if self.field_lookback_samples < 1:
            raise ValueError("field_lookback_samples must be at least 1")
        if self.replay_bit_error_rate <= 0 or self.fallback_replays_per_minute <= 0:
            raise ValueError("replay limits must be positive")
        if self.replay_window_seconds <= 0 or self.max_sample_age_seconds <= 0:
            raise ValueError("replay_window_seconds and max_sample_age_seconds must be positive")
        if self.replay_hold_seconds < 0:
            raise ValueError("replay_hold_seconds must not be negative")
        if not 1 <= self.link_samples <= self.link_lookback_samples:
            raise ValueError("need 1 <= link_samples <= link_lookback_samples")

    def replay_limit(self, gen: float | None, width: float | None) -> float:
        """Replays allowed in one replay window on a link running at `gen` x `width`."""
        if gen is None or width is None or gen < 1 or width < 1:
            return self.fallback_replays_per_minute * self.replay_window_seconds / 60.0
        lane = LANE_GIGATRANSFERS_PER_SECOND[min(int(gen), max(LANE_GIGATRANSFERS_PER_SECOND))]
        expected = self.replay_bit_error_rate * lane * 1e9 * self.replay_window_seconds * width
        return float(math.ceil(round(expected, 6)))  # DCGM ceils; round away float noise first


def _link_name(gen: float | None, width: float | None) -> str:
    """E.g. "Gen5 x16", or what of it is known."""
    parts = ([f"Gen{gen:g}"] if gen is not None else []) + ([f"x{width:g}"] if width is not None else [])
    return " ".join(parts)


def _below(series: TableSeries, index: int, name: str, name_max: str) -> bool:
    """Whether sample `index` reads `name` below `name_max` (False where it lacks either)."""
    value, maximum = series.values(name)[index], series.values(name_max)[index]
    return value is not None and maximum is not None and value < maximum


@dataclass(slots=True)
class PcieDetector:
    """GPU samples -> per GPU a `replay_rate` finding and a `link` (downtrained) finding."""

    thresholds: PcieThresholds = field(default_factory=PcieThresholds)
    id: ClassVar[str] = "pcie"

    @property
    def window_seconds(self) -> float:
        t = self.thresholds
        return max(t.replay_window_seconds + t.replay_hold_seconds, t.max_sample_age_seconds)

    @property
    def gpu_fields(self) -> Mapping[str, float]:
        return dict.fromkeys(_FIELDS, self.window_seconds)

    @property
    def gpu_conditions(self) -> tuple[Condition, ...]:
        return (self.link_low, _REPLAYS_MOVED)

    @property
    def link_low(self) -> Condition:
        """Samples a link rule judges low: width below its maximum, or (busy) the generation."""
        busy = self.thresholds.busy_util_percent
        width_busy = self.thresholds.width_requires_busy

        def test(rows: Rows) -> np.ndarray:
            busy_now = rows[UTIL] >= busy
            width_low = rows[WIDTH] < rows[WIDTH_MAX]
            if width_busy:
                width_low &= busy_now
            return width_low | ((rows[GEN] < rows[GEN_MAX]) & busy_now)

        return Condition(f"pcie.link_low:{busy!r}:{width_busy}", (GEN, GEN_MAX, WIDTH, WIDTH_MAX, UTIL), test, 0.0)

    def detect(self, window: Window) -> list[Finding]:
        now = window.now
        table = gpu_table(window)
        if not len(table):
            return []
        since = now - self.window_seconds
        if table.latest_hit_t(self.link_low) <= since and table.latest_hit_t(_REPLAYS_MOVED) <= since:
            return []  # no GPU read its link low, nor a replay count move, in the window
        fresh_t = now - self.thresholds.max_sample_age_seconds
        lookback = self.thresholds.field_lookback_samples
        th = self.thresholds
        fresh = table.fresh(th.max_sample_age_seconds)
        link_look = self._may_find(table, now) & fresh
        replays_moved = ends_moved(table, REPLAYS, _FIELDS, lookback) & fresh
        if not np.count_nonzero(link_look | replays_moved):
            return []
        keys = table.keys
        moved = np.flatnonzero(replays_moved).tolist()
        boots = [node_boot_seen_at(window, keys[p][0]) for p in moved]
        since = now - self.window_seconds
        replay_windows = FleetCounterWindows(
            table, moved, REPLAYS, _FIELDS, since, now, th.replay_window_seconds, boots
        )
        # Only GPUs over their link's limit within the hold can hold a replay finding: the limit
        # from the newest sample's link, as the rule takes it where that carries the link's
        # readings (newest_carrying_all); none (every GPU kept) where it lacks one.
        newest = table.newest_rows[moved]
        settled = ~np.isnan(newest[:, [COLUMN[GEN], COLUMN[GEN_MAX], COLUMN[WIDTH], COLUMN[WIDTH_MAX]]]).any(axis=1)
        limits = {
            p: th.replay_limit(gen, width)
            for p, gen, width, known in zip(
                moved, newest[:, COLUMN[GEN]].tolist(), newest[:, COLUMN[WIDTH]].tolist(), settled.tolist(), strict=True
            )
            if known
        }
        rated = replay_windows.may_hold(limits, now - th.replay_hold_seconds, strictly=True)
        findings = []
        for p in sorted(set(np.flatnonzero(link_look).tolist()) | rated):
            node, gpu = keys[p]
            series = table.series(p, _FIELDS)
            index = len(series) - 1
            widths = newest_carrying_all(series, index, (WIDTH, WIDTH_MAX), fresh_t, lookback)
            gens = newest_carrying_all(series, index, (GEN, GEN_MAX), fresh_t, lookback)
            if link_look[p]:
                link = self._link(node, gpu, series, widths, gens, now)
                if link is not None:
                    findings.append(link)
            windows = replay_windows.get(p)
            if p in rated and windows is not None and counter_moved(series, index, REPLAYS, lookback):
                gen = series.values(GEN)[gens] if gens >= 0 else None
                width = series.values(WIDTH)[widths] if widths >= 0 else None
                replays = self._replay_rate(node, gpu, windows, gen, width, now, node_boot_seen_at(window, node))
                if replays is not None:
                    findings.append(replays)
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu, f.key))
        return findings

    def _may_find(self, table: GpuTable, now: float) -> np.ndarray:
        """Per GPU, whether it needs the per-GPU link rules: its newest link
        reading is below its maximum (for the generation: with enough busy samples among the
        newest for a run), or a reading is missing (a failed read: the rules look further back)."""
        t = self.thresholds
        newest = table.newest_rows
        width, width_max = newest[:, COLUMN[WIDTH]], newest[:, COLUMN[WIDTH_MAX]]
        gen, gen_max = newest[:, COLUMN[GEN]], newest[:, COLUMN[GEN_MAX]]
        look = width < width_max
        look |= unsettled(table, (WIDTH, WIDTH_MAX), _FIELDS) | unsettled(table, (GEN, GEN_MAX), _FIELDS)
        gen_low = np.flatnonzero((gen < gen_max) & ~look)
        if len(gen_low):
            # _run_start judges busy samples only: fewer than link_samples busy ones among the
            # newest link_lookback_samples (each with the fields, all in the window) never make a run.
            idx = table.end[gen_low, None] - 1 - np.arange(t.link_lookback_samples)[None, :]
            first = table.field_first(_FIELDS, gen_low)[:, None]
            inside = idx >= first
            idx = np.maximum(idx, first)
            util = table.values(UTIL, idx, gen_low)
            busy = inside & (util >= t.busy_util_percent)
            fields = ~np.isnan(table.values(GEN, idx, gen_low)) & ~np.isnan(table.values(GEN_MAX, idx, gen_low))
            edge = (~inside | (table.times(idx, gen_low) < now - self.window_seconds)).any(axis=1)
            odd = (busy & ~fields).any(axis=1) | edge
            look[gen_low] = odd | ((busy & fields).sum(axis=1) >= t.link_samples)
        return look

    # --- replays -----------------------------------------------------------------------------

    def _replay_rate(
        self,
        node: str,
        gpu: int,
        windows: CounterWindows,
        gen: float | None,
        width: float | None,
        now: float,
        boot_seen_at: float | None,
    ) -> Finding | None:
        t = self.thresholds
        limit = t.replay_limit(gen, width)
        over = windows.over(limit, strictly=True)
        episode = held_over_limit(windows, over, now, t.replay_hold_seconds, boot_seen_at)
        if episode is None:
            return None
        replays, seconds = episode.increase, episode.seconds
        at = f" at {_link_name(gen, width)}" if gen is not None and width is not None else ""
        evidence: dict[str, object] = {
            "replays": replays,
            "seconds": seconds,
            "replays_in_window": float(windows.counts[-1]),
            "window_seconds": t.replay_window_seconds,
            "limit": limit,
            "pcie_replay_total": float(windows.values[-1]),
        }
        if gen is not None and width is not None:
            evidence["pcie_link_gen"] = gen
            evidence["pcie_link_width"] = width
        return Finding(
            detector=self.id,
            severity="warning",
            action="inspect_hardware",
            summary=(
                f"GPU {gpu} on {node}: {fmt_count(replays, 'PCIe replay')} in the last "
                f"{seconds:g} s "
                f"(limit {limit:g} in {t.replay_window_seconds:g} s{at})"
            ),
            start=episode.start,
            node=node,
            gpu=gpu,
            evidence=evidence,
            key="replay_rate",
        )

    # --- link training -----------------------------------------------------------------------

    def _run_start(
        self,
        series: TableSeries,
        newest: int,
        now: float,
        name: str,
        name_max: str,
        busy_only: bool,
    ) -> tuple[float, Mapping[str, float | int]] | None:
        """When the link read below its maximum (`name` < `name_max`) on `link_samples` judged
        samples running, with none at the maximum between them, among the newest
        `link_lookback_samples` samples (all samples with the fields are judged, or only the
        busy ones if `busy_only`): the time of the first judged sample of that low run and the
        metrics of its newest; else None."""
        t = self.thresholds
        need, lookback, busy = t.link_samples, t.link_lookback_samples, t.busy_util_percent
        judged = seen = 0
        start = 0.0
        latest_index = -1
        oldest_t = now - self.window_seconds
        times, utils = series.times(), series.values(UTIL)
        values, maxima = series.values(name), series.values(name_max)
        for i in range(newest, -1, -1):
            if times[i] < oldest_t:
                break
            if busy_only:
                util = utils[i]
                if util is None or util < busy:  # not judged, but it counts against the lookback
                    seen += 1
                    if judged < need and judged + lookback - seen < need:
                        return None  # too few samples left in the lookback to reach need
                    continue
            value, maximum = values[i], maxima[i]
            if value is None or maximum is None:
                continue
            seen += 1
            if value >= maximum:
                break  # at its maximum here: the low run starts after this sample
            if not judged:
                latest_index = i
            judged += 1
            start = times[i]
            if judged < need and judged + lookback - seen < need:
                return None
        return (start, series[latest_index].metrics) if judged >= need else None

    def _link(
        self,
        node: str,
        gpu: int,
        series: TableSeries,
        widths: int,
        gens: int,
        now: float,
    ) -> Finding | None:
        """`widths` and `gens`: the newest samples with the width and the generation fields."""
        t = self.thresholds
        # Fast path: the newest readings show the link at its maximum (or there are none).
        width_run = gen_run = None
        if widths >= 0 and _below(series, widths, WIDTH, WIDTH_MAX):
            width_run = self._run_start(series, widths, now, WIDTH, WIDTH_MAX, busy_only=t.width_requires_busy)
        if gens >= 0 and _below(series, gens, GEN, GEN_MAX):
            gen_run = self._run_start(series, gens, now, GEN, GEN_MAX, busy_only=True)
        if width_run is None and gen_run is None:
            return None
        width_start = None if width_run is None else width_run[0]
        gen_start = None if gen_run is None else gen_run[0]
        # What the link read on the newest sample each rule judged (busy, for the generation).
        width_metrics = width_run[1] if width_run else series[widths].metrics if widths >= 0 else {}
        gen_metrics = gen_run[1] if gen_run else series[gens].metrics if gens >= 0 else {}
        gen, gen_max = float_reading(gen_metrics, GEN), float_reading(gen_metrics, GEN_MAX)
        width = float_reading(width_metrics, WIDTH)
        width_max = float_reading(width_metrics, WIDTH_MAX)
        trained, maximum = _link_name(gen, width), _link_name(gen_max, width_max)
        below = " and ".join(
            what for what, start in (("width", width_start), ("generation", gen_start)) if start is not None
        )
        util = float_reading(gen_metrics, UTIL)
        busy = f", at {util:g} % utilisation" if util is not None and gen_start is not None else ""
        evidence: dict[str, object] = {
            "width_low": width_start is not None,
            "gen_low": gen_start is not None,
        }
        for name, value in (
            (GEN, gen),
            (GEN_MAX, gen_max),
            (WIDTH, width),
            (WIDTH_MAX, width_max),
            (UTIL, util),
        ):
            if value is not None:
                evidence[name] = value
        return Finding(
            detector=self.id,
            severity="warning",
            action="inspect_hardware",
            summary=(f"GPU {gpu} on {node}: PCIe link trained at {trained}, {below} below its maximum {maximum}{busy}"),
            start=min(s for s in (width_start, gen_start) if s is not None),
            node=node,
            gpu=gpu,
            evidence=evidence,
            key="link",
        )
