"""RecentData (bounded buffer, views not copies) and Tracker (the alert lifecycle diff)."""

import logging
import time
from dataclasses import replace

import numpy as np
import pytest

from fleetwatch.detectors import default_detectors
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import Window
from fleetwatch.detectors.straggler_steps import StragglerStepsDetector
from fleetwatch.detectors.table import TableSeries
from fleetwatch.records import Event, Finding, GpuSample, HostSample, Step

T0 = 1_700_000_000.0


def gpu(t, node="n01", index=0, **metrics):
    return GpuSample(t=t, node=node, gpu=index, metrics=metrics)


# --- RecentData ----------------------------------------------------------------------------------


def test_window_hands_out_views_of_the_same_samples_oldest_first():
    # GPU samples live in arrays: the window's series are views over them that hand out equal
    # GpuSamples (not the objects added), oldest first.
    data = RecentData(retention_seconds=60)
    samples = [gpu(T0 + i, temp_gpu_celsius=40 + i) for i in range(5)]
    for s in samples:
        data.add_gpu(s)
    series = data.window(T0 + 4, watching_since=T0).gpu[("n01", 0)]
    assert isinstance(series, TableSeries)
    assert list(series) == samples
    assert series[-1] == samples[-1] and series[0] == samples[0]
    assert series[-3:] == samples[-3:] and series[1:3] == samples[1:3] and series[::2] == samples[::2]
    assert list(reversed(series)) == samples[::-1]
    with pytest.raises(IndexError):
        series[5]


def test_prunes_what_is_older_than_retention_and_drops_empty_series():
    data = RecentData(retention_seconds=10)
    data.add_gpu(gpu(T0, index=0))
    data.add_gpu(gpu(T0 + 5, index=1))
    data.add_step(Step(t=T0, job="j", rank=0, node="n01", step=1, seconds=0.9))
    window = data.window(T0 + 12, watching_since=T0)
    assert list(window.gpu) == [("n01", 1)] and len(window.steps) == 0
    assert data.series_count == 1
    assert window.nodes["n01"].last_seen == T0 + 5  # the node itself is remembered


def test_events_have_their_own_retention():
    data = RecentData(retention_seconds=10, event_retention_seconds=100)
    data.add_event(Event(t=T0, node="n01", kind="xid", gpu=0, xid=79))
    assert len(data.window(T0 + 100, watching_since=T0).events) == 1
    assert len(data.window(T0 + 100.5, watching_since=T0).events) == 0


def test_steps_have_their_own_retention():
    # A job stepping every 45 s needs half an hour of its steps; samples need no more than 10 s.
    data = RecentData(retention_seconds=10, step_retention_seconds=1800)
    data.add_step(Step(t=T0, job="j", rank=0, node="n01", step=1, seconds=45.0))
    data.add_host(HostSample(t=T0, node="n01", metrics={}))
    window = data.window(T0 + 1800, watching_since=T0)
    assert len(window.steps) == 1 and window.host == {}
    assert len(data.window(T0 + 1800.5, watching_since=T0).steps) == 0
    with pytest.raises(ValueError, match="step_retention_seconds"):
        RecentData(retention_seconds=10, step_retention_seconds=5)


def test_a_full_step_buffer_drops_its_oldest_and_keeps_its_columns_in_step():
    data = RecentData(retention_seconds=600, max_steps=3)
    for i in range(5):
        data.add_step(Step(t=T0 + i, job="j", rank=0, node="n01", step=i, seconds=0.9))
    window = data.window(T0 + 5, watching_since=T0)
    assert [s.step for s in window.steps] == [2, 3, 4]
    assert window.step_table.step.tolist() == [2, 3, 4]
    assert data.dropped["step"] == 2


def test_series_are_bounded_and_overflow_is_counted():
    data = RecentData(retention_seconds=1e9, max_samples_per_series=3, max_events=2)
    for i in range(5):
        data.add_gpu(gpu(T0 + i))
        data.add_event(Event(t=T0 + i, node="n01", kind="xid", xid=13))
    window = data.window(T0 + 5, watching_since=T0)
    assert [s.t for s in window.gpu[("n01", 0)]] == [T0 + 2, T0 + 3, T0 + 4]
    assert [e.t for e in window.events] == [T0 + 3, T0 + 4]
    assert data.dropped["gpu"] == 2 and data.dropped["event"] == 3


def test_late_data_is_inserted_in_time_order():
    data = RecentData(retention_seconds=60, max_samples_per_series=4)
    for t in (0, 1, 3, 4):
        data.add_gpu(gpu(T0 + t))
    data.add_gpu(gpu(T0 + 2))  # full: the oldest goes, the late one takes its place in order
    data.add_gpu(gpu(T0 - 5))  # older than everything kept and no room: dropped
    window = data.window(T0 + 4, watching_since=T0)
    assert [s.t - T0 for s in window.gpu[("n01", 0)]] == [1, 2, 3, 4]
    assert data.dropped["gpu"] == 2


def test_data_from_a_clock_ahead_of_now_stays_out_of_the_window():
    data = RecentData(retention_seconds=60)
    for t in (0, 1, 2):
        data.add_gpu(gpu(T0 + t))
    data.add_event(Event(t=T0 + 2, node="n01", kind="gpu_lost"))
    window = data.window(T0 + 1, watching_since=T0)
    assert [s.t for s in window.gpu[("n01", 0)]] == [T0, T0 + 1]
    assert next(reversed(window.gpu[("n01", 0)])).t == T0 + 1
    assert window.gpu[("n01", 0)][-1:][0].t == T0 + 1
    assert len(window.events) == 0


def test_note_node_keeps_the_newest_time_and_the_nodes_facts():
    data = RecentData(retention_seconds=60)
    data.note_node("n01", T0 + 5, sampling_interval_seconds=2.0, gpu_count=8)
    data.note_node("n01", T0 + 3)  # older news does not move last_seen back
    data.add_host(HostSample(t=T0 + 4, node="n01", metrics={}))
    state = data.window(T0 + 6, watching_since=T0).nodes["n01"]
    assert (state.last_seen, state.sampling_interval_seconds, state.gpu_count) == (T0 + 5, 2.0, 8)
    assert data.window(T0 + 7, watching_since=T0).nodes["n01"] is state  # unchanged: not rebuilt


def test_unknown_sampling_interval_defaults_to_one_second():
    data = RecentData(retention_seconds=60)
    data.add_gpu(gpu(T0))
    assert data.window(T0, watching_since=T0).nodes["n01"].sampling_interval_seconds == 1.0


def test_boot_seen_at_marks_a_change_of_boot_not_the_first_sight():
    data = RecentData(retention_seconds=60)
    data.note_node("n01", T0, boot_id="a")
    assert data.window(T0, T0).nodes["n01"].boot_seen_at is None  # a collector restart is no reboot
    data.note_node("n01", T0 + 10, boot_id="a")
    data.note_node("n01", T0 + 20, boot_id="b")
    data.note_node("n01", T0 + 15, boot_id="a")  # late data from the old boot is not a change back
    data.note_node("n01", T0 + 30, boot_id="b")
    state = data.window(T0 + 30, T0).nodes["n01"]
    assert (state.boot_id, state.boot_seen_at) == ("b", T0 + 20)


def test_forget_node_drops_it_and_its_series():
    data = RecentData(retention_seconds=60)
    data.add_gpu(gpu(T0, node="n01"))
    data.add_host(HostSample(t=T0, node="n01", metrics={}))
    data.add_gpu(gpu(T0, node="n02"))
    data.forget_node("n01")
    window = data.window(T0, T0)
    assert list(window.nodes) == ["n02"] and list(window.gpu) == [("n02", 0)] and window.host == {}


def test_for_detectors_keeps_what_the_detectors_need():
    data = RecentData.for_detectors(default_detectors())
    assert data.retention_seconds == max(d.window_seconds for d in default_detectors())
    assert data.event_retention_seconds >= 86400.0
    # straggler.steps reads slow steppers' steps from further back than anyone's window
    assert data.step_retention_seconds == StragglerStepsDetector().step_window_seconds > data.retention_seconds


# --- Tracker -------------------------------------------------------------------------------------


class Scripted:
    """A detector that returns whatever the test says, or raises."""

    window_seconds = 0.0

    def __init__(self, id="fake"):
        self.id = id
        self.findings: list[Finding] = []
        self.error: Exception | None = None

    def detect(self, window):
        if self.error is not None:
            raise self.error
        return list(self.findings)


def finding(detector="fake", node="n01", start=T0, count=1, key=""):
    return Finding(
        detector=detector,
        severity="critical",
        action="reboot",
        summary="s",
        start=start,
        node=node,
        gpu=0,
        evidence={"count": count},
        key=key,
    )


def empty_window(now):
    return Window(now=now, gpu={}, host={}, events=[], steps=[], nodes={}, watching_since=T0)


def test_lifecycle_opens_once_updates_and_closes_with_end_now():
    fake = Scripted()
    tracker = Tracker([fake])
    fake.findings = [finding(count=1)]
    assert tracker.evaluate(empty_window(T0)) == ([finding(count=1)], [])
    fake.findings = [finding(count=2, start=T0 + 1)]  # same fingerprint: not re-opened
    assert tracker.evaluate(empty_window(T0 + 1)) == ([], [])
    (current,) = tracker.open.values()
    assert current.evidence == {"count": 2} and current.start == T0  # newest evidence, first start
    fake.findings = []
    opened, closed = tracker.evaluate(empty_window(T0 + 2))
    assert opened == [] and closed == [replace(finding(count=2), end=T0 + 2)]
    assert tracker.open == {}


def test_distinct_keys_are_distinct_findings():
    fake = Scripted()
    tracker = Tracker([fake])
    fake.findings = [finding(key="13"), finding(key="31"), finding(key="13")]
    opened, _ = tracker.evaluate(empty_window(T0))
    assert [f.key for f in opened] == ["13", "31"]


def test_a_crashing_detector_keeps_its_findings_open_and_the_others_run(caplog):
    broken, healthy = Scripted("broken"), Scripted("healthy")
    tracker = Tracker([broken, healthy])
    broken.findings = [finding("broken")]
    healthy.findings = [finding("healthy")]
    tracker.evaluate(empty_window(T0))

    broken.error = RuntimeError("boom")
    healthy.findings = []
    with caplog.at_level(logging.ERROR, logger="fleetwatch.detectors.engine"):
        opened, closed = tracker.evaluate(empty_window(T0 + 1))
        tracker.evaluate(empty_window(T0 + 2))
    assert opened == [] and [f.detector for f in closed] == ["healthy"]
    assert [f.detector for f in tracker.open.values()] == ["broken"]
    assert [r.getMessage() for r in caplog.records] == ["detector broken failed; its open findings stay open"]
    assert caplog.records[0].exc_info is not None
    stats = tracker.stats["broken"]
    assert (stats.runs, stats.errors, stats.last_ok, stats.last_error) == (
        3,
        2,
        False,
        "RuntimeError('boom')",
    )
    assert tracker.stats["healthy"].errors == 0 and tracker.stats["healthy"].runs == 3

    broken.error, broken.findings = None, []  # recovered, and the condition has gone
    opened, closed = tracker.evaluate(empty_window(T0 + 3))
    assert [f.detector for f in closed] == ["broken"] and tracker.stats["broken"].last_ok


def test_a_detector_returning_garbage_counts_as_a_crash():
    fake = Scripted()
    fake.findings = [object()]
    tracker = Tracker([fake])
    assert tracker.evaluate(empty_window(T0)) == ([], [])
    assert tracker.stats["fake"].errors == 1


def test_restored_findings_are_not_opened_again_and_close_normally():
    fake = Scripted()
    tracker = Tracker([fake])
    before_restart = finding(start=T0 - 500)
    already_ended = replace(finding(node="n07"), end=T0 - 1)
    tracker.restore([before_restart, finding(node="n09", start=T0 - 900), already_ended])
    assert set(tracker.open) == {before_restart.fingerprint, finding(node="n09").fingerprint}
    fake.findings = [finding(start=T0)]
    opened, closed = tracker.evaluate(empty_window(T0))
    assert opened == []
    assert [(f.node, f.end) for f in closed] == [("n09", T0)]
    assert tracker.open[before_restart.fingerprint].start == T0 - 500


def test_stats_time_each_detector():
    class Slow(Scripted):
        def detect(self, window):
            time.sleep(0.01)
            return []

    tracker = Tracker([Slow("slow")])
    tracker.evaluate(empty_window(T0))
    assert tracker.stats["slow"].runs == 1 and tracker.stats["slow"].last_duration_seconds >= 0.01


def test_detector_ids_must_be_unique():
    with pytest.raises(ValueError, match="repeated"):
        Tracker([Scripted("x"), Scripted("x")])


def test_a_thousand_gpus_evaluated_every_second_stay_cheap():
    detectors = default_detectors()
    data = RecentData.for_detectors(detectors)
    tracker = Tracker(detectors)
    nodes, gpus_per_node = 125, 8
    metrics = {
        "clock_event_reasons": 0,
        "temp_gpu_celsius": 60,
        "temp_slowdown_celsius": 87,
        "sm_clock_mhz": 1980,
        "sm_clock_max_mhz": 1980,
    }
    durations = []
    for second in range(40):
        now = T0 + second
        for n in range(nodes):
            node = f"n{n:03d}"
            for g in range(gpus_per_node):
                data.add_gpu(GpuSample(t=now, node=node, gpu=g, metrics=metrics))
        started = time.perf_counter()
        window = data.window(now, watching_since=T0)
        tracker.evaluate(window)
        durations.append(time.perf_counter() - started)
    assert len(window.gpu) == 1000
    # Retention (the longest detector window) bounds each series.
    retention_seconds = max(d.window_seconds for d in detectors)
    assert len(window.gpu[("n000", 0)]) == min(40, int(retention_seconds) + 1)
    assert tracker.open == {}
    # Generous for slow CI machines; measured around 10 ms.
    assert sorted(durations)[len(durations) // 2] < 0.1


# --- GPU samples as arrays -------------------------------------------------------------------------


def test_add_gpu_rows_is_add_gpu_of_the_same_samples():
    from fleetwatch.wire import GPU_FIELDS

    column = {name: i for i, name in enumerate(GPU_FIELDS)}
    by_rows, by_samples = RecentData(retention_seconds=60), RecentData(retention_seconds=60)
    for i in range(3):
        values = np.full((2, len(GPU_FIELDS)), np.nan)  # NaN: the field is absent
        values[:, column["temp_gpu_celsius"]] = [40 + i, 50 + i]
        values[1, column["ecc_dbe_volatile_total"]] = i
        by_rows.add_gpu_rows("n01", T0 + i, [0, 3], values, ["GPU-a", None], ["j1", None], [0, None])
        by_samples.add_gpu(GpuSample(T0 + i, "n01", 0, {"temp_gpu_celsius": 40 + i}, uuid="GPU-a", job="j1", rank=0))
        by_samples.add_gpu(GpuSample(T0 + i, "n01", 3, {"temp_gpu_celsius": 50 + i, "ecc_dbe_volatile_total": i}))
    a, b = by_rows.window(T0 + 2, watching_since=T0), by_samples.window(T0 + 2, watching_since=T0)
    assert list(a.gpu) == list(b.gpu) == [("n01", 0), ("n01", 3)]
    assert [list(a.gpu[key]) for key in a.gpu] == [list(b.gpu[key]) for key in b.gpu]
    last = a.gpu[("n01", 3)][-1]
    assert last.metrics == {"temp_gpu_celsius": 52.0, "ecc_dbe_volatile_total": 2}
    assert isinstance(last.metrics["ecc_dbe_volatile_total"], int)  # integer fields stay integers
    assert a.nodes == b.nodes
    with pytest.raises(ValueError, match="shape"):
        by_rows.add_gpu_rows("n01", T0 + 3, [0], np.zeros((1, 3)), [None], [None], [None])


def test_fields_are_kept_as_long_as_the_detectors_read_them():
    data = RecentData.for_detectors(default_detectors())
    metrics = {"ecc_sbe_volatile_total": 0, "remap_pending": 0, "mem_clock_mhz": 2619, "temp_gpu_celsius": 60}
    for i in range(200):
        data.add_gpu(GpuSample(T0 + i, "n01", 0, metrics))
    series = data.window(T0 + 199, watching_since=T0).gpu[("n01", 0)]
    assert len(series) == 200  # the samples themselves (time, identity) for the whole window
    oldest, newest = series[0].metrics, series[-1].metrics
    assert newest == {
        "ecc_sbe_volatile_total": 0,
        "remap_pending": 0,
        "mem_clock_mhz": 2619.0,
        "temp_gpu_celsius": 60.0,
    }
    # The error counters for ecc's 180 s window; row remapping, temperatures, fields nobody reads:
    # no longer at the oldest sample.
    assert oldest == {}
    assert series[-170].metrics == {"ecc_sbe_volatile_total": 0}


def test_the_long_sustained_rule_reads_condition_times_not_old_samples():
    # Thermal slowdown 5 s a minute in 6 of the last 10 minutes: found although the temperature
    # fields of the early minutes are long gone from the buffer (only the hot samples' times stay).
    hot = {"clock_event_reasons": 0x48, "temp_gpu_celsius": 90, "temp_slowdown_celsius": 89}
    cool = {"clock_event_reasons": 0, "temp_gpu_celsius": 60, "temp_slowdown_celsius": 89}
    detectors = default_detectors()
    data = RecentData.for_detectors(detectors)
    for i in range(600):
        minute_hot = (i // 60) in (1, 2, 4, 6, 7, 9) and i % 60 >= 55
        data.add_gpu(GpuSample(T0 + i, "n01", 0, hot if minute_hot else cool))
    opened, _ = Tracker(detectors).evaluate(data.window(T0 + 599, watching_since=T0))
    (finding,) = [f for f in opened if f.detector == "thermal"]
    assert finding.evidence["sustained_by"] == "long" and finding.evidence["hot_minutes"] == 6
    assert finding.start == T0 + 60 + 55
