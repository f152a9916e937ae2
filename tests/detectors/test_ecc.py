"""EccDetector: any volatile double-bit error (as DCGM) and single-bit errors over DCGM's rate."""

import pytest

from fleetwatch.detectors.ecc import EccDetector, EccThresholds
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.table import GpuTable
from fleetwatch.records import GpuSample

T0 = 1_700_000_000.0
DBE = "ecc_dbe_volatile_total"
SBE = "ecc_sbe_volatile_total"


def window(metrics_per_second, gpu=3, node="n02", now=None, boot_seen_at=None):
    """One GPU's samples, one a second from T0, as of `now` (default: the last sample)."""
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


def dbe(*values):
    return [{DBE: v} for v in values]


def sbe_counter(increments_at, seconds):
    """SBE totals, one sample a second for `seconds`, rising by one at each second listed."""
    total, samples = 0, []
    for second in range(seconds):
        total += increments_at.count(second)
        samples.append({SBE: total})
    return samples


def keyed(findings):
    return {f.key: f for f in findings}


# --- double-bit errors -------------------------------------------------------------------------


def test_a_new_dbe_fires_at_once_with_a_readable_summary():
    (finding,) = EccDetector().detect(window(dbe(0, 0, 0, 2)))
    assert finding.summary == "GPU 3 on n02: 2 new double-bit ECC errors (volatile total 2)"
    assert (finding.detector, finding.severity, finding.action, finding.key) == (
        "ecc",
        "critical",
        "reset_gpu",
        "dbe",
    )
    assert (finding.node, finding.gpu, finding.start) == ("n02", 3, T0 + 3)
    assert finding.evidence == {"ecc_dbe_volatile_total": 2.0, "new_dbe": 2.0}


def test_one_new_dbe_is_singular():
    (finding,) = EccDetector().detect(window(dbe(0, 1)))
    assert finding.summary == "GPU 3 on n02: 1 new double-bit ECC error (volatile total 1)"


def test_start_is_the_first_sample_showing_errors_and_later_ones_are_counted():
    (finding,) = EccDetector().detect(window(dbe(0, 0, 1, 1, 3, 3)))
    assert finding.start == T0 + 2
    assert finding.evidence["new_dbe"] == 3.0


def test_no_dbe_no_finding():
    assert EccDetector().detect(window(dbe(0, 0, 0, 0))) == []


def test_counter_reset_by_a_reboot_is_not_an_error():
    assert EccDetector().detect(window(dbe(2, 2, 0, 0))) == []


def test_errors_after_a_reset_fire_without_a_new_count():
    # 3 -> 1: the counter was reset (driver reload) and 1 error came before the next sample.
    # DCGM fails a GPU for any volatile DBE, so this still fires; how many are new is unknown.
    (finding,) = EccDetector().detect(window(dbe(3, 3, 1, 1)))
    assert finding.start == T0 + 2
    assert finding.summary == ("GPU 3 on n02: 1 double-bit ECC error since the driver loaded (volatile total 1)")
    assert "new_dbe" not in finding.evidence


def test_dbes_already_there_when_watching_starts_fire():
    # DCGM's rule is "any volatile DBE"; the GPU has not been reset since they happened.
    (finding,) = EccDetector().detect(window(dbe(2, 2, 2)))
    assert finding.start == T0
    assert finding.summary == ("GPU 3 on n02: 2 double-bit ECC errors since the driver loaded (volatile total 2)")


def test_dbe_holds_until_the_counter_is_reset():
    data = RecentData(retention_seconds=EccDetector().window_seconds)
    tracker = Tracker([EccDetector()])
    values = [0] * 5 + [1] * 300 + [0] * 5  # a DBE, held for 5 minutes, then a GPU reset
    opened_at, closed_at = [], []
    for i, value in enumerate(values):
        data.add_gpu(GpuSample(t=T0 + i, node="n02", gpu=3, metrics={DBE: value}))
        opened, closed = tracker.evaluate(data.window(T0 + i, watching_since=T0))
        opened_at += [T0 + i for _ in opened]
        closed_at += [T0 + i for _ in closed]
    assert opened_at == [T0 + 5]
    assert closed_at == [T0 + 305]


def test_a_dbe_read_missing_for_a_sample_does_not_close_the_finding():
    assert EccDetector().detect(window([{DBE: 0}, {DBE: 1}, {}, {}])) != []
    # ...but a field missing for longer than the lookback is no reading at all.
    assert EccDetector().detect(window([{DBE: 0}, {DBE: 1}, {}, {}, {}])) == []


# --- single-bit error rate ---------------------------------------------------------------------

LIMIT = EccThresholds().sbe_per_window


@pytest.mark.parametrize(("errors", "fires"), [(LIMIT - 1, False), (LIMIT, True), (LIMIT + 1, True)])
def test_sbe_rate_edges(errors, fires):
    samples = sbe_counter(list(range(10, 10 + errors)), 70)
    findings = EccDetector().detect(window(samples))
    assert bool(findings) is fires
    if fires:
        (finding,) = findings
        assert (finding.severity, finding.action, finding.key) == (
            "warning",
            "inspect_hardware",
            "sbe_rate",
        )
        assert finding.start == T0 + 10 + LIMIT - 1  # the sample where the count reached it


def test_sbe_summary_and_evidence():
    samples = sbe_counter(list(range(1, 21)), 30)  # 20 SBEs, one a second
    (finding,) = EccDetector().detect(window(samples))
    assert finding.summary == ("GPU 3 on n02: 20 single-bit ECC errors in the last 29 s (limit 10 in 60 s)")
    assert finding.evidence == {
        "sbe_new": 20.0,
        "seconds": 29.0,
        "sbe_in_window": 20.0,
        "window_seconds": 60.0,
        "limit": 10,
        "ecc_sbe_volatile_total": 20.0,
    }


def test_a_single_sbe_never_fires():
    assert EccDetector().detect(window(sbe_counter([30], 200))) == []


def test_sbes_spread_thinner_than_the_rate_do_not_fire():
    # 12 SBEs, one every 12 s: at most 5 in any 60 s.
    assert EccDetector().detect(window(sbe_counter(list(range(0, 144, 12)), 150))) == []


def test_a_reset_between_sbes_is_not_counted_but_the_errors_after_it_are():
    # 50 before a reboot; after it the counter restarts from 0 and 9 new errors come: no finding.
    samples = [{SBE: 50}] * 10 + [{SBE: v} for v in range(0, 10)] + [{SBE: 9}] * 5
    assert EccDetector().detect(window(samples)) == []
    # 3 before a driver reload, 7 after it: 10 errors in the window.
    samples = [{SBE: v} for v in (5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6, 7)]
    (finding,) = EccDetector().detect(window(samples))
    assert finding.evidence["sbe_in_window"] == 10.0


BURST = sbe_counter(list(range(1, 21)), 400)  # 20 SBEs at t = 1..20, then quiet
# The 60 s count stays at 10 or more until the window slides past the burst's 11th error (t = 70).
LAST_OVER = T0 + 70
HOLD = EccThresholds().sbe_hold_seconds


@pytest.mark.parametrize(
    ("now", "held"),
    [(LAST_OVER, True), (LAST_OVER + HOLD, True), (LAST_OVER + HOLD + 0.5, False)],
)
def test_sbe_finding_holds_after_the_last_over_limit_sample(now, held):
    samples = BURST[: int(now - T0) + 1]
    findings = EccDetector().detect(window(samples, now=now))
    assert bool(findings) is held
    if now == LAST_OVER:
        assert findings[0].start == T0 + 10  # later on the window no longer reaches back there


def test_a_reboot_ends_the_sbe_finding():
    samples = [{SBE: v + 5} for v in range(30)] + [{SBE: 0}] * 10  # rebooted at t = 30
    assert EccDetector().detect(window(samples)) != []  # a driver reload: the errors were recent
    assert EccDetector().detect(window(samples, boot_seen_at=T0 + 30)) == []
    # Errors after the reboot count from the reboot on.
    after = samples + [{SBE: v} for v in range(1, 11)]
    (finding,) = EccDetector().detect(window(after, boot_seen_at=T0 + 30))
    assert finding.start == T0 + 49 and finding.evidence["sbe_new"] == 10.0


def test_dbe_and_sbe_findings_are_separate():
    samples = [{DBE: 0, SBE: i} for i in range(20)] + [{DBE: 1, SBE: 20}]
    assert set(keyed(EccDetector().detect(window(samples)))) == {"dbe", "sbe_rate"}


# --- missing fields, stale data, cost --------------------------------------------------------


@pytest.mark.parametrize("metrics", [{}, {"temp_gpu_celsius": 60}, {"ecc_sbe_aggregate_total": 9}])
def test_missing_fields_give_no_finding(metrics):
    assert EccDetector().detect(window([metrics] * 5)) == []


def test_sbe_field_that_comes_and_goes_does_not_crash():
    samples = [{SBE: i} if i % 3 else {} for i in range(40)]
    findings = EccDetector().detect(window(samples))
    assert [f.key for f in findings] == ["sbe_rate"]


def test_stale_samples_say_nothing_about_now():
    old = window(dbe(0, 1), now=T0 + 1 + EccThresholds().max_sample_age_seconds + 1)
    assert EccDetector().detect(old) == []


def test_healthy_gpus_are_judged_together_not_one_by_one(monkeypatch):
    # A healthy fleet is judged with numpy over the newest readings and the window's ends: no GPU's
    # series is walked or even opened (the table's per-GPU reads raise here).
    data = RecentData.for_detectors([EccDetector()])
    healthy = {DBE: 0, SBE: 4}
    for i in range(180):
        for gpu in range(8):
            data.add_gpu(GpuSample(T0 + i, "n01", gpu, healthy))
    w = data.window(T0 + 179, watching_since=T0)

    def refuse(*args, **kwargs):
        raise AssertionError("a healthy GPU must not be looked at one by one")

    monkeypatch.setattr(GpuTable, "series", refuse)
    monkeypatch.setattr(GpuTable, "sample", refuse)
    assert EccDetector().detect(w) == []


def test_thresholds_validate():
    with pytest.raises(ValueError):
        EccThresholds(sbe_per_window=0)
    with pytest.raises(ValueError):
        EccThresholds(sbe_window_seconds=0)
    assert EccDetector().window_seconds == 180.0
