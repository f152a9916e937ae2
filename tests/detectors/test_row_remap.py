"""RowRemapDetector: remap pending (warning, reset) and remap failure (critical, hardware)."""

from dataclasses import replace

import pytest

from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.row_remap import RowRemapDetector, RowRemapThresholds
from fleetwatch.records import GpuSample

T0 = 1_700_000_000.0


def rows(pending=0, failure=0, correctable=0, uncorrectable=0):
    return {
        "remap_pending": pending,
        "remap_failure": failure,
        "remapped_rows_correctable": correctable,
        "remapped_rows_uncorrectable": uncorrectable,
    }


def window(metrics_per_second, gpu=2, node="n02", now=None):
    samples = [GpuSample(t=T0 + i, node=node, gpu=gpu, metrics=m) for i, m in enumerate(metrics_per_second)]
    now = samples[-1].t if now is None else now
    return Window(
        now=now,
        gpu={(node, gpu): samples},
        host={},
        events=[],
        steps=[],
        nodes={node: NodeState(node, samples[-1].t, 1.0)},
        watching_since=T0,
    )


def test_pending_remap_is_a_warning_to_reset_the_gpu():
    (finding,) = RowRemapDetector().detect(window([rows(), rows(), rows(pending=1, uncorrectable=1)]))
    assert finding.summary == (
        "GPU 2 on n02: row remapping pending, reset the GPU to apply it (rows remapped: 0 correctable, 1 uncorrectable)"
    )
    assert (finding.detector, finding.severity, finding.action, finding.key) == (
        "row_remap",
        "warning",
        "reset_gpu",
        "pending",
    )
    assert (finding.node, finding.gpu, finding.start) == ("n02", 2, T0 + 2)
    assert finding.evidence == {
        "remap_pending": 1,
        "remap_failure": 0,
        "remapped_rows_correctable": 0,
        "remapped_rows_uncorrectable": 1,
    }


def test_failed_remap_is_critical_for_hardware_inspection():
    (finding,) = RowRemapDetector().detect(window([rows(), rows(failure=1, uncorrectable=9)]))
    assert (finding.severity, finding.action, finding.key) == (
        "critical",
        "inspect_hardware",
        "failure",
    )
    assert finding.summary == (
        "GPU 2 on n02: row remapping failed, a memory bank has no spare rows left "
        "(rows remapped: 0 correctable, 9 uncorrectable)"
    )
    assert finding.start == T0 + 1


def test_pending_and_failure_are_two_findings():
    findings = RowRemapDetector().detect(window([rows(pending=1, failure=1)] * 2))
    assert sorted(f.key for f in findings) == ["failure", "pending"]
    assert len({f.fingerprint for f in findings}) == 2


@pytest.mark.parametrize("value", [0, 1, 2])
def test_flag_edges(value):
    findings = RowRemapDetector().detect(window([rows(pending=value)]))
    assert bool(findings) is (value >= 1)


def test_a_single_flagged_sample_fires_at_once():
    # NVML's flag is a state, not a noisy reading: there is nothing to wait for.
    (finding,) = RowRemapDetector().detect(window([rows()] * 5 + [rows(pending=1)]))
    assert finding.start == T0 + 5


def test_start_is_the_first_flagged_sample_in_the_window():
    (finding,) = RowRemapDetector().detect(window([rows()] * 3 + [rows(pending=1)] * 4))
    assert finding.start == T0 + 3


def test_pending_clears_after_the_gpu_reset():
    data = RecentData(retention_seconds=60)
    tracker = Tracker([RowRemapDetector()])
    flags = [0, 1, 1, 1, 0, 0]  # the reset applies the remapping and clears the flag
    events = []
    for i, pending in enumerate(flags):
        data.add_gpu(GpuSample(t=T0 + i, node="n02", gpu=2, metrics=rows(pending=pending)))
        opened, closed = tracker.evaluate(data.window(T0 + i, watching_since=T0))
        events.append((len(opened), len(closed)))
    assert events == [(0, 0), (1, 0), (0, 0), (0, 0), (0, 1), (0, 0)]


def test_a_failure_still_reported_after_a_reboot_fires():
    # The flag persists (the bank is out of spare rows): a reboot does not end the finding.
    w = window([rows(failure=1)] * 3)
    state = NodeState("n02", w.now, 1.0, boot_id="b2", boot_seen_at=T0 + 1)
    rebooted = replace(w, nodes={"n02": state})
    (finding,) = RowRemapDetector().detect(rebooted)
    assert finding.key == "failure" and finding.start == T0


@pytest.mark.parametrize(
    "metrics",
    [
        {},  # pre-Ampere or MIG: not reported
        {"remapped_rows_correctable": 3},
        {"temp_gpu_celsius": 50},
    ],
)
def test_missing_fields_give_no_finding(metrics):
    assert RowRemapDetector().detect(window([metrics] * 3)) == []


def test_summary_without_row_counts():
    (finding,) = RowRemapDetector().detect(window([{"remap_pending": 1}]))
    assert finding.summary == "GPU 2 on n02: row remapping pending, reset the GPU to apply it"
    assert finding.evidence == {"remap_pending": 1}


def test_one_failed_read_does_not_close_the_finding():
    samples = [rows(pending=1), rows(pending=1), {}, {}]
    assert RowRemapDetector().detect(window(samples)) != []
    assert RowRemapDetector().detect(window(samples + [{}])) == []


def test_stale_samples_say_nothing_about_now():
    late = T0 + RowRemapThresholds().max_sample_age_seconds + 1
    assert RowRemapDetector().detect(window([rows(pending=1)], now=late)) == []


def test_future_samples_are_not_read():
    samples = [GpuSample(T0, "n02", 2, rows()), GpuSample(T0 + 5, "n02", 2, rows(pending=1))]
    w = Window(
        now=T0 + 1,
        gpu={("n02", 2): samples},
        host={},
        events=[],
        steps=[],
        nodes={},
        watching_since=T0,
    )
    assert RowRemapDetector().detect(w) == []


def test_thresholds_validate():
    with pytest.raises(ValueError):
        RowRemapThresholds(max_sample_age_seconds=0)
    assert RowRemapDetector().window_seconds == 30.0
