"""Tests for XidMerger: an XID seen through NVML and the kernel log is sent once, repeats N times."""

from __future__ import annotations

import threading

import pytest

from fleetwatch.agent.xid_merge import XidMerger


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def nvml(xid: int, gpu: int = 3, bus_id: str | None = "0000:9b:00.0") -> dict:
    return {
        "t": 1.0,
        "kind": "xid",
        "gpu": gpu,
        "uuid": "GPU-1",
        "pci_bus_id": bus_id,
        "xid": xid,
        "message": "",
        "source": "nvml",
    }


def kmsg(xid: int, gpu: int | None = 3, bus_id: str = "0000:9b:00.0") -> dict:
    return {
        "t": 2.0,
        "kind": "xid",
        "gpu": gpu,
        "uuid": None,
        "pci_bus_id": bus_id,
        "xid": xid,
        "message": "x",
        "source": "kmsg",
    }


@pytest.mark.parametrize("first,second", [(nvml(79), kmsg(79)), (kmsg(79), nvml(79))])
def test_seen_on_both_paths_is_sent_once(first: dict, second: dict) -> None:
    merger = XidMerger(clock=FakeClock())
    assert merger.admit(first) is True
    assert merger.admit(second) is False
    assert merger.duplicates_total == 1
    assert merger.pending() == 0


def test_matched_by_bus_id_when_the_kernel_log_could_not_name_the_gpu() -> None:
    merger = XidMerger(clock=FakeClock())
    assert merger.admit(nvml(48, bus_id="00000000:9B:00.0"))  # NVML's spelling
    assert not merger.admit(kmsg(48, gpu=None, bus_id="0000:9b:00.0"))


def test_a_burst_seen_on_both_paths_is_sent_n_times() -> None:
    merger = XidMerger(clock=FakeClock())
    n = 6
    # interleaved as the two threads deliver them: kernel log first, NVML a moment later
    sent = sum(merger.admit(e) for pair in zip([kmsg(13)] * n, [nvml(13)] * n) for e in pair)
    assert sent == n
    # one path ahead of the other by the whole burst
    merger = XidMerger(clock=FakeClock())
    sent = sum(merger.admit(e) for e in [nvml(13)] * n + [kmsg(13)] * n)
    assert sent == n


def test_repeats_on_one_path_are_all_sent() -> None:
    merger = XidMerger(clock=FakeClock())
    assert all(merger.admit(kmsg(119)) for _ in range(5))
    assert all(merger.admit(nvml(31)) for _ in range(3))


def test_different_xid_or_gpu_are_both_sent() -> None:
    merger = XidMerger(clock=FakeClock())
    assert merger.admit(nvml(13, gpu=3))
    assert merger.admit(kmsg(31, gpu=3))  # another XID
    assert merger.admit(kmsg(13, gpu=4, bus_id="0000:bb:00.0"))  # another GPU
    assert not merger.admit(kmsg(13, gpu=3))  # the twin of the first


def test_outside_the_window_both_are_sent() -> None:
    clock = FakeClock()
    merger = XidMerger(window_seconds=10.0, clock=clock)
    assert merger.admit(nvml(79))
    clock.now += 10.5
    assert merger.admit(kmsg(79))
    assert merger.pending() == 1  # the NVML one expired; the kernel-log one now waits for a twin
    clock.now += 5.0
    assert not merger.admit(nvml(79))  # within the window of the kernel-log one


def test_events_that_are_not_xids_pass() -> None:
    merger = XidMerger(clock=FakeClock())
    lost = {"t": 1.0, "kind": "gpu_lost", "gpu": 3, "source": "nvml"}
    assert merger.admit(lost) and merger.admit(lost)
    assert merger.admit(kmsg(13, gpu=None, bus_id="")) and merger.admit(nvml(13, gpu=None, bus_id=None))
    assert merger.pending() == 0


def test_memory_stays_bounded() -> None:
    clock = FakeClock()
    merger = XidMerger(window_seconds=10.0, clock=clock, max_pending=100)
    for i in range(1000):
        merger.admit(kmsg(13, gpu=i % 8))
    assert merger.pending() == 100
    assert merger.evicted_total == 900
    clock.now += 11.0
    assert merger.pending() == 0


def test_two_threads_burst_is_sent_exactly_n_times() -> None:
    merger = XidMerger(clock=FakeClock())
    n = 2000
    start = threading.Barrier(2)
    sent = [0, 0]

    def run(slot: int, make) -> None:
        start.wait()
        for _ in range(n):
            sent[slot] += merger.admit(make(13))

    threads = [threading.Thread(target=run, args=(0, nvml)), threading.Thread(target=run, args=(1, kmsg))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10.0)
    assert sum(sent) == n
    assert merger.duplicates_total == n
    assert merger.pending() == 0
