"""Which Kubernetes namespace, pod and container each GPU is allocated to, from the kubelet.

The kubelet serves its pod-resources API (``v1.PodResourcesLister``, vendored in
fleetwatch.kubelet.podresources.v1) on a Unix socket, by default
/var/lib/kubelet/pod-resources/kubelet.sock. ``List`` gives, per pod and container, the device ids
each device plugin allocated to it; NVIDIA dcgm-exporter labels its GPU series with namespace, pod
and container the same way (internal/pkg/transformation/kubernetes.go). Beside the cgroup path
of fleetwatch.agent.sources.jobs it names the pod readably (namespace and name, not its UID), names
the container, and knows a GPU's pod before any process of it opens the GPU.

Device ids are what the device plugin chose to call a device; this module takes each form the
plugins write (dcgm-exporter takes the same ones):

- NVIDIA k8s-device-plugin, ``DEVICE_ID_STRATEGY=uuid`` (its default): the GPU's UUID
  (``GPU-<uuid>``); a shared replica under time-slicing or MPS ``GPU-<uuid>::<replica>``; a MIG
  device its own UUID, ``MIG-<uuid>`` (driver R470 and later) or ``MIG-GPU-<uuid>/<gi>/<ci>``
  (earlier drivers, the parent's UUID inside).
- The same plugin with ``DEVICE_ID_STRATEGY=index``: the NVML index (``3``), and for a MIG device
  ``<gpu index>:<mig index>``.
- GKE's device plugin: the device node's minor number, ``nvidia<minor>`` (/dev/nvidia<minor>),
  ``nvidia<minor>/gi<n>`` for a MIG partition and ``nvidia<minor>/vgpu<n>`` for a shared GPU.

The agent samples whole GPUs, so a MIG device counts for its parent GPU: the legacy MIG UUID
names it, and a new-style one is looked up through NVML once. A GPU that two or more pods hold
(MIG slices or replicas given to different pods) names no pod here: one name would be wrong for
the others, and the cgroup path then names the pod whose processes use it most.

A node without the socket (a Slurm node, a workstation) costs one log line and a stat() every
REFRESH_SECONDS. Asking the kubelet blocks the sampling thread, so each ``List`` has a deadline
and its answer is kept REFRESH_SECONDS; a kubelet that fails or hangs is logged once when it starts
failing and once when it answers again, and in between its GPUs fall back to the cgroup path.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from fleetwatch.kubelet.podresources.v1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# The one method asked, as the kubelet serves it (package v1, service PodResourcesLister).
LIST_METHOD = "/v1.PodResourcesLister/List"

# List runs inside a sampling cycle (1 s by default): its deadline bounds what a hung kubelet costs
# that cycle. A kubelet answers List from memory, in milliseconds on a healthy node.
LIST_TIMEOUT_SECONDS = 2.0
# Pods come and go over minutes and a pod's GPUs never change while it lives, so an answer is kept
# this long (a new pod's first seconds are named by the cgroup path, or not at all). The kubelet
# rate-limits the API to 100 calls a second (pkg/kubelet/apis/podresources/grpc/ratelimit.go,
# DefaultQPS), which every agent stays far below.
REFRESH_SECONDS = 10.0
# After a failed List: a kubelet that hangs costs one LIST_TIMEOUT_SECONDS pause this often.
RETRY_SECONDS = 30.0
# A big node's answer outgrows gRPC's 4 MiB default; the kubelet's own node tests read it with
# 16 MiB (kubernetes test/e2e_node/util.go, defaultPodResourcesMaxSize).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# MIG UUIDs looked up through NVML and remembered (a node has at most 7 MIG devices a GPU).
_MAX_MIG_PARENTS = 1024

# Resource names of NVIDIA GPUs: "nvidia.com/gpu" (and "nvidia.com/gpu.shared", the name the
# NVIDIA plugin gives time-sliced replicas with renameByDefault), and "nvidia.com/mig-<profile>"
# under the mixed MIG strategy (dcgm-exporter's NvidiaResourceName and NvidiaMigResourcePrefix).
_GPU_RESOURCE_PREFIXES = ("nvidia.com/gpu", "nvidia.com/mig-")

# Device ids, as listed in the module docstring.
_REPLICA_SEPARATOR = "::"
_LEGACY_MIG = re.compile(r"MIG-(GPU-[0-9a-fA-F-]+)/\d+/\d+")
_MIG_UUID = re.compile(r"MIG-[0-9a-fA-F-]+")
_GPU_UUID = re.compile(r"GPU-[0-9a-fA-F-]+")
_INDEX = re.compile(r"(\d+)(?::\d+)?")
_MINOR = re.compile(r"nvidia(\d+)(?:/(?:gi|vgpu)\d+)?")

_UUID, _INDEX_KEY, _MINOR_KEY = "uuid", "index", "minor"
DeviceKey = tuple[str, str | int]  # (_UUID, lower-case GPU UUID) | (_INDEX_KEY, index) | (_MINOR_KEY, minor)


@dataclass(frozen=True)
class PodRef:
    """The container a GPU is allocated to, as the kubelet names it."""

    namespace: str
    pod: str
    container: str

    @property
    def job(self) -> str:
        """The job name of a pod's GPUs where its processes name none: "<namespace>/<pod>"."""
        return f"{self.namespace}/{self.pod}"


def is_gpu_resource(resource_name: str) -> bool:
    return resource_name.startswith(_GPU_RESOURCE_PREFIXES)


def device_key(device_id: str, mig_parent: Callable[[str], str | None] | None = None) -> DeviceKey | None:
    """What a device id points at: a GPU by UUID, NVML index or minor number; None when it names
    no GPU this agent can tell (a MIG UUID NVML cannot place, an id of another form)."""
    device_id = device_id.strip().partition(_REPLICA_SEPARATOR)[0]
    if match := _LEGACY_MIG.fullmatch(device_id):
        return _UUID, match.group(1).lower()
    if _MIG_UUID.fullmatch(device_id):
        parent = mig_parent(device_id) if mig_parent is not None else None
        return (_UUID, parent.lower()) if parent else None
    if _GPU_UUID.fullmatch(device_id):
        return _UUID, device_id.lower()
    if match := _INDEX.fullmatch(device_id):
        return _INDEX_KEY, int(match.group(1))
    if match := _MINOR.fullmatch(device_id):
        return _MINOR_KEY, int(match.group(1))
    return None


def gpu_allocations(
    response: api_pb2.ListPodResourcesResponse, mig_parent: Callable[[str], str | None] | None = None
) -> dict[DeviceKey, list[PodRef]]:
    """Every GPU a List answer allocates, and the containers it is allocated to (in listing order)."""
    allocations: dict[DeviceKey, list[PodRef]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            ref = PodRef(pod.namespace, pod.name, container.name)
            for devices in container.devices:
                if not is_gpu_resource(devices.resource_name):
                    continue
                for device_id in devices.device_ids:
                    key = device_key(device_id, mig_parent)
                    if key is None:
                        log.debug("device id %r of %s/%s names no GPU here", device_id, ref.job, ref.container)
                        continue
                    holders = allocations.setdefault(key, [])
                    if ref not in holders:
                        holders.append(ref)
    return allocations


def owner_of(holders: Iterable[PodRef]) -> PodRef | None:
    """The one pod holding a GPU (its first container listed), or None when none or several do."""
    owner: PodRef | None = None
    for ref in holders:
        if owner is None:
            owner = ref
        elif (ref.namespace, ref.pod) != (owner.namespace, owner.pod):
            return None
    return owner


class PodResourcesSource:
    """Asks the kubelet's pod-resources socket which pod holds each GPU; never raises.

    `nvml` (pynvml or the fake) places MIG UUIDs and minor numbers; without it those device ids
    name no GPU. `clock` is monotonic seconds (tests move it).
    """

    name = "podresources"

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        nvml: Any = None,
        timeout_seconds: float = LIST_TIMEOUT_SECONDS,
        refresh_seconds: float = REFRESH_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_path = socket_path
        self.nvml = nvml
        self.timeout_seconds = timeout_seconds
        self.refresh_seconds = refresh_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.failures_total = 0  # Lists that failed or timed out
        self.failing = False
        self._status = "unknown"  # "absent" (no socket) | "answering" | "failing"
        self._next_refresh: float | None = None
        self._allocations: dict[DeviceKey, list[PodRef]] = {}
        self._channel: grpc.Channel | None = None
        self._stub: api_pb2_grpc.PodResourcesListerStub | None = None
        self._mig_parents: dict[str, str | None] = {}
        self._minors: dict[str, int | None] = {}  # GPU UUID -> its minor number
        # The sampler's thread asks; close() may come from the main thread.
        self._lock = threading.Lock()

    # -- the kubelet -------------------------------------------------------------------------

    def _list(self) -> api_pb2.ListPodResourcesResponse:
        if self._stub is None:
            self._channel = grpc.insecure_channel(
                "unix:" + os.path.abspath(self.socket_path),
                options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
            )
            self._stub = api_pb2_grpc.PodResourcesListerStub(self._channel)
        return self._stub.List(api_pb2.ListPodResourcesRequest(), timeout=self.timeout_seconds)

    def _drop_channel(self) -> None:
        # A fresh channel after a failure: gRPC's own reconnect backoff (up to 120 s) would keep a
        # restarted kubelet unasked for longer than RETRY_SECONDS.
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def _refresh(self, now: float) -> None:
        if not os.path.exists(self.socket_path):
            if self._status != "absent":
                log.info(
                    "no kubelet pod-resources socket at %s (not a Kubernetes node?): GPUs are named by their "
                    "processes' cgroups; looking for it every %g s",
                    self.socket_path,
                    self.refresh_seconds,
                )
            self._status, self.failing = "absent", False
            self._allocations = {}
            self._drop_channel()
            self._next_refresh = now + self.refresh_seconds
            return
        try:
            response = self._list()
            allocations = gpu_allocations(response, self._mig_parent if self.nvml is not None else None)
        except Exception as exc:  # grpc.RpcError (UNAVAILABLE, DEADLINE_EXCEEDED, ...) or a malformed answer
            self.failures_total += 1
            detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.Call) else repr(exc)
            if self._status != "failing":
                log.warning(
                    "kubelet pod-resources %s: List failed (%s); GPUs are named by their processes' cgroups "
                    "until it answers (asking again every %g s)",
                    self.socket_path,
                    detail,
                    self.retry_seconds,
                )
            self._status, self.failing = "failing", True
            self._allocations = {}
            self._drop_channel()
            self._next_refresh = now + self.retry_seconds
            return
        if self._status == "failing":
            log.info("kubelet pod-resources %s answers again: naming the pods of GPUs", self.socket_path)
        elif self._status != "answering":
            log.info("naming the Kubernetes pods of GPUs from the kubelet's pod-resources API at %s", self.socket_path)
        self._status, self.failing = "answering", False
        self._allocations = allocations
        self._next_refresh = now + self.refresh_seconds

    # -- NVML: MIG parents and minor numbers -------------------------------------------------

    def _mig_parent(self, mig_uuid: str) -> str | None:
        """The UUID of the GPU a MIG device is carved from, through NVML (None: it cannot tell)."""
        if mig_uuid in self._mig_parents:
            return self._mig_parents[mig_uuid]
        parent: str | None = None
        try:
            handle = self.nvml.nvmlDeviceGetHandleByUUID(mig_uuid)
            parent = str(self.nvml.nvmlDeviceGetUUID(self.nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)))
        except Exception as exc:  # NVMLError (NOT_FOUND: another node's or a deleted MIG), AttributeError (old pynvml)
            log.debug("cannot place MIG device %s on a GPU: %s", mig_uuid, exc)
        if len(self._mig_parents) >= _MAX_MIG_PARENTS:
            self._mig_parents.clear()
        self._mig_parents[mig_uuid] = parent
        return parent

    def _minor(self, uuid: str) -> int | None:
        """A GPU's minor number (/dev/nvidia<minor>), through NVML, once per GPU."""
        if uuid not in self._minors:
            minor: int | None = None
            if self.nvml is not None:
                try:
                    minor = int(self.nvml.nvmlDeviceGetMinorNumber(self.nvml.nvmlDeviceGetHandleByUUID(uuid)))
                except Exception as exc:  # NVMLError, or a pynvml / fake without the call
                    log.debug("no minor number for GPU %s: %s", uuid, exc)
            self._minors[uuid] = minor
        return self._minors[uuid]

    # -- the answer --------------------------------------------------------------------------

    def owners(self, gpus: Sequence[Mapping[str, Any]]) -> dict[int, PodRef]:
        """GPU index -> the pod holding it, for the GPU samples of one cycle ({"gpu", "uuid", ...}).

        Asks the kubelet when the last answer is REFRESH_SECONDS old (blocking at most
        LIST_TIMEOUT_SECONDS); GPUs no single pod holds are left out.
        """
        with self._lock:
            try:
                now = self.clock()
                if self._next_refresh is None or now >= self._next_refresh:
                    self._refresh(now)
                return self._owners(gpus)
            except Exception:  # a bug here must not cost the cycle its GPU samples
                if self._status != "failing":
                    log.exception("naming the pods of GPUs failed; GPUs are named by their processes' cgroups")
                self._status, self.failing = "failing", True
                self.failures_total += 1
                self._allocations = {}
                self._next_refresh = self.clock() + self.retry_seconds
                return {}

    def _owners(self, gpus: Sequence[Mapping[str, Any]]) -> dict[int, PodRef]:
        allocations = self._allocations
        if not allocations:
            return {}
        by_minor = any(kind == _MINOR_KEY for kind, _ in allocations)
        found: dict[int, PodRef] = {}
        for sample in gpus:
            index, uuid = sample.get("gpu"), sample.get("uuid")
            if not isinstance(index, int):
                continue
            keys: list[DeviceKey] = [(_INDEX_KEY, index)]
            if uuid:
                keys.append((_UUID, str(uuid).lower()))
                minor = self._minor(str(uuid)) if by_minor else None
                if minor is not None:
                    keys.append((_MINOR_KEY, minor))
            owner = owner_of(ref for key in keys for ref in allocations.get(key, ()))
            if owner is not None:
                found[index] = owner
        return found

    def close(self) -> None:
        with self._lock:
            self._drop_channel()
