"""GPUs named by their Kubernetes pod through the kubelet's pod-resources socket, against a fake kubelet.

The fake kubelet is a real gRPC server on a Unix socket serving the vendored, generated
PodResourcesLister servicer, so the method path, the messages and the channel are the ones a real
kubelet and the agent use. GPUs come from the fake NVML; jobs from a procfs fixture.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.main import build_sampler, close_sampler
from fleetwatch.agent.metrics import AgentMetrics
from fleetwatch.agent.runner import batch_message
from fleetwatch.agent.sampler import Sampler
from fleetwatch.agent.sources.host import HostSource
from fleetwatch.agent.sources.jobs import (
    SCHEDULER_ENV,
    SCHEDULER_KUBERNETES,
    SCHEDULER_SLURM,
    JobInfo,
    JobResolver,
    job_with_pod,
)
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.agent.sources.podresources import (
    LIST_METHOD,
    PodRef,
    PodResourcesSource,
    device_key,
    gpu_allocations,
    is_gpu_resource,
    owner_of,
)
from fleetwatch.agent.state import AgentState
from fleetwatch.configfile import load_config
from fleetwatch.kubelet.podresources.v1 import api_pb2, api_pb2_grpc
from fleetwatch.sim.fake_nvml import FakeNvml, make_fake_nvml
from fleetwatch.sim.node import SimNode

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_PROCFS = ROOT / "tests" / "fixtures" / "proc-jobs"
# tests/fixtures/proc-jobs: 5200 is a process in a pod (cgroup only), 4101 a Slurm task (environ).
POD_PID, POD_UID_JOB = 5200, "pod:6f0a3b2c-9d4e-4c1a-8b7f-2e5d1c0a9f34"
SLURM_PID, SLURM_JOB = 4101, "4242"
# sun_path holds 108 bytes on Linux, the NUL included.
_MAX_SOCKET_PATH = 107


class FakeKubelet(api_pb2_grpc.PodResourcesListerServicer):
    """Answers List with `response`, or fails with `error`, or hangs until released."""

    def __init__(self) -> None:
        self.response = api_pb2.ListPodResourcesResponse()
        self.error: grpc.StatusCode | None = None
        self.hang = False
        self.released = threading.Event()
        self.calls = 0

    def List(self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        if self.hang:
            self.released.wait(timeout=10.0)
        if self.error is not None:
            context.abort(self.error, "kubelet says no")
        return self.response

    def allocate(self, *pods: tuple[str, str, str, str, list[str]]) -> None:
        """Each pod as (namespace, pod, container, resource name, device ids)."""
        self.response = api_pb2.ListPodResourcesResponse(
            pod_resources=[
                api_pb2.PodResources(
                    name=name,
                    namespace=namespace,
                    containers=[
                        api_pb2.ContainerResources(
                            name=container,
                            devices=[api_pb2.ContainerDevices(resource_name=resource, device_ids=ids)],
                        )
                    ],
                )
                for namespace, name, container, resource, ids in pods
            ]
        )


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a short directory when tmp_path is too long for a Unix socket's path."""
    if len(str(tmp_path / "kubelet.sock")) <= _MAX_SOCKET_PATH:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="fw-kubelet-"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def kubelet(socket_dir: Path) -> Iterator[tuple[FakeKubelet, Path]]:
    servicer = FakeKubelet()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
    path = socket_dir / "kubelet.sock"
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield servicer, path
    finally:
        servicer.released.set()
        server.stop(grace=None).wait(timeout=5.0)


@pytest.fixture
def procfs(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE_PROCFS, root)
    return root


class Clock:
    """Monotonic seconds the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def nvml_source(processes: dict[int, list[int]] | None = None) -> NvmlSource:
    source = NvmlSource(make_fake_nvml(SimNode("n01", gpu_count=2, processes=processes or {})))
    source.start()
    return source


def uuids(source: NvmlSource) -> list[str]:
    return [entry["uuid"] for entry in sorted(source.inventory, key=lambda e: e["index"])]


def make_sampler(nvml: NvmlSource, pods: PodResourcesSource, procfs: Path | None = None) -> Sampler:
    jobs = JobResolver(str(procfs)) if procfs is not None else JobResolver("/nonexistent-procfs")
    return Sampler(AgentState(node="n01"), host=HostSource(), nvml=nvml, jobs=jobs, pods=pods)


def k8s(sample: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    return sample.get("k8s_namespace"), sample.get("k8s_pod"), sample.get("k8s_container")


def scrape(state: AgentState, *, dcgm_names: bool = False) -> dict[str, list[Any]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentMetrics(state, dcgm_names=dcgm_names))
    text = generate_latest(registry).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


# --- the fake kubelet, end to end -----------------------------------------------------------


def test_each_gpu_is_named_by_the_pod_the_kubelet_allocated_it_to(kubelet) -> None:
    servicer, path = kubelet
    nvml = nvml_source()  # no processes: a pod's GPUs are its own before anything runs on them
    gpu0, gpu1 = uuids(nvml)
    servicer.allocate(
        ("a", "pod-a", "c1", "nvidia.com/gpu", [gpu0]),
        ("b", "pod-b", "c2", "nvidia.com/gpu", [gpu1]),
        ("c", "nic-pod", "c3", "example.com/nic", ["0", gpu0]),  # not a GPU resource: ignored
    )
    pods = PodResourcesSource(str(path), nvml=nvml.nvml)
    sampler = make_sampler(nvml, pods)
    try:
        cycle = sampler.sample()
    finally:
        pods.close()
    by_gpu = {g["gpu"]: g for g in cycle.gpus}
    assert k8s(by_gpu[0]) == ("a", "pod-a", "c1") and by_gpu[0]["job"] == "a/pod-a" and by_gpu[0]["rank"] is None
    assert k8s(by_gpu[1]) == ("b", "pod-b", "c2") and by_gpu[1]["job"] == "b/pod-b"
    assert sampler.state.sources["podresources"].last_success and servicer.calls == 1

    # On the wire, in both batch forms.
    sparse = batch_message([cycle], "boot-1", dense=False)
    assert [(g.k8s_namespace, g.k8s_pod, g.k8s_container, g.job) for g in sparse.gpus] == [
        ("a", "pod-a", "c1", "a/pod-a"),
        ("b", "pod-b", "c2", "b/pod-b"),
    ]
    dense = batch_message([cycle, cycle], "boot-1", dense=True)
    labels = dense.gpu_columns.labels
    assert {(entry.uuid, entry.k8s_namespace, entry.k8s_pod, entry.k8s_container) for entry in labels} == {
        (gpu0, "a", "pod-a", "c1"),
        (gpu1, "b", "pod-b", "c2"),
    }
    assert [labels[i].k8s_pod for i in dense.gpu_columns.label] == ["pod-a", "pod-b", "pod-a", "pod-b"]

    # The collector takes them, in both forms.
    from fleetwatch.collector.validate import check_batch

    for batch in (sparse, dense):
        batch.seq = 1
        check_batch("n01", "boot-1", batch, received_at=cycle.t)

    # /metrics: one info series per GPU; the DCGM names carry dcgm-exporter's pod labels.
    families = scrape(sampler.state, dcgm_names=True)
    info = {s.labels["gpu"]: s for s in families["fleetwatch_gpu_pod_info"]}
    assert info["0"].labels == {
        "node": "n01",
        "gpu": "0",
        "uuid": gpu0,
        "namespace": "a",
        "pod": "pod-a",
        "container": "c1",
    }
    assert info["1"].labels["pod"] == "pod-b" and info["1"].value == 1
    power = {s.labels["gpu"]: s.labels for s in families["fleetwatch_gpu_power_watts"]}
    assert set(power["0"]) == {"node", "gpu", "uuid"}  # our own series keep their label set
    dcgm = {s.labels["gpu"]: s.labels for s in families["DCGM_FI_DEV_POWER_USAGE"]}
    assert (dcgm["0"]["namespace"], dcgm["0"]["pod"], dcgm["0"]["container"]) == ("a", "pod-a", "c1")
    assert dcgm["1"]["pod"] == "pod-b"


def test_a_job_the_processes_name_is_kept_and_the_pod_replaces_a_cgroup_uid(kubelet, procfs: Path) -> None:
    servicer, path = kubelet
    nvml = nvml_source({0: [POD_PID], 1: [SLURM_PID]})
    gpu0, gpu1 = uuids(nvml)
    servicer.allocate(
        ("a", "pod-a", "c1", "nvidia.com/gpu", [gpu0]), ("b", "slurmd-0", "slurmd", "nvidia.com/gpu", [gpu1])
    )
    pods = PodResourcesSource(str(path), nvml=nvml.nvml)
    try:
        by_gpu = {g["gpu"]: g for g in make_sampler(nvml, pods, procfs).sample().gpus}
    finally:
        pods.close()
    assert by_gpu[0]["job"] == "a/pod-a"  # not pod:<uid>
    # A Slurm job in a slurmd pod (Slinky): the Slurm job is the narrower name; the pod is still told.
    assert by_gpu[1]["job"] == SLURM_JOB and by_gpu[1]["rank"] == 3
    assert k8s(by_gpu[1]) == ("b", "slurmd-0", "slurmd")


def test_the_answer_is_kept_until_the_refresh_interval(kubelet) -> None:
    servicer, path = kubelet
    nvml = nvml_source()
    gpu0, _ = uuids(nvml)
    servicer.allocate(("a", "pod-a", "c1", "nvidia.com/gpu", [gpu0]))
    clock = Clock()
    pods = PodResourcesSource(str(path), nvml=nvml.nvml, refresh_seconds=10.0, clock=clock)
    sampler = make_sampler(nvml, pods)
    try:
        sampler.sample()
        clock.now += 9.0
        servicer.allocate(("a", "pod-a2", "c1", "nvidia.com/gpu", [gpu0]))
        assert k8s(sampler.sample().gpus[0])[1] == "pod-a" and servicer.calls == 1
        clock.now += 1.0
        assert k8s(sampler.sample().gpus[0])[1] == "pod-a2" and servicer.calls == 2
    finally:
        pods.close()


# --- fallbacks: no socket, a failing kubelet, a hanging one ----------------------------------


def test_without_the_socket_the_cgroup_names_the_pod_and_one_line_is_logged(
    socket_dir: Path, procfs: Path, caplog
) -> None:
    nvml = nvml_source({0: [POD_PID]})
    clock = Clock()
    pods = PodResourcesSource(str(socket_dir / "kubelet.sock"), nvml=nvml.nvml, clock=clock)
    sampler = make_sampler(nvml, pods, procfs)
    with caplog.at_level(logging.DEBUG, logger="fleetwatch.agent.sources.podresources"):
        for _ in range(3):
            gpu0 = sampler.sample().gpus[0]
            clock.now += 60.0
    assert gpu0["job"] == POD_UID_JOB and k8s(gpu0) == (None, None, None)
    records = [r for r in caplog.records if r.name == "fleetwatch.agent.sources.podresources"]
    assert (
        len(records) == 1
        and records[0].levelno == logging.INFO
        and "no kubelet pod-resources socket" in (records[0].getMessage())
    )
    stats = sampler.state.sources["podresources"]
    assert stats.last_success and stats.errors_total == 0  # a node without a kubelet is no failure


def test_a_socket_that_appears_later_is_used(socket_dir: Path) -> None:
    nvml = nvml_source()
    clock = Clock()
    pods = PodResourcesSource(str(socket_dir / "kubelet.sock"), nvml=nvml.nvml, clock=clock)
    sampler = make_sampler(nvml, pods)
    assert k8s(sampler.sample().gpus[0]) == (None, None, None)
    servicer = FakeKubelet()
    servicer.allocate(("a", "pod-a", "c1", "nvidia.com/gpu", [uuids(nvml)[0]]))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    api_pb2_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix:{socket_dir / 'kubelet.sock'}")
    server.start()
    try:
        clock.now += 10.0
        assert k8s(sampler.sample().gpus[0]) == ("a", "pod-a", "c1")
    finally:
        pods.close()
        server.stop(grace=None).wait(timeout=5.0)


def test_a_failing_kubelet_falls_back_logs_once_and_recovers(kubelet, procfs: Path, caplog) -> None:
    servicer, path = kubelet
    nvml = nvml_source({0: [POD_PID]})
    gpu0, _ = uuids(nvml)
    servicer.allocate(("a", "pod-a", "c1", "nvidia.com/gpu", [gpu0]))
    servicer.error = grpc.StatusCode.INTERNAL
    clock = Clock()
    pods = PodResourcesSource(str(path), nvml=nvml.nvml, retry_seconds=30.0, clock=clock)
    sampler = make_sampler(nvml, pods, procfs)
    try:
        with caplog.at_level(logging.INFO, logger="fleetwatch.agent.sources.podresources"):
            for _ in range(3):  # asked once, then left alone until the retry
                sample = sampler.sample().gpus[0]
                assert sample["job"] == POD_UID_JOB and k8s(sample) == (None, None, None)
                clock.now += 10.0
            assert servicer.calls == 1
            clock.now += 10.0
            sampler.sample()  # 30 s on: asked again, fails again, logs nothing new
            assert servicer.calls == 2
            stats = sampler.state.sources["podresources"]
            assert not stats.last_success and stats.errors_total == 2
            servicer.error = None
            clock.now += 30.0
            sample = sampler.sample().gpus[0]
        assert sample["job"] == "a/pod-a" and k8s(sample) == ("a", "pod-a", "c1")
        assert sampler.state.sources["podresources"].last_success
    finally:
        pods.close()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.endswith("podresources")]
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO]
    assert "INTERNAL" in messages[0][1] and "answers again" in messages[1][1]


def test_a_hanging_kubelet_costs_one_deadline_and_sampling_goes_on(kubelet, procfs: Path) -> None:
    servicer, path = kubelet
    nvml = nvml_source({0: [POD_PID]})
    servicer.allocate(("a", "pod-a", "c1", "nvidia.com/gpu", [uuids(nvml)[0]]))
    servicer.hang = True
    clock = Clock()
    pods = PodResourcesSource(str(path), nvml=nvml.nvml, timeout_seconds=0.3, clock=clock)
    sampler = make_sampler(nvml, pods, procfs)
    try:
        started = time.monotonic()
        cycle = sampler.sample()
        assert time.monotonic() - started < 3.0
        assert len(cycle.gpus) == 2 and cycle.gpus[0]["job"] == POD_UID_JOB and "k8s_pod" not in cycle.gpus[0]
        assert pods.failing and pods.failures_total == 1
        started = time.monotonic()
        sampler.sample()  # within the retry interval: not asked, not waited on
        assert time.monotonic() - started < 0.3 and servicer.calls == 1
    finally:
        pods.close()


def test_an_empty_socket_setting_turns_it_off() -> None:
    config = load_config(AgentConfig, path=None, env={"FLEETWATCH_POD_RESOURCES_SOCKET": ""})
    assert config.pod_resources_socket == ""
    assert AgentConfig().pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    sampler, _ = build_sampler(load_config(AgentConfig, path=None, env={}), "n01")
    try:
        assert sampler.pods is not None and sampler.pods.socket_path == AgentConfig().pod_resources_socket
    finally:
        close_sampler(sampler)
    sampler, _ = build_sampler(config, "n01")
    try:
        assert sampler.pods is None
    finally:
        close_sampler(sampler)


# --- device ids ------------------------------------------------------------------------------


def test_device_ids_of_every_plugin_form() -> None:
    uuid = "GPU-5b9a2d0e-1c3f-4a7b-9e8d-0f1e2d3c4b5a"
    assert device_key(uuid) == ("uuid", uuid.lower())
    assert device_key(uuid.upper()) == ("uuid", uuid.lower())
    assert device_key(f"{uuid}::3") == ("uuid", uuid.lower())  # time-slicing / MPS replica
    assert device_key(f"MIG-{uuid}/1/0") == ("uuid", uuid.lower())  # pre-R470 MIG UUID
    assert device_key("3") == ("index", 3)  # DEVICE_ID_STRATEGY=index
    assert device_key("3:1") == ("index", 3)  # ... a MIG device of GPU 3
    assert device_key("nvidia7") == ("minor", 7)  # GKE
    assert device_key("nvidia7/gi2") == ("minor", 7)
    assert device_key("nvidia7/vgpu1") == ("minor", 7)
    assert device_key("MIG-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9") is None  # no NVML to ask
    assert device_key("MIG-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9", lambda mig: uuid) == ("uuid", uuid.lower())
    assert device_key("fpga-0") is None and device_key("") is None
    assert is_gpu_resource("nvidia.com/gpu") and is_gpu_resource("nvidia.com/gpu.shared")
    assert is_gpu_resource("nvidia.com/mig-1g.10gb") and not is_gpu_resource("example.com/gpu")


def test_legacy_index_ids_map_through_the_fake_kubelet(kubelet) -> None:
    servicer, path = kubelet
    nvml = nvml_source()
    servicer.allocate(
        ("a", "pod-a", "c1", "nvidia.com/gpu", ["1"]), ("b", "pod-b", "c2", "nvidia.com/mig-1g.10gb", ["0:2"])
    )
    pods = PodResourcesSource(str(path), nvml=nvml.nvml)
    try:
        by_gpu = {g["gpu"]: g for g in make_sampler(nvml, pods).sample().gpus}
    finally:
        pods.close()
    assert k8s(by_gpu[1]) == ("a", "pod-a", "c1") and k8s(by_gpu[0]) == ("b", "pod-b", "c2")


class NvmlWithMinorsAndMig:
    """The fake NVML plus the calls a GKE node and a new-style MIG UUID need: minor numbers (10 +
    index, so they differ from the index) and one MIG device on GPU 1."""

    MIG = "MIG-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"

    def __init__(self, fake: FakeNvml) -> None:
        self.fake = fake

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fake, name)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        return ("mig", 1) if uuid == self.MIG else self.fake.nvmlDeviceGetHandleByUUID(uuid)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any) -> Any:
        return self.fake.nvmlDeviceGetHandleByIndex(handle[1])

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        return 10 + self.fake.nvmlDeviceGetIndex(handle)


def test_minor_numbers_and_mig_uuids_are_placed_through_nvml(kubelet) -> None:
    servicer, path = kubelet
    nvml = nvml_source()
    servicer.allocate(("a", "pod-a", "c1", "nvidia.com/gpu", ["nvidia10"]))  # minor 10: GPU 0
    pods = PodResourcesSource(str(path), nvml=NvmlWithMinorsAndMig(nvml.nvml))
    clock = Clock()
    pods.clock = clock
    sampler = make_sampler(nvml, pods)
    try:
        by_gpu = {g["gpu"]: g for g in sampler.sample().gpus}
        assert k8s(by_gpu[0]) == ("a", "pod-a", "c1") and "k8s_pod" not in by_gpu[1]
        servicer.allocate(("b", "pod-b", "c2", "nvidia.com/mig-3g.40gb", [NvmlWithMinorsAndMig.MIG]))
        clock.now += 10.0
        by_gpu = {g["gpu"]: g for g in sampler.sample().gpus}
        assert k8s(by_gpu[1]) == ("b", "pod-b", "c2") and "k8s_pod" not in by_gpu[0]
    finally:
        pods.close()


def test_a_gpu_two_pods_hold_names_no_pod() -> None:
    gpu = "GPU-5b9a2d0e-1c3f-4a7b-9e8d-0f1e2d3c4b5a"
    response = api_pb2.ListPodResourcesResponse(
        pod_resources=[
            api_pb2.PodResources(
                name=name,
                namespace="ml",
                containers=[
                    api_pb2.ContainerResources(
                        name=container,
                        devices=[api_pb2.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=[f"{gpu}::{i}"])],
                    )
                    for container in ("main", "sidecar")
                ],
            )
            for i, name in enumerate(("p1", "p2"))
        ]
    )
    holders = gpu_allocations(response)[("uuid", gpu.lower())]
    assert [h.pod for h in holders] == ["p1", "p1", "p2", "p2"]
    assert owner_of(holders) is None  # two pods: neither is named
    assert owner_of(holders[:2]) == PodRef("ml", "p1", "main")  # one pod: its first container


def test_job_with_pod_order() -> None:
    pod = "ml/trainer-0"
    assert job_with_pod(None, pod) == JobInfo(job=pod, rank=None, scheduler=SCHEDULER_KUBERNETES)
    assert job_with_pod(JobInfo(POD_UID_JOB, 2, SCHEDULER_KUBERNETES), pod) == JobInfo(pod, 2, SCHEDULER_KUBERNETES)
    assert job_with_pod(JobInfo(None, 5, SCHEDULER_ENV), pod) == JobInfo(pod, 5, SCHEDULER_KUBERNETES)
    kept = [JobInfo("llama-ft", 1, SCHEDULER_ENV), JobInfo("4242", 0, SCHEDULER_SLURM)]
    assert [job_with_pod(info, pod) for info in kept] == kept
    assert job_with_pod(JobInfo(POD_UID_JOB, None, SCHEDULER_KUBERNETES), None).job == POD_UID_JOB


# --- the vendored proto ----------------------------------------------------------------------


def test_the_vendored_service_is_the_one_the_kubelet_serves(kubelet) -> None:
    service = api_pb2.DESCRIPTOR.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister"
    assert (
        f"/{service.full_name}/{service.methods_by_name['List'].name}" == LIST_METHOD == "/v1.PodResourcesLister/List"
    )
    # Field names and numbers as upstream's api.proto: a renumbering would misread a real kubelet.
    numbers = {
        (message, f.name): f.number
        for message in ("ListPodResourcesResponse", "PodResources", "ContainerResources", "ContainerDevices")
        for f in api_pb2.DESCRIPTOR.message_types_by_name[message].fields
    }
    assert {
        ("ListPodResourcesResponse", "pod_resources"): 1,
        ("PodResources", "name"): 1,
        ("PodResources", "namespace"): 2,
        ("PodResources", "containers"): 3,
        ("ContainerResources", "name"): 1,
        ("ContainerResources", "devices"): 2,
        ("ContainerDevices", "resource_name"): 1,
        ("ContainerDevices", "device_ids"): 2,
    }.items() <= numbers.items()
    # A raw call on the kubelet's method path, no generated stub: the servicer answers it.
    servicer, path = kubelet
    servicer.allocate(("a", "pod-a", "c1", "nvidia.com/gpu", ["0"]))
    with grpc.insecure_channel(f"unix:{path}") as channel:
        raw = channel.unary_unary(LIST_METHOD, request_serializer=None, response_deserializer=None)
        answer = api_pb2.ListPodResourcesResponse.FromString(raw(b"", timeout=5.0))
    assert answer.pod_resources[0].namespace == "a"
