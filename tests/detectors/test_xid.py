"""XidDetector: one finding per (node, GPU, XID), graded by the catalog, held by its rule."""

import pytest

from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.xid import XidDetector, XidThresholds
from fleetwatch.records import Event

T0 = 1_700_000_000.0


def xid(t, xid_number, node="n01", gpu=3):
    return Event(t=t, node=node, kind="xid", gpu=gpu, xid=xid_number)


def window(now, events, boot_seen_at=None, node="n01"):
    state = NodeState(node, now, sampling_interval_seconds=1.0, boot_id="b", boot_seen_at=boot_seen_at)
    return Window(
        now=now,
        gpu={},
        host={},
        events=events,
        steps=[],
        nodes={node: state},
        watching_since=T0 - 3600,
    )


def test_xid_79_gives_the_design_finding():
    (finding,) = XidDetector().detect(window(T0 + 0.4, [xid(T0 + 0.4, 79)]))
    assert finding.to_dict() == {
        "detector": "xid",
        "severity": "critical",
        "action": "reboot",
        "node": "n01",
        "gpu": 3,
        "uuid": None,
        "pci_bus_id": None,
        "serial": None,
        "model": None,
        "job": None,
        "rank": None,
        "start": T0 + 0.4,
        "end": None,
        "summary": "XID 79: GPU has fallen off the bus",
        "evidence": {"xid": 79, "count": 1},
    }


def test_repeats_are_counted_and_start_is_the_first_occurrence():
    events = [xid(T0, 13), xid(T0 + 5, 13), xid(T0 + 9, 13)]
    (finding,) = XidDetector().detect(window(T0 + 10, events))
    assert finding.start == T0
    assert finding.evidence == {"xid": 13, "count": 3}
    assert (finding.severity, finding.action) == ("warning", "check_app")
    assert finding.summary == "XID 13: Graphics engine exception (usually the application)"


def test_one_finding_per_node_gpu_and_xid():
    events = [
        xid(T0, 13, gpu=0),
        xid(T0, 13, gpu=1),
        xid(T0, 31, gpu=1),
        xid(T0, 13, node="n02", gpu=0),
    ]
    findings = XidDetector().detect(window(T0 + 1, events))
    assert sorted((f.node, f.gpu, f.evidence["xid"]) for f in findings) == [
        ("n01", 0, 13),
        ("n01", 1, 13),
        ("n01", 1, 31),
        ("n02", 0, 13),
    ]
    assert len({f.fingerprint for f in findings}) == 4


def test_xid_without_a_gpu_index_still_reports():
    (finding,) = XidDetector().detect(window(T0, [xid(T0, 48, gpu=None)]))
    assert finding.gpu is None and finding.severity == "critical"


def test_unknown_xid_uses_the_default():
    (finding,) = XidDetector().detect(window(T0, [xid(T0, 4242)]))
    assert (finding.severity, finding.action) == ("warning", "check_app")
    assert finding.summary == "XID 4242: Unknown XID"


def test_other_event_kinds_and_future_events_are_ignored():
    events = [Event(t=T0, node="n01", kind="gpu_lost", gpu=3), xid(T0 + 5, 79)]
    assert XidDetector().detect(window(T0 + 1, events)) == []


HOLD = XidThresholds().hold_seconds
LIMIT = XidThresholds().reboot_hold_limit_seconds


@pytest.mark.parametrize(("age", "held"), [(HOLD - 1, True), (HOLD, True), (HOLD + 0.001, False)])
def test_app_xid_holds_for_hold_seconds_after_its_last_occurrence(age, held):
    events = [xid(T0 - 100, 13), xid(T0, 13)]
    assert bool(XidDetector().detect(window(T0 + age, events))) is held


@pytest.mark.parametrize(("age", "held"), [(HOLD + 1, True), (LIMIT, True), (LIMIT + 0.001, False)])
def test_reboot_class_xid_holds_until_the_hold_limit(age, held):
    assert bool(XidDetector().detect(window(T0 + age, [xid(T0, 79)]))) is held


@pytest.mark.parametrize("number", [79, 63, 64, 92])  # reboot, reset_gpu, inspect_hardware x2
def test_reboot_class_xid_clears_when_the_boot_changes_after_it(number):
    events = [xid(T0, number)]
    assert XidDetector().detect(window(T0 + HOLD * 3, events, boot_seen_at=T0 - 50))
    assert XidDetector().detect(window(T0 + HOLD * 3, events, boot_seen_at=T0)) != []  # not after
    assert XidDetector().detect(window(T0 + HOLD * 3, events, boot_seen_at=T0 + 120)) == []


def test_an_xid_after_the_reboot_starts_a_new_episode():
    events = [xid(T0, 79), xid(T0 + 200, 79)]
    (finding,) = XidDetector().detect(window(T0 + 300, events, boot_seen_at=T0 + 100))
    assert finding.start == T0 + 200
    assert finding.evidence["count"] == 1


def test_an_app_xid_after_a_quiet_spell_starts_a_new_episode():
    events = [xid(T0, 13), xid(T0 + 1, 13), xid(T0 + HOLD + 50, 13)]
    (finding,) = XidDetector().detect(window(T0 + HOLD + 60, events))
    assert finding.start == T0 + HOLD + 50
    assert finding.evidence["count"] == 1


def test_thresholds_are_configurable():
    detector = XidDetector(XidThresholds(hold_seconds=10.0, reboot_hold_limit_seconds=20.0))
    assert detector.detect(window(T0 + 11, [xid(T0, 13)])) == []
    assert detector.detect(window(T0 + 21, [xid(T0, 79)])) == []
    assert detector.event_window_seconds == 20.0


# --- escalation: the same reboot-class XID after a reboot ----------------------------------------


def test_a_reboot_class_xid_recurring_after_a_reboot_asks_for_hardware_inspection():
    events = [xid(T0, 79), xid(T0 + 200, 79)]
    (finding,) = XidDetector().detect(window(T0 + 300, events, boot_seen_at=T0 + 100))
    assert (finding.severity, finding.action, finding.start) == (
        "critical",
        "inspect_hardware",
        T0 + 200,
    )
    assert finding.summary == (
        "XID 79: GPU has fallen off the bus; again after the node rebooted "
        "(1 before the reboot, the last 200 s before this one): the reboot did not clear it"
    )
    assert finding.evidence == {
        "xid": 79,
        "count": 1,
        "count_before_reboot": 1,
        "last_before_reboot": T0,
        "boot_seen_at": T0 + 100,
    }
    # The same alert, escalated: the fields its fingerprint hashes are unchanged.
    assert (finding.detector, finding.node, finding.gpu, finding.job, finding.rank, finding.key) == (
        "xid",
        "n01",
        3,
        None,
        None,
        "79",
    )


@pytest.mark.parametrize("number", [63, 64, 92])  # reset_gpu, inspect_hardware x2
def test_every_reboot_class_xid_escalates(number):
    events = [xid(T0, number), xid(T0 + 200, number)]
    (finding,) = XidDetector().detect(window(T0 + 300, events, boot_seen_at=T0 + 100))
    assert finding.action == "inspect_hardware"
    assert "again after the node rebooted" in finding.summary


def test_before_the_reboot_a_repeat_is_just_a_count():
    events = [xid(T0, 79), xid(T0 + 50, 79)]
    (finding,) = XidDetector().detect(window(T0 + 60, events, boot_seen_at=T0 - 1000))
    assert (finding.action, finding.evidence) == ("reboot", {"xid": 79, "count": 2})


def test_only_the_same_xid_on_the_same_gpu_escalates():
    events = [xid(T0, 79, gpu=2), xid(T0, 48), xid(T0 + 200, 79)]
    (finding,) = XidDetector().detect(window(T0 + 300, events, boot_seen_at=T0 + 100))
    assert (finding.gpu, finding.action) == (3, "reboot")
    assert finding.summary == "XID 79: GPU has fallen off the bus"


def test_application_xids_do_not_escalate():
    events = [xid(T0, 13), xid(T0 + 200, 13)]
    (finding,) = XidDetector().detect(window(T0 + 300, events, boot_seen_at=T0 + 100))
    assert (finding.severity, finding.action) == ("warning", "check_app")


def test_without_boot_knowledge_nothing_escalates():
    events = [xid(T0, 79), xid(T0 + 200, 79)]
    (finding,) = XidDetector().detect(window(T0 + 300, events, boot_seen_at=None))
    assert finding.action == "reboot" and finding.evidence["count"] == 2


def test_escalation_through_recent_data_with_boot_ids():
    data = RecentData.for_detectors([XidDetector()])
    tracker = Tracker([XidDetector()])
    data.note_node("n01", T0, boot_id="boot-a")
    data.add_event(xid(T0 + 1, 79))
    (first,), _ = tracker.evaluate(data.window(T0 + 1, watching_since=T0))
    assert first.action == "reboot"
    data.note_node("n01", T0 + 300, boot_id="boot-b")  # rebooted: the finding closes
    opened, closed = tracker.evaluate(data.window(T0 + 300, watching_since=T0))
    assert opened == [] and [f.end for f in closed] == [T0 + 300]
    data.add_event(xid(T0 + 400, 79))  # ... and it comes back
    (again,), _ = tracker.evaluate(data.window(T0 + 400, watching_since=T0))
    assert (again.action, again.start) == ("inspect_hardware", T0 + 400)
