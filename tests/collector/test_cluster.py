"""Collectors sharing one database: leases held by one at a time, moved when the holder stops."""

from __future__ import annotations

from fleetwatch.collector.cluster import ALERTS, DUTIES, FLEET_DETECTION, Cluster
from fleetwatch.collector.storage.store import Store, StoreError


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_one_lease_one_holder_and_it_moves_when_the_holder_stops_renewing(store: Store) -> None:
    clock = Clock()
    a = Cluster(store, collector_id="a", clock=clock)
    b = Cluster(store, collector_id="b", clock=clock)
    a.tick(3, ["n01", "n02"])
    b.tick(1, ["n03"])
    assert all(a.holds(duty) for duty in DUTIES) and not any(b.holds(duty) for duty in DUTIES)
    # a renews; b keeps asking and keeps being refused.
    for _ in range(5):
        clock.t += 3
        a.tick(3, ["n01", "n02"])
        b.tick(1, ["n03"])
    assert a.holds(ALERTS) and not b.holds(ALERTS)
    # a dies (no more ticks): within the TTL and one renewal, b has every duty.
    for _ in range(6):
        clock.t += 3
        b.tick(1, ["n03"])
    assert all(b.holds(duty) for duty in DUTIES)
    # a does not act on what it can no longer renew.
    assert not a.holds(FLEET_DETECTION)
    state = b.state()
    by_id = {c["id"]: c for c in state["collectors"]}
    assert by_id["b"]["alive"] and not by_id["a"]["alive"]
    assert by_id["b"]["leases"] == sorted(DUTIES) and by_id["a"]["leases"] == []
    assert state["node_collectors"] == {} or all(v in ("a", "b") for v in state["node_collectors"].values())


def test_a_clean_stop_hands_the_leases_over_at_the_next_tick(store: Store) -> None:
    clock = Clock()
    a = Cluster(store, collector_id="a", clock=clock)
    b = Cluster(store, collector_id="b", clock=clock)
    a.tick(0, [])
    b.tick(0, [])
    a.leave()
    clock.t += 1
    b.tick(0, [])
    assert b.holds(ALERTS) and [c["id"] for c in b.state()["collectors"]] == ["b"]


def test_nodes_are_recorded_with_the_collector_they_stream_to(store: Store) -> None:
    store.upsert_node("n01", "boot-a", "0.4.0", True, 1.0, [], seen_at=1.0)
    store.upsert_node("n02", "boot-a", "0.4.0", True, 1.0, [], seen_at=1.0)
    a = Cluster(store, collector_id="a", clock=Clock())
    b = Cluster(store, collector_id="b", clock=Clock())
    a.tick(2, ["n01", "n02"])
    b.tick(1, ["n02"])  # n02 moved to b
    assert store.node_holders() == {"n01": "a", "n02": "b"}
    nodes = {c["id"]: c["nodes"] for c in a.state()["collectors"]}
    assert nodes == {"a": 1, "b": 1}


def test_a_holder_whose_database_fails_stops_acting_before_its_lease_can_move(store: Store, monkeypatch) -> None:
    clock = Clock()
    a = Cluster(store, collector_id="a", clock=clock)
    a.tick(0, [])
    assert a.holds(ALERTS)

    def unreachable(*args: object) -> None:
        raise StoreError("database unreachable")

    monkeypatch.setattr(store, "beat", unreachable)  # every renewal fails from now on
    clock.t += 3
    a.tick(0, [])
    assert a.holds(ALERTS) and a.renew_failures == 1  # still within its lease
    clock.t += 6  # 9 s after the last renewal: 2 s before another collector could take it
    a.tick(0, [])
    assert not a.holds(ALERTS)
