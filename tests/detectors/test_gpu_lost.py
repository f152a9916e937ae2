"""GpuLostDetector: lost or silent GPUs give a critical finding per GPU; XID 79 is xid's."""

import pytest

from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.gpu_lost import GpuLostDetector, GpuLostThresholds
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.records import Event, GpuSample

T0 = 1_700_000_000.0
LIMIT = GpuLostThresholds().hold_limit_seconds


def lost(t, gpu=5, node="n01"):
    return Event(t=t, node=node, kind="gpu_lost", gpu=gpu, uuid="GPU-abc", message="GPU is lost")


def xid(t, number, gpu=5):
    return Event(t=t, node="n01", kind="xid", gpu=gpu, xid=number, pci_bus_id="0000:9b:00")


def window(now, events, boot_seen_at=None):
    state = NodeState("n01", now, 1.0, boot_id="b", boot_seen_at=boot_seen_at)
    return Window(now=now, gpu={}, host={}, events=events, steps=[], nodes={"n01": state}, watching_since=T0)


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


@pytest.mark.parametrize(("boot_seen_at", "held"), [(None, True), (T0 - 10, True), (T0, True), (T0 + 30, False)])
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


# --- fewer GPUs than the node had ----------------------------------------------------------------


def fleet_window(now, last_t, interval=1.0, boot_seen_at=None, events=(), node="n02"):
    """A window of one node's 8 GPUs, each with one sample a second up to last_t[gpu] (or now)."""
    gpu = {}
    for g in range(8):
        end = last_t.get(g, now)
        times = [t for t in range(0, int(end - T0) + 1, int(interval))]
        gpu[(node, g)] = [GpuSample(t=T0 + t, node=node, gpu=g, metrics={}, uuid=f"GPU-{g}") for t in times]
    state = NodeState(node, now, interval, boot_id="b", boot_seen_at=boot_seen_at)
    return Window(
        now=now,
        gpu=gpu,
        host={},
        events=list(events),
        steps=[],
        nodes={node: state},
        watching_since=T0,
    )


@pytest.mark.parametrize(("quiet", "fires"), [(4, False), (5, True), (60, True)])
def test_a_gpu_that_stops_reporting_while_its_peers_go_on_edges(quiet, fires):
    # GPU 5's last sample at T0 + 20; the others report every second up to now.
    window = fleet_window(T0 + 20 + quiet, {5: T0 + 20})
    assert bool(GpuLostDetector().detect(window)) is fires


def test_stopped_reporting_finding_shape():
    (finding,) = GpuLostDetector().detect(fleet_window(T0 + 32, {5: T0 + 20}))
    assert (finding.detector, finding.severity, finding.action) == (
        "gpu_lost",
        "critical",
        "reboot",
    )
    assert (finding.node, finding.gpu, finding.start) == ("n02", 5, T0 + 21)
    assert finding.summary == ("GPU 5 on n02 stopped reporting: 7 of 8 GPUs sampled, none from GPU 5 for 12 s")
    assert finding.evidence == {
        "last_seen": T0 + 20,
        "silent_seconds": 12.0,
        "gpus_reporting": 7,
        "gpus_known": 8,
        "sampling_interval_seconds": 1.0,
        "uuid": "GPU-5",
    }


def test_two_missing_gpus_are_two_findings():
    findings = GpuLostDetector().detect(fleet_window(T0 + 40, {2: T0 + 20, 5: T0 + 25}))
    assert [(f.gpu, f.evidence["gpus_reporting"]) for f in findings] == [(2, 6), (5, 6)]


def test_the_whole_node_going_quiet_is_node_silents():
    last = {g: T0 + 20 for g in range(8)}
    assert GpuLostDetector().detect(fleet_window(T0 + 40, last)) == []
    # ... even when one GPU went quiet a little earlier than the rest.
    last[5] = T0 + 10
    assert GpuLostDetector().detect(fleet_window(T0 + 40, last)) == []


def test_uses_the_nodes_sampling_interval():
    window = fleet_window(T0 + 60, {5: T0 + 20}, interval=10.0)
    assert GpuLostDetector().detect(window) == []  # 40 s < 5 intervals of 10 s
    window = fleet_window(T0 + 70, {5: T0 + 20}, interval=10.0)
    assert GpuLostDetector().detect(window) != []


def test_an_xid_79_on_the_gpu_is_left_to_the_xid_detector():
    events = [Event(t=T0 + 20.5, node="n02", kind="xid", gpu=5, xid=79)]
    assert GpuLostDetector().detect(fleet_window(T0 + 40, {5: T0 + 20}, events=events)) == []
    # An XID 79 naming no GPU on that node counts too; one on another GPU does not.
    no_gpu = [Event(t=T0 + 20.5, node="n02", kind="xid", gpu=None, xid=79)]
    assert GpuLostDetector().detect(fleet_window(T0 + 40, {5: T0 + 20}, events=no_gpu)) == []
    other = [Event(t=T0 + 20.5, node="n02", kind="xid", gpu=3, xid=79)]
    assert GpuLostDetector().detect(fleet_window(T0 + 40, {5: T0 + 20}, events=other)) != []


def test_a_gpu_lost_event_and_the_missing_samples_are_one_finding():
    events = [Event(t=T0 + 20.5, node="n02", kind="gpu_lost", gpu=5, message="GPU is lost")]
    (finding,) = GpuLostDetector().detect(fleet_window(T0 + 40, {5: T0 + 20}, events=events))
    assert finding.summary == "GPU 5 on n02 lost: the driver reports GPU is lost"
    assert finding.start == T0 + 20.5


def test_still_missing_after_a_reboot_escalates_to_hardware_inspection():
    # GPU 5 fell off the bus (XID 79) at T0 + 20; the node rebooted at T0 + 300 without it.
    events = [Event(t=T0 + 20.5, node="n02", kind="xid", gpu=5, xid=79)]
    window = fleet_window(T0 + 400, {5: T0 + 20}, boot_seen_at=T0 + 300, events=events)
    (finding,) = GpuLostDetector().detect(window)
    assert (finding.gpu, finding.severity, finding.action) == (5, "critical", "inspect_hardware")
    assert finding.summary.endswith("; still missing after the node rebooted")
    assert finding.evidence["boot_seen_at"] == T0 + 300


def test_lifecycle_through_recent_data_outlives_sample_retention_and_resolves():
    data = RecentData(retention_seconds=10)  # far shorter than the outage
    tracker = Tracker([GpuLostDetector()])
    changes = []
    for t in range(0, 200):
        for g in range(8):
            if g != 5 or t < 20 or t >= 150:  # GPU 5 is away from 20 to 149
                data.add_gpu(GpuSample(t=T0 + t, node="n02", gpu=g, metrics={}))
        opened, closed = tracker.evaluate(data.window(T0 + t, watching_since=T0))
        changes += [("open", t, f.gpu) for f in opened] + [("close", t, f.gpu) for f in closed]
    assert changes == [("open", 24, 5), ("close", 150, 5)]


def test_a_node_that_reboots_and_comes_back_whole_raises_nothing():
    data = RecentData(retention_seconds=60)
    tracker = Tracker([GpuLostDetector()])
    data.note_node("n02", T0, boot_id="boot-a")
    changes = []
    for t in list(range(0, 30)) + list(range(120, 160)):  # down from 30 to 119 for the reboot
        if t == 120:
            data.note_node("n02", T0 + t, boot_id="boot-b")
        for g in range(8):
            data.add_gpu(GpuSample(t=T0 + t, node="n02", gpu=g, metrics={}))
        opened, closed = tracker.evaluate(data.window(T0 + t, watching_since=T0))
        changes += opened + closed
    assert changes == []


def test_a_missing_gpu_is_held_up_to_the_hold_limit():
    detector = GpuLostDetector(GpuLostThresholds(hold_limit_seconds=100))
    assert detector.detect(fleet_window(T0 + 120, {5: T0 + 20})) != []
    assert detector.detect(fleet_window(T0 + 121, {5: T0 + 20})) == []


def test_a_node_with_a_single_gpu_is_never_short_of_gpus():
    window = fleet_window(T0 + 60, {5: T0 + 20})
    single = Window(
        now=window.now,
        gpu={("n02", 5): window.gpu[("n02", 5)]},
        host={},
        events=[],
        steps=[],
        nodes=window.nodes,
        watching_since=T0,
    )
    assert GpuLostDetector().detect(single) == []


def test_missing_thresholds_are_checked():
    with pytest.raises(ValueError):
        GpuLostThresholds(missing_intervals=0)
    with pytest.raises(ValueError):
        GpuLostThresholds(hold_limit_seconds=0)
