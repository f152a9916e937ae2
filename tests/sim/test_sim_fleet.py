"""Tests for the simulated fleet (fleetwatch.sim.fleet): synchronous jobs, faults and healthy noise as the
records a scenario file (tests/scenarios/README.md) produces, through the agent's own NVML source."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections import defaultdict

import pytest

from fleetwatch.records import Event, GpuSample, HostSample, IbSample, Step
from fleetwatch.sim.fleet import DEFAULT_START, SimFleet
from fleetwatch.sim.node import SimNode
from fleetwatch.sim.scenario import Fault

T0 = DEFAULT_START


def scenario(*, nodes=2, duration=300, seed=7, jobs=None, faults=(), noise=(), model="H100", ib_ports=1, interval=1.0):
    """A scenario dict as tomllib would parse it."""
    return {
        "name": "test",
        "healthy": not faults,
        "duration_seconds": duration,
        "sample_interval_seconds": interval,
        "seed": seed,
        "fleet": {"nodes": nodes, "gpus_per_node": 8, "model": model, "ib_ports_per_node": ib_ports},
        "jobs": [
            {"id": "j1", "nodes": [f"n{i:02d}" for i in range(1, nodes + 1)], "step_seconds": 0.9, "report_steps": True}
        ]
        if jobs is None
        else jobs,
        "faults": list(faults),
        "noise": list(noise),
    }


def records(spec):
    return list(SimFleet.from_scenario(spec).records())


def of(recs, kind):
    return [r for r in recs if isinstance(r, kind)]


def between(t, begin, end):
    return T0 + begin <= t < T0 + end


def step_walls(steps, begin, end):
    """Wall time of each step of rank 0 that ended in [begin, end) (time since the previous end)."""
    ends = sorted(s.t for s in steps if s.rank == 0)
    return [b - a for a, b in zip(ends, ends[1:]) if between(b, begin, end)]


def seconds(steps, begin, end, ranks):
    return [s.seconds for s in steps if s.rank in ranks and between(s.t, begin, end)]


def gpu_metric(samples, begin, end, name, where):
    return [s.metrics[name] for s in samples if between(s.t, begin, end) and where(s)]


# ---- synchronous jobs ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, reasons", [("thermal_slowdown", 0x48), ("power_brake", 0x88), ("hw_slowdown", 0x08)])
def test_a_throttled_rank_slows_every_step_but_only_its_own_compute_grows(kind, reasons):
    spec = scenario(faults=[{"kind": kind, "node": "n02", "gpu": 3, "at_seconds": 120, "duration_seconds": 150}])
    fleet = SimFleet.from_scenario(spec)
    recs = list(fleet.records())
    steps, gpus = of(recs, Step), of(recs, GpuSample)
    slow = fleet.ranks("j1").index(("n02", 3))
    assert slow == 11
    peers = set(range(16)) - {slow}

    # Every rank's step takes as long as the slowest: the wall time per step nearly doubles.
    wall_before = statistics.median(step_walls(steps, 30, 115))
    wall_during = statistics.median(step_walls(steps, 140, 265))
    assert wall_during > 1.5 * wall_before
    # Only the slow rank's own compute time grows; its peers' stays where it was (within noise).
    own_before = statistics.median(seconds(steps, 30, 115, {slow}))
    own_during = statistics.median(seconds(steps, 140, 265, {slow}))
    assert own_during > 1.6 * own_before
    peers_before = statistics.median(seconds(steps, 30, 115, peers))
    peers_during = statistics.median(seconds(steps, 140, 265, peers))
    assert abs(peers_during / peers_before - 1.0) < 0.03

    def is_slow(s):
        return (s.node, s.gpu) == ("n02", 3)

    def is_peer(s):
        return not is_slow(s)

    # Its peers wait in collectives: same utilisation, full clock, less power.
    power_before = statistics.mean(gpu_metric(gpus, 30, 115, "power_watts", is_peer))
    power_during = statistics.mean(gpu_metric(gpus, 140, 265, "power_watts", is_peer))
    assert power_during < 0.85 * power_before
    assert statistics.mean(gpu_metric(gpus, 140, 265, "gpu_util_percent", is_peer)) > 95
    assert min(gpu_metric(gpus, 140, 265, "sm_clock_mhz", is_peer)) >= 1900
    # The slow GPU shows why: its clock is down and the event reasons say which slowdown.
    assert max(gpu_metric(gpus, 140, 265, "sm_clock_mhz", is_slow)) < 1300
    assert set(gpu_metric(gpus, 140, 265, "clock_event_reasons", is_slow)) == {reasons}
    # Samples of job GPUs carry the job and rank.
    sample = next(s for s in gpus if is_slow(s))
    assert (sample.job, sample.rank) == ("j1", slow)
    # After the fault clears everything returns to normal.
    assert statistics.median(step_walls(steps, 280, 300)) < 1.15 * wall_before


def test_a_slow_rank_slows_every_step_with_no_hardware_sign():
    spec = scenario(faults=[{"kind": "slow_rank", "node": "n01", "gpu": 5, "at_seconds": 100, "factor": 1.3}])
    fleet = SimFleet.from_scenario(spec)
    recs = list(fleet.records())
    steps, gpus = of(recs, Step), of(recs, GpuSample)
    slow = fleet.ranks("j1").index(("n01", 5))
    peers = set(range(16)) - {slow}
    ratio = statistics.median(seconds(steps, 120, 300, {slow})) / statistics.median(seconds(steps, 10, 95, {slow}))
    assert 1.22 < ratio < 1.38
    peers_ratio = statistics.median(seconds(steps, 120, 300, peers)) / statistics.median(seconds(steps, 10, 95, peers))
    assert abs(peers_ratio - 1) < 0.03
    assert statistics.median(step_walls(steps, 120, 300)) > 1.1 * statistics.median(step_walls(steps, 10, 95))

    def is_slow(s):
        return (s.node, s.gpu) == ("n01", 5)

    # No hardware sign on the slow rank: full clock, no slowdown reasons, its power as before...
    assert min(gpu_metric(gpus, 120, 300, "sm_clock_mhz", is_slow)) >= 1900
    assert all(r & 0xC8 == 0 for r in gpu_metric(gpus, 120, 300, "clock_event_reasons", is_slow))
    slow_power = statistics.mean(gpu_metric(gpus, 120, 300, "power_watts", is_slow))
    assert slow_power > 0.95 * statistics.mean(gpu_metric(gpus, 10, 95, "power_watts", is_slow))
    # ...while its peers, waiting for it, draw less.
    peer_power = statistics.mean(gpu_metric(gpus, 120, 300, "power_watts", lambda s: not is_slow(s)))
    assert peer_power < 0.95 * statistics.mean(gpu_metric(gpus, 10, 95, "power_watts", lambda s: not is_slow(s)))
    assert peer_power < 0.95 * slow_power


def hybrid_job(**extra):
    """A 2-node, 16-rank job: 4 pipeline stages x 2 data-parallel replicas x 2 tensor-parallel ranks."""
    return [
        {"id": "j1", "nodes": ["n01", "n02"], "step_seconds": 0.9, "pipeline_stages": 4, "tensor_parallel": 2} | extra
    ]


def test_hybrid_parallel_ranks_report_their_place_in_megatrons_order():
    steps = of(records(scenario(duration=60, jobs=hybrid_job(report_wall_seconds=True))), Step)
    places = {s.rank: (s.dp_rank, s.pp_stage, s.tp_rank) for s in steps}
    # Stages in contiguous blocks of 4 ranks; within a stage, tensor-parallel ranks consecutive.
    assert [places[r] for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)
    ]  # fmt: skip
    assert places[15] == (1, 3, 1)
    # Every rank of a step sees the same wall time, at least the slowest rank's compute.
    by_step = defaultdict(list)
    for s in steps:
        by_step[s.step].append(s)
    for reports in by_step.values():
        assert len({s.wall_seconds for s in reports}) == 1
        assert reports[0].wall_seconds >= max(s.seconds for s in reports)


def test_an_uneven_pipeline_stage_runs_slower_on_every_replica():
    spec = scenario(duration=200, jobs=hybrid_job(stage_factors=[1.0, 1.0, 1.0, 1.6], report_coordinates=False))
    steps = of(records(spec), Step)
    assert all(s.pp_stage is None and s.wall_seconds is None for s in steps)  # not reported: inferred later
    last = statistics.median(seconds(steps, 20, 200, set(range(12, 16))))
    first = statistics.median(seconds(steps, 20, 200, set(range(0, 12))))
    assert 1.5 < last / first < 1.7


def test_jobs_without_parallelism_report_no_place():
    steps = of(records(scenario(duration=30)), Step)
    assert steps and all((s.dp_rank, s.pp_stage, s.tp_rank, s.wall_seconds) == (None,) * 4 for s in steps)


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"pipeline_stages": 3}, "pipeline_stages"),  # 16 ranks do not split in 3 stages of 2
        ({"tensor_parallel": 0}, "tensor_parallel"),
        ({"stage_factors": [1.0, 1.5]}, "stage_factors"),
        ({"stage_factors": [1.0, 1.0, 0.0, 1.0]}, "stage_factors"),
        ({"report_coordinates": "yes"}, "report_coordinates"),
    ],
)
def test_bad_parallelism_is_refused_naming_the_key(extra, key):
    with pytest.raises(ValueError, match=rf"jobs\[0\]\.{key}"):
        SimFleet.from_scenario(scenario(duration=30, jobs=hybrid_job(**extra)))


def test_healthy_step_times_are_noisy_like_the_alibaba_traces():
    steps = of(records(scenario(duration=600, seed=3)), Step)
    by_rank = defaultdict(list)
    for s in sorted(steps, key=lambda s: s.t):
        by_rank[s.rank].append(s.seconds)
    cvs, lags, over, peaks = [], [], [], []
    for xs in by_rank.values():
        mean = statistics.mean(xs)
        cvs.append(statistics.pstdev(xs) / mean)
        median = statistics.median(xs)
        rel = [x / median - 1 for x in xs]
        m = statistics.mean(rel)
        # The traces have one point every 10 iterations: compare at that lag.
        lags.append(sum((a - m) * (b - m) for a, b in zip(rel, rel[10:])) / sum((a - m) ** 2 for a in rel))
        over.extend(r > 0.08 for r in rel)
        peaks.append(max(rel))
    # Traces: per-worker CV 1.5 % and 3.1 % (medians), lag-10 autocorrelation 0.60 and 0.41,
    # 0.8 % of points > 8 % over the median, maxima +10..12 %, nothing over +20 %.
    assert 0.015 < statistics.median(cvs) < 0.04
    assert 0.2 < statistics.median(lags) < 0.75
    assert 0.0 < sum(over) / len(over) < 0.02
    assert max(peaks) < 0.25
    # Ranks differ steadily a little (whole GPUs; the traces' shared GPUs differed more).
    medians = [statistics.median(xs) for xs in by_rank.values()]
    assert 0.005 < statistics.pstdev(medians) / statistics.mean(medians) < 0.06


def test_a_healthy_rank_wanders_within_bounds_over_hours():
    # The traces' workers wander around their own pace but never far for long: over two hours of
    # 8 ranks no 20-step median strays more than 6% from the rank's own (the drift is clipped at
    # 2.5 sd, 4.75%; an unbounded walk reaches 7-8% here, and 9-10% over 1,000 node-days: a
    # healthy rank as slow against its own past as a mild straggler).
    spec = scenario(nodes=1, duration=7200, seed=1, jobs=[{"id": "j1", "nodes": ["n01"], "step_seconds": 1.0}])
    by_rank = defaultdict(list)
    for s in SimFleet.from_scenario(spec)._steps:
        by_rank[s.rank].append(s.seconds)
    for xs in by_rank.values():
        own = statistics.median(xs)
        worst = max(abs(statistics.median(xs[i : i + 20]) / own - 1) for i in range(0, len(xs) - 20, 5))
        assert worst < 0.06


# ---- healthy noise -------------------------------------------------------------------------------


def test_checkpoint_pause_stalls_every_rank_and_idles_the_gpus():
    spec = scenario(noise=[{"kind": "checkpoint_pause", "at_seconds": 150, "duration_seconds": 20}])
    recs = records(spec)
    steps, gpus = of(recs, Step), of(recs, GpuSample)
    long_steps = [s for s in steps if s.seconds > 10]
    # One step per rank holds the pause, in every rank's own time: all ranks alike.
    assert sorted(s.rank for s in long_steps) == list(range(16))
    assert len({s.step for s in long_steps}) == 1
    assert all(20 <= s.seconds < 22 for s in long_steps)
    during = [s for s in gpus if between(s.t, 152, 169)]
    assert len(during) == 16 * 17
    assert all(s.metrics["gpu_util_percent"] <= 5 and s.metrics["power_watts"] < 150 for s in during)
    assert all(s.metrics["clock_event_reasons"] & 0x1 for s in during)  # GpuIdle
    assert all(s.metrics["mem_used_bytes"] > 50 * 2**30 and s.job == "j1" for s in during)  # still allocated
    after = [s for s in gpus if between(s.t, 200, 300)]
    assert statistics.mean(s.metrics["power_watts"] for s in after) > 550


def test_dataloader_hiccup_is_one_rank_for_a_step_or_two():
    spec = scenario(noise=[{"kind": "dataloader_hiccup", "at_seconds": 100, "node": "n02", "gpu": 1}])
    fleet = SimFleet.from_scenario(spec)
    steps = of(list(fleet.records()), Step)
    rank = fleet.ranks("j1").index(("n02", 1))
    typical = statistics.median(s.seconds for s in steps)
    slow = [s for s in steps if s.seconds > 1.5 * typical]
    assert 1 <= len(slow) <= 3
    assert {s.rank for s in slow} == {rank}
    assert all(between(s.t, 100, 110) for s in slow)


def test_single_sbe_counts_one_correctable_error_once():
    spec = scenario(noise=[{"kind": "single_sbe", "at_seconds": 60.5, "node": "n01", "gpu": 2}])
    gpus = of(records(spec), GpuSample)
    counts = [(s.t - T0, s.metrics["ecc_sbe_volatile_total"]) for s in gpus if (s.node, s.gpu) == ("n01", 2)]
    assert [c for t, c in counts if t < 60.5] == [0] * 61
    assert {c for t, c in counts if t >= 60.5} == {1}
    assert {s.metrics["ecc_sbe_volatile_total"] for s in gpus if (s.node, s.gpu) != ("n01", 2)} == {0}
    assert {s.metrics["ecc_dbe_volatile_total"] for s in gpus} == {0}


def test_idle_gpus_draw_little_and_drop_their_pcie_link():
    jobs = [{"id": "j1", "nodes": ["n01"], "step_seconds": 0.9, "report_steps": True}]
    spec = scenario(
        jobs=jobs, noise=[{"kind": "idle_gpu", "at_seconds": 100, "duration_seconds": 100, "node": "n01", "gpu": 6}]
    )
    fleet = SimFleet.from_scenario(spec)
    recs = list(fleet.records())
    gpus = of(recs, GpuSample)
    assert len(fleet.ranks("j1")) == 7  # the idle GPU is in no job
    idle = [s for s in gpus if s.node == "n02" or ((s.node, s.gpu) == ("n01", 6) and between(s.t, 100, 200))]
    assert idle and all(s.job is None for s in idle)
    for s in idle:
        m = s.metrics
        assert m["gpu_util_percent"] == 0 and m["power_watts"] < 100 and m["sm_clock_mhz"] == 345
        assert m["clock_event_reasons"] & 0x1 and m["mem_used_bytes"] == 0
        assert m["pcie_link_gen"] == 1 < m["pcie_link_gen_max"] == 5 and m["pcie_link_width"] == 16
    busy = [s for s in gpus if s.node == "n01" and s.gpu != 6]
    assert all(s.metrics["pcie_link_gen"] == 5 and s.metrics["gpu_util_percent"] >= 90 for s in busy)
    # Outside its idle window the GPU runs someone else's (unnamed) work.
    other = [s for s in gpus if (s.node, s.gpu) == ("n01", 6) and between(s.t, 210, 300)]
    assert all(s.metrics["gpu_util_percent"] >= 90 and s.job is None for s in other)


def test_job_restart_stops_the_steps_then_resumes_with_warm_up_steps():
    spec = scenario(
        noise=[
            {"kind": "checkpoint_pause", "at_seconds": 60, "duration_seconds": 10},
            {"kind": "job_restart", "at_seconds": 150, "duration_seconds": 40},
        ]
    )
    recs = records(spec)
    steps, gpus = of(recs, Step), of(recs, GpuSample)
    rank0 = sorted((s for s in steps if s.rank == 0), key=lambda s: s.t)
    assert not [s for s in rank0 if between(s.t, 150, 200)]  # no steps while down and loading
    resumed = [s for s in rank0 if s.t >= T0 + 200]
    checkpoint = next(s for s in rank0 if s.seconds > 9)
    assert resumed[0].step == checkpoint.step + 1  # from the step after the last checkpoint
    typical = statistics.median(s.seconds for s in rank0)
    assert resumed[0].seconds > 2.5 * typical and resumed[1].seconds > resumed[2].seconds > typical
    assert statistics.median(s.seconds for s in resumed[10:]) < 1.05 * typical
    down = [s for s in gpus if between(s.t, 151, 190)]
    assert all(s.job is None and s.metrics["gpu_util_percent"] == 0 for s in down)
    assert all(s.metrics["pcie_link_gen"] == 1 for s in down)


# ---- faults ----------------------------------------------------------------------------------------


def test_node_silent_emits_nothing_while_it_lasts():
    spec = scenario(faults=[{"kind": "node_silent", "node": "n02", "at_seconds": 100, "duration_seconds": 60}])
    recs = records(spec)
    n02 = [r for r in recs if getattr(r, "node", None) == "n02"]
    assert not [r for r in n02 if between(r.t, 100, 160)]
    for kind in (GpuSample, HostSample, IbSample, Step):
        assert [r for r in n02 if isinstance(r, kind) and between(r.t, 0, 100)]
        assert [r for r in n02 if isinstance(r, kind) and between(r.t, 160, 300)]
    # The other node, and the job, carry on.
    assert len([r for r in recs if isinstance(r, GpuSample) and r.node == "n01" and between(r.t, 100, 160)]) == 8 * 60
    assert [r for r in recs if isinstance(r, Step) and r.node == "n01" and between(r.t, 100, 160)]


def test_gpu_missing_stops_its_samples_without_an_event():
    spec = scenario(faults=[{"kind": "gpu_missing", "node": "n02", "gpu": 4, "at_seconds": 100}])
    recs = records(spec)
    gpus = of(recs, GpuSample)
    missing = [s for s in gpus if (s.node, s.gpu) == ("n02", 4)]
    assert max(s.t for s in missing) == T0 + 99
    after = {s.gpu for s in gpus if s.node == "n02" and between(s.t, 100, 300)}
    assert after == set(range(8)) - {4}  # the others keep their indices
    assert not of(recs, Event)
    # Its job's rank died with it: the job hangs in its collectives, so no step completes.
    assert not [s for s in of(recs, Step) if s.t > T0 + 100]


def test_gpu_lost_gives_xid_79_at_its_time_and_a_gpu_lost_event():
    spec = scenario(faults=[{"kind": "gpu_lost", "node": "n01", "gpu": 2, "at_seconds": 100.25}])
    recs = records(spec)
    events = of(recs, Event)
    assert [(e.kind, e.node, e.gpu, e.xid, e.t) for e in events] == [
        ("xid", "n01", 2, 79, T0 + 100.25),
        ("gpu_lost", "n01", 2, None, T0 + 101),
    ]
    assert events[0].pci_bus_id == "0000:3a:00.0" and events[0].uuid.startswith("GPU-")
    assert max(s.t for s in of(recs, GpuSample) if (s.node, s.gpu) == ("n01", 2)) == T0 + 100
    # Peers hang in the collective: busy but drawing little, until NCCL's watchdog.
    hung = [s for s in of(recs, GpuSample) if between(s.t, 110, 300) and (s.node, s.gpu) != ("n01", 2)]
    assert all(s.metrics["gpu_util_percent"] >= 99 and s.metrics["power_watts"] < 450 for s in hung)


def test_ib_link_down_flap_and_low_rate():
    spec = scenario(
        ib_ports=2,
        faults=[
            {"kind": "ib_link_down", "node": "n01", "at_seconds": 50, "duration_seconds": 20},
            {"kind": "ib_flap", "node": "n02", "port": 1, "at_seconds": 100, "duration_seconds": 120, "count": 4},
            {"kind": "ib_rate_low", "node": "n02", "at_seconds": 240, "rate_gbps": 200},
        ],
    )
    recs = records(spec)
    ib = of(recs, IbSample)
    assert {(s.node, s.device, s.port) for s in ib} == {(n, f"mlx5_{i}", 1) for n in ("n01", "n02") for i in (0, 1)}

    def port(node, device):
        return [(s.t - T0, s.metrics) for s in ib if (s.node, s.device) == (node, device)]

    down = port("n01", "mlx5_0")
    base = down[0][1]["ib_link_downed_total"]
    assert all(m["ib_state"] == ("DOWN" if 50 <= t < 70 else "ACTIVE") for t, m in down)
    assert all(("ib_rate_gbps" in m) == (m["ib_state"] == "ACTIVE") for t, m in down)
    assert {m["ib_link_downed_total"] for t, m in down if t >= 50} == {base + 1}
    flap = port("n02", "mlx5_1")
    states = [m["ib_state"] for t, m in flap]
    assert sum(1 for a, b in zip(states, states[1:]) if a == "ACTIVE" and b == "DOWN") == 4
    assert flap[-1][1]["ib_link_downed_total"] - flap[0][1]["ib_link_downed_total"] == 4
    assert flap[-1][1]["ib_symbol_error_total"] > flap[0][1]["ib_symbol_error_total"]
    assert flap[-1][1]["ib_link_error_recovery_total"] == 4
    slow = port("n02", "mlx5_0")
    assert {m["ib_rate_gbps"] for t, m in slow} == {400.0, 200.0}
    assert all(m["ib_rate_gbps"] == (200.0 if t >= 240 else 400.0) for t, m in slow)
    assert all(m["ib_state"] == "ACTIVE" for t, m in port("n01", "mlx5_1"))
    # The job spanning both nodes stalls while a link is down (the step holding it takes longer)
    # and its steps stretch a little on the slow link.
    steps = of(recs, Step)
    assert max(step_walls(steps, 50, 80)) > 15
    assert statistics.median(step_walls(steps, 250, 300)) > statistics.median(step_walls(steps, 10, 45))


def test_an_ib_link_down_for_long_aborts_a_multi_node_job():
    spec = scenario(faults=[{"kind": "ib_link_down", "node": "n02", "at_seconds": 100}])
    recs = records(spec)
    assert not [s for s in of(recs, Step) if s.t > T0 + 100]
    idle = [s for s in of(recs, GpuSample) if between(s.t, 140, 300)]
    assert all(s.job is None and s.metrics["gpu_util_percent"] == 0 for s in idle)


def test_ecc_sbe_burst_climbs():
    spec = scenario(
        faults=[
            {
                "kind": "ecc_sbe_burst",
                "node": "n01",
                "gpu": 0,
                "at_seconds": 100,
                "rate_per_second": 2,
                "duration_seconds": 50,
            }
        ]
    )
    counts = [
        (s.t - T0, s.metrics["ecc_sbe_aggregate_total"])
        for s in of(records(spec), GpuSample)
        if (s.node, s.gpu) == ("n01", 0)
    ]
    assert dict(counts)[99] == 0 and dict(counts)[100] == 1 and dict(counts)[150] == 101 and dict(counts)[299] == 101


def test_scenario_values_it_cannot_use_name_their_key():
    with pytest.raises(ValueError, match=r"^faults\[0\]\.kind: unknown fault kind 'melt'"):
        SimFleet.from_scenario(scenario(faults=[{"kind": "melt", "node": "n01", "gpu": 0, "at_seconds": 1}]))
    with pytest.raises(ValueError, match=r"^noise\[1\]\.kind: unknown noise kind 'cosmic_ray'"):
        SimFleet.from_scenario(
            scenario(noise=[{"kind": "single_sbe", "at_seconds": 1}, {"kind": "cosmic_ray", "at_seconds": 1}])
        )
    with pytest.raises(ValueError, match=r"^faults\[0\]\.kind: retired_pages .*H100 remaps rows"):
        SimFleet.from_scenario(scenario(faults=[{"kind": "retired_pages", "node": "n01", "gpu": 0, "at_seconds": 1}]))
    with pytest.raises(ValueError, match=r"^faults\[0\]\.node: unknown node 'n09'"):
        SimFleet.from_scenario(scenario(faults=[{"kind": "ecc_dbe", "node": "n09", "gpu": 0, "at_seconds": 1}]))
    with pytest.raises(ValueError, match=r"^faults\[0\]\.gpu: must be in 0\.\.7"):
        SimFleet.from_scenario(scenario(faults=[{"kind": "ecc_dbe", "node": "n01", "gpu": 8, "at_seconds": 1}]))
    with pytest.raises(ValueError, match=r"^jobs\[0\]\.nodes\[0\]: unknown node"):
        SimFleet.from_scenario(scenario(jobs=[{"id": "j", "nodes": ["x"]}]))
    with pytest.raises(ValueError, match=r"^fleet\.model: unknown GPU model 'B200'"):
        SimFleet.from_scenario(scenario(model="B200"))
    with pytest.raises(ValueError, match="does not retire pages"):
        SimNode("n", faults=[Fault("retired_pages", 0, 1.0)])


# ---- the run as a whole ----------------------------------------------------------------------------


MIXED = scenario(
    nodes=3,
    duration=240,
    seed=11,
    jobs=[
        {"id": "j1", "nodes": ["n01", "n02"], "step_seconds": 0.9, "report_steps": True},
        {
            "id": "j2",
            "nodes": ["n03"],
            "step_seconds": 1.2,
            "report_steps": True,
            "start_seconds": 30,
            "end_seconds": 200,
        },
    ],
    faults=[
        {"kind": "thermal_slowdown", "node": "n02", "gpu": 3, "at_seconds": 60, "duration_seconds": 60},
        {"kind": "xid", "xid": 13, "node": "n03", "gpu": 1, "at_seconds": 150.5},
        {"kind": "nvlink_errors", "node": "n01", "gpu": 0, "at_seconds": 20, "link": 3},
        {"kind": "ib_flap", "node": "n01", "at_seconds": 100, "duration_seconds": 60},
    ],
    noise=[
        {"kind": "checkpoint_pause", "job": "j1", "at_seconds": 90, "duration_seconds": 15},
        {"kind": "dataloader_hiccup", "job": "j2", "rank": 2, "at_seconds": 70, "count": 2},
        {"kind": "single_sbe", "at_seconds": 33},
        {"kind": "job_restart", "job": "j1", "at_seconds": 170, "duration_seconds": 20},
    ],
)


def test_records_are_in_time_order_and_every_kind_appears():
    recs = records(MIXED)
    times = [r.t for r in recs]
    assert times == sorted(times)
    assert {type(r) for r in recs} == {GpuSample, HostSample, IbSample, Event, Step}
    assert times[0] >= T0 and times[-1] < T0 + 240
    ticks = sorted({r.t for r in recs if isinstance(r, GpuSample)})
    assert ticks == [T0 + i for i in range(240)]  # a simulated 1 Hz clock, the whole duration


def test_the_same_seed_gives_the_same_records_and_another_seed_others():
    fleet = SimFleet.from_scenario(MIXED)
    first = list(fleet.records())
    assert list(fleet.records()) == first  # records() can be replayed
    assert records(copy.deepcopy(MIXED)) == first
    other = dict(MIXED, seed=12)
    assert records(other) != first


def test_gpu_samples_come_through_the_nvml_source():
    gpus = of(records(scenario(nodes=1, duration=5)), GpuSample)
    first, later = gpus[0].metrics, gpus[-1].metrics
    # What the board answers NOT_SUPPORTED is absent, as the agent reports it (H100: no fan, no
    # page retirement); the PCIe rates need two readings of the byte counters.
    assert "fan_percent" not in first and "retired_pages_sbe" not in first
    assert "pcie_rx_bytes_per_second" not in first and later["pcie_rx_bytes_per_second"] > 0
    assert later["nvlink_links_up"] == 18 and later["power_limit_watts"] == 700.0
    assert gpus[0].uuid.startswith("GPU-")


def test_generation_speed():
    """Prints the generation rate (the scenario corpus replays dozens of 4 x 8 GPU x 600-900 s runs)."""
    spec = scenario(nodes=4, duration=400, seed=5, noise=[{"kind": "checkpoint_pause", "at_seconds": 200}])
    started = time.perf_counter()
    fleet = SimFleet.from_scenario(spec)
    count = sum(1 for r in fleet.records() if isinstance(r, GpuSample))
    elapsed = time.perf_counter() - started
    assert count == 4 * 8 * 400
    per_sample = elapsed / count
    print(
        f"\nsim fleet: {count} GPU samples (plus host, IB, steps) in {elapsed:.2f} s: "
        f"{per_sample * 1e6:.0f} us per GPU sample, {per_sample * 100_000:.1f} s per 100,000"
    )
    assert math.isfinite(per_sample)
