"""NvlinkDetector: a link that went down, and replay/recovery/CRC errors at DCGM's limits."""

import pytest

from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.nvlink import NvlinkDetector, NvlinkThresholds
from fleetwatch.detectors.table import GpuTable
from fleetwatch.records import GpuSample

T0 = 1_700_000_000.0
REPLAY = "nvlink_replay_errors_total"
RECOVERY = "nvlink_recovery_errors_total"
FLIT = "nvlink_crc_flit_errors_total"
DATA = "nvlink_crc_data_errors_total"


def links(up=18, total=18, replay=0, recovery=0, flit=0):
    # H100: no data-CRC counter (absent, as the agent sends it).
    return {
        "nvlink_links_up": up,
        "nvlink_links_total": total,
        REPLAY: replay,
        RECOVERY: recovery,
        FLIT: flit,
    }


def window(per_gpu, node="n02", now=None, boot_seen_at=None):
    """`per_gpu`: {gpu: [metrics, one a second from T0]}."""
    gpus = {
        (node, gpu): [GpuSample(T0 + i, node, gpu, m) for i, m in enumerate(history)]
        for gpu, history in per_gpu.items()
    }
    last = max(s[-1].t for s in gpus.values())
    now = last if now is None else now
    state = NodeState(node, last, 1.0, boot_id="b", boot_seen_at=boot_seen_at)
    return Window(now=now, gpu=gpus, host={}, events=[], steps=[], nodes={node: state}, watching_since=T0)


def alone(history, **kwargs):
    return window({7: history}, **kwargs)


def with_peers(history, **kwargs):
    """GPU 7 with `history` on a node whose other seven GPUs have every link up."""
    return window({**{gpu: [links()] * len(history) for gpu in range(7)}, 7: history}, **kwargs)


# --- links down ----------------------------------------------------------------------------------

DOWN_SAMPLES = NvlinkThresholds().link_down_samples


@pytest.mark.parametrize(("down", "fires"), [(DOWN_SAMPLES - 1, False), (DOWN_SAMPLES, True)])
def test_a_link_that_drops_fires_after_n_samples(down, fires):
    history = [links()] * 5 + [links(up=17)] * down
    assert bool(NvlinkDetector().detect(alone(history))) is fires


def test_link_down_finding_reads_well():
    (finding,) = NvlinkDetector().detect(alone([links()] * 5 + [links(up=17)] * 3))
    assert finding.summary == "GPU 7 on n02: 1 NVLink link down (17 of 18 up, earlier 18)"
    assert (finding.detector, finding.severity, finding.action) == ("nvlink", "critical", "reboot")
    assert (finding.node, finding.gpu, finding.start) == ("n02", 7, T0 + 5)
    assert finding.evidence == {
        "nvlink_links_up": 17.0,
        "nvlink_links_total": 18.0,
        "links_expected_up": 18.0,
        "links_down": 1.0,
    }


def test_a_link_down_from_the_start_is_found_against_its_peers():
    (finding,) = NvlinkDetector().detect(with_peers([links(up=16)] * 3))
    assert finding.gpu == 7 and finding.start == T0
    assert finding.summary == ("GPU 7 on n02: 2 NVLink links down (16 of 18 up, its peers have all 18)")


def test_a_link_that_stays_down_is_still_reported_after_the_drop_leaves_the_window():
    history = [links()] * 10 + [links(up=17)] * 400
    assert NvlinkDetector().detect(with_peers(history)) != []
    # Alone there is nothing left to compare with once the drop has left the window.
    assert NvlinkDetector().detect(alone(history)) == []


def test_links_never_up_on_any_gpu_are_not_a_fault():
    # NVLink unused (e.g. PCIe boards without bridges): every GPU reports its links inactive.
    per_gpu = {gpu: [links(up=0)] * 30 for gpu in range(8)}
    assert NvlinkDetector().detect(window(per_gpu)) == []


def test_a_change_in_the_link_total_is_not_a_drop():
    history = [links(up=18, total=18)] * 5 + [links(up=12, total=12)] * 5
    assert NvlinkDetector().detect(alone(history)) == []


def test_a_link_that_comes_back_resolves_the_finding():
    data = RecentData(retention_seconds=NvlinkDetector().window_seconds)
    tracker = Tracker([NvlinkDetector()])
    history = [links()] * 3 + [links(up=17)] * 5 + [links()] * 3
    events = []
    for i, metrics in enumerate(history):
        data.add_gpu(GpuSample(T0 + i, "n02", 7, metrics))
        opened, closed = tracker.evaluate(data.window(T0 + i, watching_since=T0))
        events += [("open", i)] * len(opened) + [("close", i)] * len(closed)
    assert events == [("open", 3 + DOWN_SAMPLES - 1), ("close", 8)]


def test_one_failed_read_of_the_link_counts_does_not_close_the_finding():
    history = [links()] * 3 + [links(up=17)] * 3 + [{REPLAY: 0}]
    assert NvlinkDetector().detect(alone(history)) != []


# --- error counters ------------------------------------------------------------------------------


def counter(name, increments_at, seconds, per_step=1):
    """links() samples, one a second, counter `name` rising by `per_step` at each second listed."""
    total, history = 0, []
    for second in range(seconds):
        total += per_step * increments_at.count(second)
        history.append({**links(), name: total})
    return history


@pytest.mark.parametrize("name", [REPLAY, RECOVERY])
@pytest.mark.parametrize(("errors", "fires"), [(0, False), (1, True), (2, True)])
def test_replay_and_recovery_errors_fail_at_one_like_dcgm(name, errors, fires):
    history = counter(name, [10] * errors, 30)
    findings = NvlinkDetector().detect(alone(history))
    assert bool(findings) is fires
    if fires:
        (finding,) = findings
        assert (finding.severity, finding.action) == ("critical", "inspect_hardware")
        assert finding.start == T0 + 10


@pytest.mark.parametrize(("per_second", "fires"), [(99, False), (100, True), (101, True)])
def test_crc_errors_fail_at_100_a_second(per_second, fires):
    history = counter(FLIT, list(range(1, 62)), 62, per_step=per_second)
    assert bool(NvlinkDetector().detect(alone(history))) is fires


def test_crc_errors_below_the_rate_show_in_the_summary_of_a_replay_finding():
    history = []
    for second in range(40):
        history.append(links(replay=second // 2, flit=20 * second))
    (finding,) = NvlinkDetector().detect(alone(history))
    assert finding.summary == ("GPU 7 on n02: NVLink errors in the last 39 s: 19 replays, 780 CRC flit errors (20/s)")
    assert finding.evidence == {
        "errors": {"replay": 19.0, "CRC flit error": 780.0},
        "seconds": 39.0,
        "in_window": {REPLAY: 19.0, FLIT: 780.0},
        "window_seconds": 60.0,
    }
    assert finding.start == T0 + 2


def test_a_counter_reset_is_not_errors():
    history = [links(replay=500, recovery=3, flit=9000)] * 10 + [links()] * 10
    assert NvlinkDetector().detect(alone(history)) == []


HOLD = NvlinkThresholds().error_hold_seconds
ONE_REPLAY = counter(REPLAY, [10], 300)
LAST_OVER = T0 + 69  # the replay at t = 10 leaves the 60 s window at t = 70


@pytest.mark.parametrize(
    ("now", "held"),
    [(LAST_OVER, True), (LAST_OVER + HOLD, True), (LAST_OVER + HOLD + 0.5, False)],
)
def test_error_finding_holds_after_the_last_over_limit_sample(now, held):
    history = ONE_REPLAY[: int(now - T0) + 1]
    assert bool(NvlinkDetector().detect(alone(history, now=now))) is held


def test_a_reboot_ends_the_error_finding():
    history = counter(REPLAY, [10, 11, 12], 20) + [links()] * 5  # rebooted at t = 20
    assert NvlinkDetector().detect(alone(history, boot_seen_at=T0 + 20)) == []


def test_a_dropped_link_and_its_recovery_are_one_finding():
    # A link that drops is retrained: the recovery counter ticks as the link goes down.
    history = [links()] * 5 + [links(up=17, recovery=1)] * 5
    (finding,) = NvlinkDetector().detect(with_peers(history))
    assert finding.action == "reboot"
    assert finding.start == T0 + 5
    assert finding.summary == (
        "GPU 7 on n02: 1 NVLink link down (17 of 18 up, its peers have all 18); "
        "NVLink errors in the last 9 s: 1 recovery"
    )


@pytest.mark.parametrize(
    "metrics",
    [
        {},  # no NVLink
        {"nvlink_links_up": 18},  # no total to compare with
        {"nvlink_links_total": 18},
        {REPLAY: 5},
    ],
)
def test_missing_fields_give_no_finding(metrics):
    assert NvlinkDetector().detect(alone([metrics] * 10)) == []


def test_counters_that_come_and_go_do_not_crash():
    history = [links(replay=i) if i % 4 else {"nvlink_links_up": 18} for i in range(30)]
    (finding,) = NvlinkDetector().detect(alone(history))
    assert finding.action == "inspect_hardware"


def test_stale_samples_say_nothing_about_now():
    late = T0 + 10 + NvlinkThresholds().max_sample_age_seconds + 1
    assert NvlinkDetector().detect(alone([links(up=17)] * 10, now=late)) == []


def test_healthy_gpus_are_judged_together_not_one_by_one(monkeypatch):
    # A healthy fleet is judged with numpy over the newest readings and the window's ends: no GPU's
    # series is walked or even opened (the table's per-GPU reads raise here).
    data = RecentData.for_detectors([NvlinkDetector()])
    for i in range(180):
        for gpu in range(8):
            data.add_gpu(GpuSample(T0 + i, "n01", gpu, links()))
    w = data.window(T0 + 179, watching_since=T0)

    def refuse(*args, **kwargs):
        raise AssertionError("a healthy GPU must not be looked at one by one")

    monkeypatch.setattr(GpuTable, "series", refuse)
    monkeypatch.setattr(GpuTable, "sample", refuse)
    assert NvlinkDetector().detect(w) == []


def test_thresholds_validate():
    with pytest.raises(ValueError):
        NvlinkThresholds(replay_recovery_errors=0)
    with pytest.raises(ValueError):
        NvlinkThresholds(link_down_samples=0)
    assert NvlinkDetector().window_seconds == 180.0
