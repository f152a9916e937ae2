"""Offline replay: reading DESIGN.md's JSON Lines, and findings episodes from a recording."""

import json

import pytest

from fleetwatch.detectors.replay import ReplayError, infer_sampling_intervals, read_records, replay
from fleetwatch.detectors.xid import XidDetector
from fleetwatch.records import Event, GpuSample, HostSample, Step

T0 = 1_700_000_000.0

# The records and finding exactly as DESIGN.md prints them.
DESIGN_XID_LINE = (
    '{"t": 1700000000.4, "kind": "xid",  "node": "n01", "gpu": 3, "pci_bus_id": "0000:9b:00", '
    '"xid": 79, "message": "GPU has fallen off the bus."}'
)
DESIGN_FINDING = {
    "detector": "xid",
    "severity": "critical",
    "action": "reboot",
    "node": "n01",
    "gpu": 3,
    # The board, where known (issue 12): the replay record names its PCI bus id, in any spelling.
    "uuid": None,
    "pci_bus_id": "0000:9b:00.0",
    "serial": None,
    "model": None,
    "job": None,
    "rank": None,
    "start": 1700000000.4,
    "end": None,
    "summary": "XID 79: GPU has fallen off the bus",
    "evidence": {"xid": 79, "count": 1},
}


def line(**record):
    return json.dumps(record)


def gpu_line(t, node="n01", gpu=0, **metrics):
    return line(t=t, kind="gpu", node=node, gpu=gpu, metrics=metrics)


def test_xid_79_record_gives_exactly_the_design_finding():
    findings = replay(read_records([DESIGN_XID_LINE]), detectors=[XidDetector()])
    assert [f.to_dict() for f in findings] == [DESIGN_FINDING]
    assert json.loads(findings[0].to_json()) == DESIGN_FINDING


def test_with_every_detector_one_xid_79_is_one_finding():
    findings = replay(read_records([DESIGN_XID_LINE]))
    assert [f.to_dict() for f in findings] == [DESIGN_FINDING]


def test_reads_every_design_record_kind():
    records = list(
        read_records(
            [
                '{"t": 1700000000.0, "kind": "gpu",  "node": "n01", "gpu": 3, "uuid": "GPU-1", '
                '"job": "j7", "metrics": {"sm_clock_mhz": 1980, "power_watts": 655.2}}',
                '{"t": 1700000000.0, "kind": "host", "node": "n01", "metrics": {"cpu_percent": 12.5}}',
                DESIGN_XID_LINE,
                '{"t": 1700000001.0, "kind": "step", "job": "j7", "rank": 6, "node": "n06", '
                '"step": 1811, "seconds": 0.93}',
            ]
        )
    )
    assert records == [
        GpuSample(T0, "n01", 3, {"sm_clock_mhz": 1980, "power_watts": 655.2}, uuid="GPU-1", job="j7"),
        HostSample(T0, "n01", {"cpu_percent": 12.5}),
        Event(
            T0 + 0.4,
            "n01",
            "xid",
            gpu=3,
            xid=79,
            pci_bus_id="0000:9b:00.0",  # read in the agents' one spelling
            message="GPU has fallen off the bus.",
            source="replay",
        ),
        Step(T0 + 1, job="j7", rank=6, node="n06", step=1811, seconds=0.93),
    ]


def test_step_records_carry_parallel_coordinates_and_wall_time():
    (record,) = read_records(
        [
            '{"t": 1700000001.0, "kind": "step", "job": "j7", "rank": 13, "node": "n02", "step": 40, '
            '"seconds": 44.1, "gpu": 5, "dp_rank": 1, "pp_stage": 3, "tp_rank": 0, "wall_seconds": 47.2}'
        ]
    )
    assert record == Step(T0 + 1, "j7", 13, "n02", 40, 44.1, gpu=5, dp_rank=1, pp_stage=3, tp_rank=0, wall_seconds=47.2)


@pytest.mark.parametrize(
    "text",
    [
        '{"t": 1700000000.0, "kind": "event", "type": "gpu_lost", "node": "n01", "gpu": 2}',
        '{"t": 1700000000.0, "kind": "gpu_lost", "node": "n01", "gpu": 2}',
    ],
)
def test_gpu_lost_events_are_accepted_in_both_spellings(text):
    (record,) = read_records([text])
    assert (record.kind, record.node, record.gpu, record.xid) == ("gpu_lost", "n01", 2, None)


def test_null_metrics_are_absent_and_blank_lines_skipped():
    records = list(read_records(["", gpu_line(T0, temp_gpu_celsius=None, power_watts=100), "   \n"]))
    assert [r.metrics for r in records] == [{"power_watts": 100}]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"kind": "gpu", "node": "n01", "gpu": 0, "metrics": {}}', "missing 't'"),
        (
            '{"t": "soon", "kind": "host", "node": "n01", "metrics": {}}',
            "'t' must be a finite number",
        ),
        ('{"t": 1, "kind": "fpga", "node": "n01"}', "unknown kind 'fpga'"),
        ('{"t": 1, "kind": "xid", "node": "n01", "gpu": 0}', "missing 'xid'"),
        (
            '{"t": 1, "kind": "gpu", "node": "n01", "gpu": -1, "metrics": {}}',
            "'gpu' must not be negative",
        ),
        (
            '{"t": 1, "kind": "gpu", "node": "n01", "gpu": 1.5, "metrics": {}}',
            "'gpu' must be an integer",
        ),
        ('{"t": 1, "kind": "gpu", "node": "n01", "gpu": 0, "metrics": {"x": "hot"}}', "metric 'x'"),
        ('{"t": 1, "kind": "host", "node": "n01"}', "'metrics' must be an object"),
        (
            '{"t": 1, "kind": "step", "rank": 0, "node": "n01", "step": 1, "seconds": 1}',
            "missing 'job'",
        ),
        ('{"t": 1, "kind": "event", "node": "n01"}', "needs a 'type'"),
        (
            '{"t": 1, "kind": "step", "job": "j", "rank": 0, "node": "n01", "step": 1, "seconds": 1, "pp_stage": -1}',
            "'pp_stage' must not be negative",
        ),
        (
            '{"t": 1, "kind": "step", "job": "j", "rank": 0, "node": "n01", "step": 1, "seconds": 1, '
            '"wall_seconds": 0}',
            "'wall_seconds' must be positive",
        ),
        (
            '{"t": 1, "kind": "host", "node": "", "metrics": {}}',
            "'node' must be a non-empty string",
        ),
    ],
)
def test_bad_lines_say_which_line_and_why(text, reason):
    with pytest.raises(ReplayError) as raised:
        list(read_records([gpu_line(T0), "", text]))
    assert raised.value.line_number == 3
    assert str(raised.value).startswith("line 3: ")
    assert reason in raised.value.reason


def test_sampling_interval_is_the_median_gap_per_node():
    records = list(
        read_records(
            [gpu_line(T0 + i * 2, gpu=g) for i in range(6) for g in range(8)]
            + [gpu_line(T0 + 13, gpu=0)]  # one odd gap does not move the median
            + [line(t=T0 + i * 5, kind="host", node="n02", metrics={}) for i in range(4)]
            + [line(t=T0, kind="xid", node="n03", xid=13)]
        )
    )
    assert infer_sampling_intervals(records) == {"n01": 2.0, "n02": 5.0}


def test_a_quiet_node_is_found_and_resolves_when_it_talks_again():
    lines = [gpu_line(T0 + t) for t in list(range(0, 11)) + list(range(20, 26))]
    (finding,) = replay(read_records(lines))
    assert (finding.detector, finding.node, finding.start, finding.end) == (
        "node_silent",
        "n01",
        T0 + 10,
        T0 + 20,
    )


def test_node_silent_follows_the_inferred_interval():
    lines = [gpu_line(T0 + t) for t in list(range(0, 50, 5)) + list(range(57, 80, 5))]
    assert replay(read_records(lines)) == []  # a 12 s gap is under 3 intervals of 5 s
    lines = [gpu_line(T0 + t) for t in list(range(0, 50, 5)) + list(range(70, 80, 5))]
    (finding,) = replay(read_records(lines))
    assert (finding.start, finding.end) == (T0 + 45, T0 + 70)


def test_episodes_are_reported_once_with_their_end_ordered_by_start():
    hot = {"clock_event_reasons": 0x40, "temp_gpu_celsius": 89, "temp_slowdown_celsius": 87}
    cool = {"clock_event_reasons": 0, "temp_gpu_celsius": 60, "temp_slowdown_celsius": 87}
    lines = [gpu_line(T0 + t, gpu=1, **(hot if 5 <= t < 40 else cool)) for t in range(0, 700)]
    lines += [gpu_line(T0 + t, gpu=0, **cool) for t in range(0, 700)]
    lines.append(line(t=T0 + 2.5, kind="xid", node="n01", gpu=0, xid=13))
    lines.append(line(t=T0 + 650.5, kind="xid", node="n01", gpu=0, xid=79))
    lines.reverse()  # replay orders by time itself
    findings = replay(read_records(lines))
    summary = [(f.detector, f.gpu, f.start, f.end, dict(f.evidence).get("count")) for f in findings]
    assert summary == [
        (
            "xid",
            0,
            T0 + 2.5,
            T0 + 603,
            1,
        ),  # held 600 s after its only occurrence, closed at the next tick
        ("thermal", 1, T0 + 5, T0 + 44, None),  # closed by 5 clean samples in a row
        ("xid", 0, T0 + 650.5, None, 1),  # still open at the end of the file
    ]


def test_findings_carry_the_newest_evidence():
    lines = [line(t=T0 + t, kind="xid", node="n01", gpu=0, xid=13) for t in (0, 1, 2)]
    (finding,) = replay(read_records(lines), detectors=[XidDetector()])
    assert finding.evidence == {"xid": 13, "count": 3} and finding.start == T0


def test_empty_input_and_bad_step():
    assert replay([]) == []
    with pytest.raises(ValueError):
        replay([], step_seconds=0)


def test_skip_idle_bisects_open_stretches_to_the_same_findings_as_every_second() -> None:
    """An event-only replay (a kernel log) gives the same episodes, starts and ends, whether it steps
    every second or bisects for the ticks where findings close."""
    from fleetwatch.detectors.gpu_lost import GpuLostDetector

    def xid(t: float, gpu: int, number: int) -> Event:
        return Event(t=T0 + t, node="n01", kind="xid", gpu=gpu, xid=number, message="")

    events = [
        xid(0.4, 1, 13),
        xid(30.0, 1, 13),
        xid(200.2, 2, 31),
        xid(1500.0, 1, 13),  # after the first episode's hold: a second episode
        xid(1501.7, 3, 43),
        xid(9000.0, 2, 31),
    ]
    detectors = [XidDetector(), GpuLostDetector()]
    stepped = replay(events, detectors)
    bisected = replay(events, [XidDetector(), GpuLostDetector()], skip_idle=True)
    assert [(f.gpu, f.key, f.start, f.end) for f in bisected] == [(f.gpu, f.key, f.start, f.end) for f in stepped]
    assert len(stepped) == 5 and all(f.end is not None for f in stepped[:-1])
