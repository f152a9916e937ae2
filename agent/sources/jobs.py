"""Job attribution: which training job, and which rank of it, owns the processes on a GPU.

NVML lists the pids holding a context on each GPU; this module turns those pids into the
canonical `job` and `rank` identity fields by reading, under a movable procfs root:

1. ``/proc/<pid>/environ``: the scheduler and launcher variables the process was started with
   (Slurm's ``SLURM_JOB_ID`` / ``SLURM_PROCID``, torchrun's ``TORCHELASTIC_RUN_ID`` / ``RANK``,
   Open MPI's ``OMPI_COMM_WORLD_RANK``, MPICH/Hydra's ``PMI_RANK``). Another user's environ is
   readable only by root (EACCES otherwise), so this source is often missing for an unprivileged
   agent.
2. ``/proc/<pid>/cgroup``: world-readable, and names the Slurm job (``.../job_<id>/step_<s>/...``)
   or the Kubernetes pod (``.../pod<uid>/...`` or ``...-pod<uid_with_underscores>.slice/...``)
   the process was placed in. It gives the job but never the rank.

A GPU's job is, in this order (job_with_pod):

1. the job the processes' environment names (a Slurm job id, a torchrun run id), or the Slurm job
   of their cgroup: the narrowest identity, whatever runs it;
2. on Kubernetes, the pod the kubelet allocated the GPU to, as "<namespace>/<pod>"
   (fleetwatch.agent.sources.podresources: the kubelet's pod-resources socket, which dcgm-exporter
   reads too), even before a process opens the GPU;
3. the pod of the processes' cgroup, "pod:<uid>", where the socket is absent, failing, or no
   single pod holds the GPU (the cgroup needs no socket and follows the processes that actually
   use the GPU rather than the device allocation).

Results are cached per (pid, start time): a process's job and environment do not change while it
lives, and the start time (``/proc/<pid>/stat`` field 22) tells a reused pid from the old one.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_PROCFS_ROOT = "/proc"
DEFAULT_MAX_CACHED_PIDS = 4096

SCHEDULER_SLURM = "slurm"
SCHEDULER_KUBERNETES = "kubernetes"
SCHEDULER_ENV = "env"

# /proc/<pid>/stat field 22 is the start time in clock ticks since boot (proc(5)). Fields are
# counted from 1; after the ")" closing field 2 (comm) the first field is number 3.
_STAT_START_TIME_FIELD = 22
_STAT_FIRST_FIELD_AFTER_COMM = 3

# Slurm sets SLURM_JOB_ID (and the older alias SLURM_JOBID) in every task and SLURM_PROCID to the
# task's global rank in the step (srun(1) and sbatch(1), "OUTPUT ENVIRONMENT VARIABLES").
_SLURM_JOB_ID_VARS = ("SLURM_JOB_ID", "SLURM_JOBID")
_SLURM_RANK_VAR = "SLURM_PROCID"
# torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, ... and TORCHELASTIC_RUN_ID (its
# --rdzv-id) in every worker (pytorch.org/docs/stable/elastic/run.html, "Environment Variables").
_TORCH_RANK_VAR = "RANK"
_TORCHELASTIC_RUN_ID_VAR = "TORCHELASTIC_RUN_ID"
# torchrun's --rdzv-id defaults to the literal "none" (torch/distributed/run.py, get_args_parser):
# every job launched without an id shares it, so it names no job.
_TORCHELASTIC_NO_RUN_ID = "none"
# Open MPI: OMPI_COMM_WORLD_RANK (docs.open-mpi.org, "Environment variables set for MPI
# applications"); MPICH / Intel MPI (Hydra): PMI_RANK.
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK")

# Slurm cgroup layouts, one match per line of /proc/<pid>/cgroup:
#   v1: "10:devices:/slurm/uid_2101171/job_280678/step_interactive/task_0"
#       (github.com/NordicHPC/sonar src/slurm.rs test data; slurm.schedmd.com/cgroups.html)
#   v2: "0::/system.slice/slurmstepd.scope/job_1392969/step_0/user/task_0"
#       (same file, "from a Fox compute node"; treydock/cgroup_exporter collector tests;
#       slurm.schedmd.com/cgroup_v2.html), and "<nodename>_slurmstepd.scope" when several slurmd
#       share a host.
# The first pattern needs a slurm-named parent ("slurm", "slurm_<node>", "slurmstepd.scope",
# "<node>_slurmstepd.scope"); the second catches a job_<id>/step_<s> pair under any parent (a
# cgroup namespace or a custom CgroupMountpoint can hide the slurm-named parent).
_SLURM_CGROUP_PATTERNS = (
    re.compile(r"/[^/]*slurm[^/]*/(?:uid_\d+/)?job_(\d+)(?:/|$)"),
    re.compile(r"(?:^|/)job_(\d+)/step_(?:\d+|batch|extern|interactive)(?:/|$)"),
)

# Kubernetes pod cgroups, as the kubelet names them (kubernetes/kubernetes
# pkg/kubelet/cm/cgroup_manager_linux.go: CgroupName.ToSystemd escapes "-" to "_";
# test/e2e_node/cpu_manager_test.go gives the example below):
#   cgroupfs driver: "/kubepods/burstable/pod74c13223-5a00-11e9-b385-42010a80018d/<container id>"
#       (Guaranteed pods sit directly under /kubepods; Qard/container-info test fixtures)
#   systemd driver:  "/kubepods.slice/kubepods-burstable.slice/
#       kubepods-burstable-pod0b7632a2_a56e_4278_987a_22de18008dbe.slice/cri-containerd-<id>.scope"
#       (crio-<id>.scope under CRI-O, docker-<id>.scope under dockershim; kind nests the whole tree
#       under "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort-pod<uid>.slice").
# Pod UIDs are RFC 4122 UUIDs, except static pods whose UID is a 32-hex-digit config hash, so the
# UID is matched as hex digits with separators rather than as a strict UUID.
_KUBE_CGROUPFS_POD = re.compile(
    r"(?:^|/)kubepods/(?:besteffort/|burstable/)?pod([0-9a-fA-F][0-9a-fA-F-]*[0-9a-fA-F])(?:/|$)"
)
_KUBE_SYSTEMD_POD = re.compile(
    r"(?:^|[/-])kubepods-(?:besteffort-|burstable-)?pod([0-9a-fA-F][0-9a-fA-F_]*[0-9a-fA-F])\.slice(?:/|$)"
)


@dataclass(frozen=True)
class JobInfo:
    """Who a process works for. ``job`` is None when only a rank is known (a launcher gave the
    rank but no job id, and no cgroup names a job)."""

    job: str | None
    rank: int | None
    scheduler: str  # "slurm" | "kubernetes" | "env"


@dataclass(frozen=True)
class _CacheEntry:
    start_time_ticks: int
    info: JobInfo | None


def parse_stat_start_time_ticks(stat_text: str) -> int | None:
    """Start time (clock ticks since boot) from a /proc/<pid>/stat line, or None if malformed.

    The command name (field 2) is in parentheses and may itself contain spaces and parentheses
    (a process can rename itself to anything; systemd's "(sd-pam)" shows as "((sd-pam))"), so the
    fields are counted from the last ")".
    """
    _, closing, after_comm = stat_text.rpartition(")")
    if not closing:
        return None
    fields = after_comm.split()
    index = _STAT_START_TIME_FIELD - _STAT_FIRST_FIELD_AFTER_COMM
    if len(fields) <= index:
        return None
    try:
        return int(fields[index])
    except ValueError:
        return None


def parse_environ(raw: bytes) -> dict[str, str]:
    """The NUL-separated NAME=value entries of /proc/<pid>/environ (undecodable bytes kept)."""
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


def _parse_rank(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        rank = int(value.strip())
    except ValueError:
        return None
    return rank if rank >= 0 else None


def _first_rank(env: Mapping[str, str], names: Iterable[str]) -> int | None:
    for name in names:
        rank = _parse_rank(env.get(name))
        if rank is not None:
            return rank
    return None


def job_from_environ(env: Mapping[str, str]) -> JobInfo | None:
    """Job and rank from a process's environment, or None when it names neither."""
    slurm_job = next((env[name].strip() for name in _SLURM_JOB_ID_VARS if env.get(name, "").strip()), None)
    run_id = env.get(_TORCHELASTIC_RUN_ID_VAR, "").strip()
    if run_id == _TORCHELASTIC_NO_RUN_ID:
        run_id = ""
    if slurm_job is not None:
        if run_id:
            # torchrun started by srun (one task per node): every worker inherits the launcher
            # task's SLURM_PROCID (the node's index), while torchrun's RANK is the worker's own.
            rank_vars: tuple[str, ...] = (_TORCH_RANK_VAR, _SLURM_RANK_VAR, *_MPI_RANK_VARS)
        else:
            rank_vars = (_SLURM_RANK_VAR, _TORCH_RANK_VAR, *_MPI_RANK_VARS)
        return JobInfo(job=slurm_job, rank=_first_rank(env, rank_vars), scheduler=SCHEDULER_SLURM)
    rank = _first_rank(env, (_TORCH_RANK_VAR, *_MPI_RANK_VARS))
    if run_id:
        return JobInfo(job=run_id, rank=rank, scheduler=SCHEDULER_ENV)
    if rank is not None:
        return JobInfo(job=None, rank=rank, scheduler=SCHEDULER_ENV)
    return None


def job_from_cgroup(cgroup_text: str) -> tuple[str, str] | None:
    """(job, scheduler) from the lines of /proc/<pid>/cgroup (v1 and v2), or None.

    Slurm is tried before Kubernetes: where slurmd itself runs in a pod (Slinky), a job's cgroup
    nests under the pod's, and the Slurm job is the narrower identity.
    """
    # "hierarchy-ID:controller-list:cgroup-path"; the path may itself contain ":".
    paths = [line.split(":", 2)[2] for line in cgroup_text.splitlines() if line.count(":") >= 2]
    for pattern in _SLURM_CGROUP_PATTERNS:
        for path in paths:
            match = pattern.search(path)
            if match:
                return match.group(1), SCHEDULER_SLURM
    for path in paths:
        match = _KUBE_SYSTEMD_POD.search(path) or _KUBE_CGROUPFS_POD.search(path)
        if match:
            return "pod:" + match.group(1).replace("_", "-").lower(), SCHEDULER_KUBERNETES
    return None


def job_with_pod(info: JobInfo | None, pod_job: str | None) -> JobInfo | None:
    """A GPU's job from its processes' (`info`, JobResolver.for_gpu) and the job of the pod the
    kubelet allocated it to (`pod_job`, "<namespace>/<pod>"; None when unknown), in the module's order.

    A job the environment or a Slurm cgroup names is kept (where slurmd runs in a pod, the Slurm
    job is the narrower identity); the pod's readable name replaces a cgroup's "pod:<uid>". The
    rank is always the processes' own.
    """
    if pod_job is None or (info is not None and info.job is not None and info.scheduler != SCHEDULER_KUBERNETES):
        return info
    return JobInfo(job=pod_job, rank=info.rank if info is not None else None, scheduler=SCHEDULER_KUBERNETES)


class JobResolver:
    """Resolves pids to jobs through a procfs root, caching one answer per living process."""

    def __init__(
        self, procfs_root: str = DEFAULT_PROCFS_ROOT, *, max_cached_pids: int = DEFAULT_MAX_CACHED_PIDS
    ) -> None:
        if max_cached_pids < 1:
            raise ValueError(f"max_cached_pids must be at least 1, got {max_cached_pids}")
        self.procfs_root = procfs_root
        self.max_cached_pids = max_cached_pids
        # Least recently used first, so the bound evicts pids nobody asked about lately.
        self._cache: OrderedDict[int, _CacheEntry] = OrderedDict()
        # The sampler thread resolves while forget_missing may run from another cycle's thread.
        self._lock = threading.Lock()
        # Entries dropped because the cache was full (Bounded everything: a count of what hit it).
        self.evictions_total = 0

    def __len__(self) -> int:
        return len(self._cache)

    def _path(self, pid: int, name: str) -> str:
        return os.path.join(self.procfs_root, str(pid), name)

    def _read_file(self, path: str) -> bytes:
        """Every procfs read goes through here (one place to count or fake reads in tests)."""
        with open(path, "rb") as f:
            return f.read()

    def _start_time_ticks(self, pid: int) -> int | None:
        """The pid's start time, or None when the process is gone (or its stat is unreadable)."""
        try:
            raw = self._read_file(self._path(pid, "stat"))
        except (FileNotFoundError, ProcessLookupError):
            return None
        except OSError as exc:
            log.debug("cannot read stat of pid %d: %s", pid, exc)
            return None
        return parse_stat_start_time_ticks(raw.decode("ascii", "replace"))

    def _resolve_uncached(self, pid: int) -> JobInfo | None:
        env_info: JobInfo | None = None
        try:
            env_info = job_from_environ(parse_environ(self._read_file(self._path(pid, "environ"))))
        except OSError as exc:
            # EACCES: another user's process and we are not root; ENOENT/ESRCH: the process is
            # exiting. Either way the cgroup (world-readable) may still name the job.
            log.debug("cannot read environ of pid %d (%s); trying its cgroup", pid, exc)
        if env_info is not None and env_info.job is not None:
            return env_info
        cgroup_job = None
        try:
            cgroup_job = job_from_cgroup(self._read_file(self._path(pid, "cgroup")).decode("utf-8", "replace"))
        except OSError as exc:
            log.debug("cannot read cgroup of pid %d: %s", pid, exc)
        if cgroup_job is not None:
            job, scheduler = cgroup_job
            # The environment may still carry the rank (a torchrun worker in a pod: RANK is set,
            # the run id is the default "none", the pod is in the cgroup).
            rank = env_info.rank if env_info is not None else None
            return JobInfo(job=job, rank=rank, scheduler=scheduler)
        return env_info

    def for_pid(self, pid: int) -> JobInfo | None:
        """The job of one process, or None when it names none or is gone. Never raises on I/O."""
        start_time_ticks = self._start_time_ticks(pid)
        if start_time_ticks is None:
            with self._lock:
                self._cache.pop(pid, None)
            return None
        with self._lock:
            entry = self._cache.get(pid)
            if entry is not None and entry.start_time_ticks == start_time_ticks:
                self._cache.move_to_end(pid)
                return entry.info
        info = self._resolve_uncached(pid)
        # The pid may have exited, and even been reused, while its files were read: the answer is
        # kept only if the same process is still there, so a stale one is never cached.
        if self._start_time_ticks(pid) != start_time_ticks:
            with self._lock:
                self._cache.pop(pid, None)
            return None
        with self._lock:
            self._cache[pid] = _CacheEntry(start_time_ticks, info)
            self._cache.move_to_end(pid)
            while len(self._cache) > self.max_cached_pids:
                self._cache.popitem(last=False)
                self.evictions_total += 1
        return info

    def for_gpu(self, pids: Sequence[int]) -> JobInfo | None:
        """The job of the processes on one GPU, with the lowest rank of that job's processes there.

        The job is the most common among the pids (ties: the job with the lowest pid), so a
        monitoring tool or a stray notebook sharing the GPU does not take it over. With no job at
        all, a rank alone is still reported when some process has one.
        """
        infos = [(pid, info) for pid in sorted(set(pids)) if (info := self.for_pid(pid)) is not None]
        counts: Counter[str] = Counter()
        lowest_pid: dict[str, int] = {}
        for pid, info in infos:  # pids ascend, so a job's first pid seen is its lowest
            if info.job is not None:
                counts[info.job] += 1
                lowest_pid.setdefault(info.job, pid)
        if counts:
            job: str | None = min(counts, key=lambda j: (-counts[j], lowest_pid[j]))
            members = [info for _, info in infos if info.job == job]
        else:
            job = None
            members = [info for _, info in infos]
        if not members:
            return None
        ranked = [(info.rank, info) for info in members if info.rank is not None]
        if ranked:
            rank, chosen = min(ranked, key=lambda pair: pair[0])
            return JobInfo(job=job, rank=rank, scheduler=chosen.scheduler)
        # Only reachable with a job: a member without a job carries a rank by construction.
        return JobInfo(job=job, rank=None, scheduler=members[0].scheduler)

    def forget_missing(self, live_pids: Iterable[int]) -> None:
        """Drops the cache entries of pids not in ``live_pids`` (the pids seen on GPUs this cycle)."""
        live = set(live_pids)
        with self._lock:
            for pid in [pid for pid in self._cache if pid not in live]:
                del self._cache[pid]
