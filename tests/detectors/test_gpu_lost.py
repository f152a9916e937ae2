"""GpuLostDetector: gpu_lost events hold a critical finding until the node reboots; XID 79 is xid's."""

import pytest

from detectors.engine import RecentData, Tracker
from detectors.gpu_lost import GpuLostDetector, GpuLostThresholds
from detectors.model import Event, GpuSample, NodeState, Window

T0 = 1_700_000_000.0
LIMIT = GpuLostThresholds().hold_limit_seconds


def lost(t, gpu=5, node="n01"):
    return Event(t=t, node=node, kind="gpu_lost", gpu=gpu, uuid="GPU-abc", message="GPU is lost")


def xid(t, number, gpu=5):
    return Event(t=t, node="n01", kind="xid", gpu=gpu, xid=number, pci_bus_id="0000:9b:00")


def window(now, events, boot_seen_at=None):
    state = NodeState("n01", now, 1.0, boot_id="b", boot_seen_at=boot_seen_at)
    return Window(
        now=now, gpu={}, host={}, events=events, steps=[], nodes={"n01": state}, watching_since=T0
    )


def test_gpu_lost_event_is_critical_reboot():
    (finding,) = GpuLostDetector().detect(window(T0 + 1, [lost(T0)]))
    assert (finding.detector, finding.severity, finding.action) == (
        "gpu_lost",
        "critical",
        "reboot",
    )
    assert (finding.node, finding.gpu, finding.start) == ("n01", 5, T0)
    assert finding.summary == "GPU 5 on n01 lost: the driver reports GPU is lost"
    assert finding.evidence == {"count": 1, "uuid": "GPU-abc"}


@pytest.mark.parametrize("number", [13, 48, 74, 79, 94])
def test_xids_are_left_to_the_xid_detector(number):
    assert GpuLostDetector().detect(window(T0 + 1, [xid(T0, number)])) == []


def test_lost_gpu_without_an_index():
    (finding,) = GpuLostDetector().detect(window(T0, [lost(T0, gpu=None)]))
    assert finding.gpu is None and finding.summary.startswith("a GPU on n01 lost")


@pytest.mark.parametrize(
    ("boot_seen_at", "held"), [(None, True), (T0 - 10, True), (T0, True), (T0 + 30, False)]
)
def test_holds_until_the_boot_changes_after_the_event(boot_seen_at, held):
    assert bool(GpuLostDetector().detect(window(T0 + 3600, [lost(T0)], boot_seen_at))) is held


@pytest.mark.parametrize(("age", "held"), [(LIMIT, True), (LIMIT + 1, False)])
def test_hold_limit_bounds_a_missed_reboot(age, held):
    assert bool(GpuLostDetector().detect(window(T0 + age, [lost(T0)]))) is held


def test_lifecycle_through_recent_data_holds_until_the_node_comes_back_in_a_new_boot():
    data = RecentData(retention_seconds=30)
    tracker = Tracker([GpuLostDetector()])
    data.note_node("n01", T0, boot_id="boot-a")
    data.add_event(lost(T0 + 1))
    opened, _ = tracker.evaluate(data.window(T0 + 1, watching_since=T0))
    assert [f.detector for f in opened] == ["gpu_lost"]

    # The node keeps sending in the same boot for an hour: still lost.
    for t in range(2, 3600, 60):
        data.note_node("n01", T0 + t, boot_id="boot-a")
        data.add_gpu(GpuSample(t=T0 + t, node="n01", gpu=0, metrics={}))
        assert tracker.evaluate(data.window(T0 + t, watching_since=T0)) == ([], [])

    data.note_node("n01", T0 + 3700, boot_id="boot-b")
    opened, closed = tracker.evaluate(data.window(T0 + 3700, watching_since=T0))
    assert opened == [] and [(f.detector, f.end) for f in closed] == [("gpu_lost", T0 + 3700)]
