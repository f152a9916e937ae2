"""NodeSilentDetector: no data for 3 sampling intervals, unless the watcher itself just started."""

import pytest

from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.node_silent import NodeSilentDetector, NodeSilentThresholds
from fleetwatch.records import HostSample

T0 = 1_700_000_000.0


def window(now, last_seen, interval=1.0, watching_since=T0 - 3600):
    nodes = {"n01": NodeState("n01", last_seen=last_seen, sampling_interval_seconds=interval)}
    return Window(now=now, gpu={}, host={}, events=[], steps=[], nodes=nodes, watching_since=watching_since)


@pytest.mark.parametrize(("silent", "fires"), [(2.9, False), (3.0, True), (10.0, True)])
def test_three_sampling_intervals_edges(silent, fires):
    assert bool(NodeSilentDetector().detect(window(T0 + silent, last_seen=T0))) is fires


def test_finding_shape():
    (finding,) = NodeSilentDetector().detect(window(T0 + 12, last_seen=T0, interval=2.0))
    assert (finding.detector, finding.severity, finding.action) == (
        "node_silent",
        "warning",
        "inspect_hardware",
    )
    assert (finding.node, finding.gpu, finding.start) == ("n01", None, T0)
    assert finding.summary == "node n01 silent: no data for 12 s (6 sampling intervals of 2 s)"
    assert finding.evidence == {
        "last_seen": T0,
        "silent_seconds": 12.0,
        "sampling_interval_seconds": 2.0,
    }


def test_uses_each_nodes_own_interval():
    assert NodeSilentDetector().detect(window(T0 + 25, last_seen=T0, interval=10.0)) == []
    assert NodeSilentDetector().detect(window(T0 + 30, last_seen=T0, interval=10.0)) != []


def test_fast_sampling_has_a_floor():
    floor = NodeSilentThresholds().min_silent_seconds
    assert NodeSilentDetector().detect(window(T0 + floor - 0.1, last_seen=T0, interval=0.1)) == []
    assert NodeSilentDetector().detect(window(T0 + floor, last_seen=T0, interval=0.1)) != []


@pytest.mark.parametrize(("watching_for", "fires"), [(0.0, False), (2.9, False), (3.0, True)])
def test_a_watcher_that_just_started_is_not_a_silent_node(watching_for, fires):
    # Last seen long ago (e.g. from the inventory before a collector restart).
    silent = window(T0 + watching_for, last_seen=T0 - 600, watching_since=T0)
    assert bool(NodeSilentDetector().detect(silent)) is fires


def test_node_never_heard_from_counts_from_when_watching_began():
    assert NodeSilentDetector().detect(window(T0 + 2, last_seen=None, watching_since=T0)) == []
    (finding,) = NodeSilentDetector().detect(window(T0 + 5, last_seen=None, watching_since=T0))
    assert finding.start == T0
    assert finding.summary == "node n01 silent: no data since watching began 5 s ago"


def test_collector_restart_then_lifecycle_resolves_when_data_flows_again():
    data = RecentData(retention_seconds=10)
    tracker = Tracker([NodeSilentDetector()])
    restart = T0 + 1000
    data.note_node("n01", T0, sampling_interval_seconds=1.0)  # seeded from before the restart
    data.note_node("n02", T0, sampling_interval_seconds=1.0)
    events = []
    for t in range(0, 8):
        now = restart + t
        if t >= 1:
            data.add_host(HostSample(t=now, node="n01", metrics={}))  # n01 came back, n02 did not
        opened, closed = tracker.evaluate(data.window(now, watching_since=restart))
        events += [("open", f.node, t) for f in opened] + [("close", f.node, t) for f in closed]
    assert events == [("open", "n02", 3)]

    data.add_host(HostSample(t=restart + 8, node="n02", metrics={}))
    opened, closed = tracker.evaluate(data.window(restart + 8, watching_since=restart))
    assert opened == [] and [(f.node, f.start, f.end) for f in closed] == [("n02", T0, restart + 8)]


def run_reboot(down_seconds, interval=30.0):
    """A node sampling every `interval` s reboots: silent for `down_seconds`, then a new boot_id."""
    data = RecentData(retention_seconds=600)
    tracker = Tracker([NodeSilentDetector()])
    changes = []
    data.note_node("n01", T0, boot_id="boot-a", sampling_interval_seconds=interval)
    back = T0 + 300 + down_seconds
    for second in range(0, int(300 + down_seconds + 300)):
        now = T0 + second
        in_old_boot = now <= T0 + 300
        if (in_old_boot or now >= back) and second % int(interval) == 0:
            boot_id = "boot-a" if in_old_boot else "boot-b"
            data.note_node("n01", now, boot_id=boot_id)
            data.add_host(HostSample(t=now, node="n01", metrics={}))
        opened, closed = tracker.evaluate(data.window(now, watching_since=T0))
        changes += [("open", f.start, second) for f in opened]
        changes += [("close", f.end, second) for f in closed]
    return changes, data.window(T0 + 300 + down_seconds + 300, watching_since=T0)


def test_a_reboot_shorter_than_the_silence_limit_raises_nothing():
    # 30 s sampling: silent after 90 s; the node is back in a new boot 60 s after its last sample.
    changes, window = run_reboot(down_seconds=60)
    assert changes == []
    state = window.nodes["n01"]
    assert (state.boot_id, state.boot_seen_at) == ("boot-b", T0 + 360)


def test_a_reboot_longer_than_the_limit_is_silence_until_the_new_boot_reports():
    changes, _ = run_reboot(down_seconds=150)
    assert changes == [("open", T0 + 300, 390), ("close", T0 + 450, 450)]
