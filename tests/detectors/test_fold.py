"""One page per fault (detectors.fold): a straggler rides on its GPU's firing hardware finding.

Driven through the Tracker, which the collector and replay both run: scripted detectors say what
they find at each evaluation, and the test reads what opens and closes, as alerts would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import pytest

from fleetwatch.detectors.engine import Tracker
from fleetwatch.detectors.fold import HARDWARE_WAIT_SECONDS, StragglerFolding
from fleetwatch.detectors.model import Window
from fleetwatch.detectors.replay import Episode, unfolded
from fleetwatch.nvml_bits import HW_SLOWDOWN, HW_THERMAL_SLOWDOWN
from fleetwatch.records import Finding

T0 = 1_700_000_000.0
THROTTLED = HW_SLOWDOWN | HW_THERMAL_SLOWDOWN


def thermal(node: str = "n01", gpu: int = 4) -> Finding:
    return Finding(
        detector="thermal",
        severity="warning",
        action="inspect_hardware",
        summary=f"GPU {gpu} on {node} held in thermal slowdown",
        start=T0,
        node=node,
        gpu=gpu,
        evidence={"clock_event_reasons": THROTTLED},
    )


def straggler(node: str = "n01", gpu: int = 4, rank: int = 4, reasons: int | None = THROTTLED) -> Finding:
    evidence: dict[str, object] = {"job_loss": 0.49, "cause": "hardware thermal slowdown" if reasons else None}
    if reasons is not None:
        evidence["clock_event_reasons"] = reasons
    return Finding(
        detector="straggler.telemetry",
        severity="warning",
        action="inspect_hardware" if reasons else "check_app",
        summary=f"GPU {gpu} on {node} (job j1, rank {rank}) runs at 1,005 MHz against its peers' 1,980 MHz",
        start=T0,
        node=node,
        gpu=gpu,
        job="j1",
        rank=rank,
        evidence=evidence,
    )


@dataclass
class Scripted:
    """A detector that finds what `script(seconds since T0)` says."""

    id: str
    script: Callable[[float], list[Finding]]
    window_seconds: ClassVar[float] = 60.0

    def detect(self, window: Window) -> list[Finding]:
        return self.script(window.now - T0)


def run(hardware: Callable[[float], list[Finding]], stragglers: Callable[[float], list[Finding]], seconds: int):
    """Evaluates every second from T0; returns [(second, opened, closed)] where something changed,
    and the tracker."""
    tracker = Tracker([Scripted("thermal", hardware), Scripted("straggler.telemetry", stragglers)])
    changes = []
    for second in range(seconds):
        window = Window(now=T0 + second, gpu={}, host={}, events=[], steps=[], nodes={}, watching_since=T0)
        opened, closed = tracker.evaluate(window)
        if opened or closed:
            changes.append((second, opened, closed))
    return changes, tracker


def between(begin: float, end: float, finding: Finding) -> Callable[[float], list[Finding]]:
    return lambda s: [finding] if begin <= s < end else []


def test_straggler_and_its_gpus_thermal_finding_together_are_one_page_naming_the_job():
    changes, tracker = run(between(10, 100, thermal()), between(10, 100, straggler()), 40)
    ((second, (page,), closed),) = changes
    assert (second, page.detector, page.gpu, closed) == (10, "thermal", 4, [])
    assert page.summary == (
        "GPU 4 on n01 held in thermal slowdown; it slows job j1 (rank 4), which loses about 49% of its speed"
    )
    (entry,) = page.evidence["stragglers"]
    assert entry | {"summary": None} == {
        "detector": "straggler.telemetry",
        "job": "j1",
        "rank": 4,
        "job_loss": 0.49,
        "since": T0 + 10,
        "until": None,
        "summary": None,
    }
    assert list(tracker.open) == [page.fingerprint]


@pytest.mark.parametrize("gap", [1, 5, 29])
def test_a_throttled_straggler_that_qualifies_first_waits_for_the_hardware_finding(gap):
    changes, _ = run(between(10 + gap, 200, thermal()), between(10, 200, straggler()), 60)
    ((second, (page,), _),) = changes
    assert second == 10 + gap and page.detector == "thermal"
    assert page.evidence["stragglers"][0]["since"] == T0 + 10 + gap


def test_a_throttled_straggler_with_no_hardware_finding_is_its_own_page_after_the_wait():
    changes, _ = run(lambda s: [], between(10, 200, straggler()), 60)
    ((second, (page,), _),) = changes
    assert second == 10 + HARDWARE_WAIT_SECONDS and page.detector == "straggler.telemetry"
    assert "stragglers" not in page.evidence


@pytest.mark.parametrize("reasons", [None, 0x04])  # no reason; SW power cap, which no clock detector judges
def test_a_straggler_without_a_judged_throttle_reason_does_not_wait(reasons):
    changes, _ = run(lambda s: [], between(10, 200, straggler(reasons=reasons)), 30)
    assert [(second, [f.detector for f in opened]) for second, opened, _ in changes] == [(10, ["straggler.telemetry"])]


def test_a_straggler_on_another_gpu_is_not_folded():
    changes, _ = run(between(10, 100, thermal(gpu=4)), between(10, 100, straggler(gpu=5, reasons=None)), 20)
    ((_, opened, _),) = changes
    assert sorted(f.detector for f in opened) == ["straggler.telemetry", "thermal"]
    assert all("stragglers" not in f.evidence and "slows" not in f.summary for f in opened)


def test_a_straggler_already_paged_alone_moves_onto_the_hardware_page_when_it_fires():
    changes, _ = run(between(50, 100, thermal()), between(10, 100, straggler()), 60)
    # Waited its 30 s, paged alone at 40; the thermal finding at 50 takes it over.
    assert [(s, [f.detector for f in o], [f.detector for f in c]) for s, o, c in changes] == [
        (40, ["straggler.telemetry"], []),
        (50, ["thermal"], ["straggler.telemetry"]),
    ]


def test_a_straggler_that_recovers_stays_in_the_evidence_with_when_it_stopped():
    tracker = Tracker([Scripted("thermal", between(10, 100, thermal())), Scripted("s", between(10, 30, straggler()))])
    # (The straggler detector's id does not matter: its findings' detector field does.)
    for second in range(40):
        window = Window(now=T0 + second, gpu={}, host={}, events=[], steps=[], nodes={}, watching_since=T0)
        tracker.evaluate(window)
    (page,) = tracker.open.values()
    assert page.summary == "GPU 4 on n01 held in thermal slowdown"  # it slows nobody now
    (entry,) = page.evidence["stragglers"]
    assert (entry["since"], entry["until"]) == (T0 + 10, T0 + 30)


def test_folded_stragglers_score_as_their_own_detectors_episodes():
    _, tracker = run(between(10, 100, thermal()), between(12, 100, straggler()), 20)
    (page,) = tracker.open.values()  # the newest version: the straggler joined at 12
    episodes = unfolded([Episode(page, T0 + 10)])
    assert [(e.finding.detector, e.finding.job, e.finding.rank, e.opened_at) for e in episodes] == [
        ("thermal", None, None, T0 + 10),
        ("straggler.telemetry", "j1", 4, T0 + 12),
    ]
    assert episodes[1].finding.summary == straggler().summary


def test_wait_must_not_be_negative():
    with pytest.raises(ValueError, match="wait_seconds"):
        StragglerFolding(wait_seconds=-1)
