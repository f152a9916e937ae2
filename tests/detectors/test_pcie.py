"""PcieDetector: replay rate over DCGM's limit, and a link trained below its maximum."""

import pytest

from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.pcie import PcieDetector, PcieThresholds
from fleetwatch.records import GpuSample

T0 = 1_700_000_000.0
FULL = {
    "pcie_link_gen": 5,
    "pcie_link_gen_max": 5,
    "pcie_link_width": 16,
    "pcie_link_width_max": 16,
}


def window(metrics_per_second, gpu=1, node="n01", now=None, boot_seen_at=None):
    samples = [GpuSample(t=T0 + i, node=node, gpu=gpu, metrics=m) for i, m in enumerate(metrics_per_second)]
    now = samples[-1].t if now is None else now
    state = NodeState(node, samples[-1].t, 1.0, boot_id="b", boot_seen_at=boot_seen_at)
    return Window(
        now=now,
        gpu={(node, gpu): samples},
        host={},
        events=[],
        steps=[],
        nodes={node: state},
        watching_since=T0,
    )


def replays(increments_at, seconds, base=9, link=FULL):
    """One sample a second for `seconds`; the replay counter rises by one at each second listed."""
    total, samples = base, []
    for second in range(seconds):
        total += increments_at.count(second)
        samples.append({**link, "pcie_replay_total": total})
    return samples


def link(gen=5, width=16, util=98, gen_max=5, width_max=16):
    return {
        "pcie_link_gen": gen,
        "pcie_link_gen_max": gen_max,
        "pcie_link_width": width,
        "pcie_link_width_max": width_max,
        "gpu_util_percent": util,
    }


# --- replay rate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gen", "width", "limit"),
    [(5, 16, 31), (4, 16, 16), (3, 16, 8), (1, 16, 3), (5, 8, 16), (6, 16, 62), (7, 16, 62)],
)
def test_replay_limit_follows_dcgm_bit_error_rate(gen, width, limit):
    assert PcieThresholds().replay_limit(gen, width) == limit


def test_replay_limit_without_link_fields_is_8_a_minute():
    assert PcieThresholds().replay_limit(None, 16) == 8
    assert PcieThresholds().replay_limit(5, None) == 8


@pytest.mark.parametrize(("count", "fires"), [(30, False), (31, False), (32, True)])
def test_replay_edges_at_gen5_x16(count, fires):
    samples = replays(list(range(5, 5 + count)), 70)
    assert bool(PcieDetector().detect(window(samples))) is fires


@pytest.mark.parametrize(("count", "fires"), [(8, False), (9, True)])
def test_replay_edges_without_link_fields(count, fires):
    samples = replays(list(range(5, 5 + count)), 70, link={})
    assert bool(PcieDetector().detect(window(samples))) is fires


def test_sustained_replays_fire_with_a_readable_summary():
    samples = replays([s for s in range(1, 70) for _ in range(2)], 70)  # 2 a second
    (finding,) = PcieDetector().detect(window(samples))
    assert (finding.detector, finding.severity, finding.action, finding.key) == (
        "pcie",
        "warning",
        "inspect_hardware",
        "replay_rate",
    )
    assert finding.start == T0 + 16  # the 32nd replay
    assert finding.summary == ("GPU 1 on n01: 138 PCIe replays in the last 69 s (limit 31 in 60 s at Gen5 x16)")
    assert finding.evidence == {
        "replays": 138.0,
        "seconds": 69.0,
        "replays_in_window": 120.0,
        "window_seconds": 60.0,
        "limit": 31.0,
        "pcie_replay_total": 147.0,
        "pcie_link_gen": 5.0,
        "pcie_link_width": 16.0,
    }


def test_a_blip_of_replays_does_not_fire():
    assert PcieDetector().detect(window(replays([30] * 5, 200))) == []


def test_a_counter_reset_is_not_replays():
    samples = [{**FULL, "pcie_replay_total": 5000}] * 10 + [{**FULL, "pcie_replay_total": 0}] * 10
    assert PcieDetector().detect(window(samples)) == []


HOLD = PcieThresholds().replay_hold_seconds
BURST = replays([s for s in range(1, 101) for _ in range(2)], 400)  # 2 a second for 100 s
LAST_OVER = T0 + 144  # the 60 s count falls to 31 or less once the window leaves t = 84 behind


@pytest.mark.parametrize(
    ("now", "held"),
    [(LAST_OVER, True), (LAST_OVER + HOLD, True), (LAST_OVER + HOLD + 0.5, False)],
)
def test_replay_finding_holds_after_the_last_over_limit_sample(now, held):
    findings = PcieDetector().detect(window(BURST[: int(now - T0) + 1], now=now))
    assert bool(findings) is held


def test_a_reboot_ends_the_replay_finding():
    samples = BURST[:110] + [{**FULL, "pcie_replay_total": 0}] * 10  # rebooted at t = 110
    assert PcieDetector().detect(window(samples)) != []  # a driver reload: replays were recent
    assert PcieDetector().detect(window(samples, boot_seen_at=T0 + 110)) == []


# --- link training -------------------------------------------------------------------------------

N = PcieThresholds().link_samples


@pytest.mark.parametrize(("low", "fires"), [(N - 1, False), (N, True), (N + 3, True)])
def test_width_below_max_fires_after_n_samples(low, fires):
    samples = [link()] * 5 + [link(width=8)] * low
    findings = PcieDetector().detect(window(samples))
    assert bool(findings) is fires
    if fires:
        (finding,) = findings
        assert (finding.severity, finding.action, finding.key) == (
            "warning",
            "inspect_hardware",
            "link",
        )
        assert finding.start == T0 + 5


def test_downtrained_link_summary_and_evidence():
    (finding,) = PcieDetector().detect(window([link(gen=4, width=8, util=97)] * N))
    assert finding.summary == (
        "GPU 1 on n01: PCIe link trained at Gen4 x8, width and generation below its maximum "
        "Gen5 x16, at 97 % utilisation"
    )
    assert finding.evidence == {
        "width_low": True,
        "gen_low": True,
        "pcie_link_gen": 4.0,
        "pcie_link_gen_max": 5.0,
        "pcie_link_width": 8.0,
        "pcie_link_width_max": 16.0,
        "gpu_util_percent": 97.0,
    }


def test_width_below_max_fires_when_idle_too():
    (finding,) = PcieDetector().detect(window([link(gen=1, width=8, util=0)] * N))
    assert finding.summary == ("GPU 1 on n01: PCIe link trained at Gen1 x8, width below its maximum Gen5 x16")
    assert finding.evidence["gen_low"] is False


def test_width_can_be_judged_on_busy_samples_only():
    detector = PcieDetector(PcieThresholds(width_requires_busy=True))
    assert detector.detect(window([link(width=8, util=0)] * 12)) == []
    assert detector.detect(window([link(width=8, util=90)] * N)) != []


def test_an_idle_gpu_at_a_lower_generation_is_normal():
    assert PcieDetector().detect(window([link(gen=1, util=0)] * 60)) == []


@pytest.mark.parametrize(("busy", "fires"), [(N - 1, False), (N, True)])
def test_generation_below_max_while_busy_fires_after_n_busy_samples(busy, fires):
    samples = [link(gen=1, util=0)] * 10 + [link(gen=4, util=99)] * busy
    assert bool(PcieDetector().detect(window(samples))) is fires


def test_generation_low_while_busy_says_so():
    (finding,) = PcieDetector().detect(window([link(gen=3, util=80)] * N))
    assert finding.summary == (
        "GPU 1 on n01: PCIe link trained at Gen3 x16, generation below its maximum Gen5 x16, at 80 % utilisation"
    )


def test_generation_rule_skips_short_dips_in_load():
    busy_low, dip = link(gen=4, util=99), link(gen=1, util=10)
    samples = [busy_low] * 3 + [dip] * 2 + [busy_low] * 2 + [dip] * 2
    (finding,) = PcieDetector().detect(window(samples))
    assert finding.start == T0


def test_a_dip_at_the_newest_sample_reports_the_busy_reading():
    samples = [link(gen=4, util=99)] * N + [link(gen=1, util=3)] * 2
    (finding,) = PcieDetector().detect(window(samples))
    assert finding.summary == (
        "GPU 1 on n01: PCIe link trained at Gen4 x16, generation below its maximum Gen5 x16, at 99 % utilisation"
    )


def test_width_finding_without_generation_fields():
    samples = [{"pcie_link_width": 8, "pcie_link_width_max": 16}] * N
    (finding,) = PcieDetector().detect(window(samples))
    assert finding.summary == ("GPU 1 on n01: PCIe link trained at x8, width below its maximum x16")


def test_generation_rule_needs_enough_busy_samples_lately():
    busy_low, idle = link(gen=4, util=99), link(gen=1, util=0)
    assert PcieDetector().detect(window([busy_low] * N + [idle] * 10)) == []


def test_a_single_busy_sample_at_max_breaks_the_run():
    samples = [link(gen=4)] * 10 + [link(gen=5)] + [link(gen=4)] * (N - 1)
    assert PcieDetector().detect(window(samples)) == []


def test_link_finding_resolves_when_the_link_retrains():
    data = RecentData(retention_seconds=PcieDetector().window_seconds)
    tracker = Tracker([PcieDetector()])
    history = [link()] * 3 + [link(width=8)] * 10 + [link()] * 3
    events = []
    for i, metrics in enumerate(history):
        data.add_gpu(GpuSample(T0 + i, "n01", 1, metrics))
        opened, closed = tracker.evaluate(data.window(T0 + i, watching_since=T0))
        events += [("open", i)] * len(opened) + [("close", i)] * len(closed)
    assert events == [("open", 3 + N - 1), ("close", 13)]


def test_one_failed_read_does_not_close_the_link_finding():
    samples = [link(width=8)] * N + [{"gpu_util_percent": 99}]
    assert PcieDetector().detect(window(samples)) != []


def test_replays_and_link_are_two_findings():
    low = link(width=8)
    samples = [{**low, "pcie_replay_total": 2 * i} for i in range(40)]
    assert sorted(f.key for f in PcieDetector().detect(window(samples))) == ["link", "replay_rate"]


@pytest.mark.parametrize(
    "metrics",
    [
        {},
        {"pcie_link_gen": 4},  # no maximum to compare with
        {"pcie_link_width": 8, "gpu_util_percent": 99},
        {"pcie_replay_total": 5},
    ],
)
def test_missing_fields_give_no_finding(metrics):
    assert PcieDetector().detect(window([metrics] * 20)) == []


def test_stale_samples_say_nothing_about_now():
    late = T0 + 10 + PcieThresholds().max_sample_age_seconds + 1
    assert PcieDetector().detect(window([link(width=8)] * 10, now=late)) == []


def test_thresholds_validate():
    with pytest.raises(ValueError):
        PcieThresholds(link_samples=11, link_lookback_samples=10)
    with pytest.raises(ValueError):
        PcieThresholds(replay_window_seconds=0)
    assert PcieDetector().window_seconds == 180.0
