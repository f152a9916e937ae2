"""RetiredPagesDetector: retired pages at DCGM's limit, and page retirement pending (pre-Ampere)."""

import pytest

from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.retired_pages import RetiredPagesDetector, RetiredPagesThresholds
from fleetwatch.records import GpuSample

T0 = 1_700_000_000.0
LIMIT = RetiredPagesThresholds().max_retired_pages


def pages(sbe=0, dbe=0, pending=0):
    return {"retired_pages_sbe": sbe, "retired_pages_dbe": dbe, "retired_pages_pending": pending}


def window(metrics_per_second, gpu=1, node="n01", now=None):
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


def test_dcgm_limit_is_63_pages():
    assert LIMIT == 63


@pytest.mark.parametrize(("total", "fires"), [(LIMIT - 1, False), (LIMIT, True), (LIMIT + 1, True)])
def test_limit_edges_count_sbe_and_dbe_pages_together(total, fires):
    findings = RetiredPagesDetector().detect(window([pages(sbe=10, dbe=total - 10)]))
    assert bool(findings) is fires


def test_limit_finding_reads_well():
    (finding,) = RetiredPagesDetector().detect(window([pages(sbe=12, dbe=52)] * 2))
    assert finding.summary == (
        "GPU 1 on n01: 64 retired pages (12 single-bit, 52 double-bit), at or over the limit of 63"
    )
    assert (finding.detector, finding.severity, finding.action, finding.key) == (
        "retired_pages",
        "critical",
        "inspect_hardware",
        "limit",
    )
    assert finding.start == T0
    assert finding.evidence == {
        "retired_pages_sbe": 12,
        "retired_pages_dbe": 52,
        "retired_pages_pending": 0,
        "retired_pages": 64.0,
        "limit": 63,
    }


def test_limit_start_is_when_the_count_reached_it():
    samples = [pages(dbe=62), pages(dbe=62), pages(dbe=63), pages(dbe=63)]
    (finding,) = RetiredPagesDetector().detect(window(samples))
    assert finding.start == T0 + 2


def test_pending_retirement_is_a_warning_to_reset():
    (finding,) = RetiredPagesDetector().detect(window([pages(dbe=2), pages(dbe=3, pending=1)]))
    assert (finding.severity, finding.action, finding.key) == ("warning", "reset_gpu", "pending")
    assert finding.summary == (
        "GPU 1 on n01: page retirement pending, reset the GPU (or reload the driver) to retire the pages"
    )
    assert finding.start == T0 + 1
    assert finding.evidence["retired_pages_pending"] == 1


def test_limit_and_pending_are_two_findings():
    findings = RetiredPagesDetector().detect(window([pages(sbe=30, dbe=40, pending=1)]))
    assert sorted(f.key for f in findings) == ["limit", "pending"]


def test_pending_clears_when_the_retirement_is_applied():
    data = RecentData(retention_seconds=60)
    tracker = Tracker([RetiredPagesDetector()])
    events = []
    for i, pending in enumerate([0, 1, 1, 0]):
        data.add_gpu(GpuSample(T0 + i, "n01", 1, pages(dbe=3, pending=pending)))
        opened, closed = tracker.evaluate(data.window(T0 + i, watching_since=T0))
        events.append((len(opened), len(closed)))
    assert events == [(0, 0), (1, 0), (0, 0), (0, 1)]


def test_one_of_the_two_counts_is_enough():
    (finding,) = RetiredPagesDetector().detect(window([{"retired_pages_dbe": 70}]))
    assert finding.summary == ("GPU 1 on n01: 70 retired pages (70 double-bit), at or over the limit of 63")


@pytest.mark.parametrize(
    "metrics",
    [
        {},  # Hopper: page retirement not supported, remapped rows instead
        {"remap_pending": 1, "ecc_dbe_volatile_total": 5},
        {"retired_pages_pending": 0},
    ],
)
def test_missing_fields_give_no_finding(metrics):
    assert RetiredPagesDetector().detect(window([metrics] * 3)) == []


def test_stale_samples_say_nothing_about_now():
    late = T0 + RetiredPagesThresholds().max_sample_age_seconds + 1
    assert RetiredPagesDetector().detect(window([pages(dbe=80)], now=late)) == []


def test_thresholds_are_configurable_and_validate():
    assert RetiredPagesDetector(RetiredPagesThresholds(max_retired_pages=60)).detect(window([pages(dbe=60)]))
    with pytest.raises(ValueError):
        RetiredPagesThresholds(max_retired_pages=0)
