"""Tests for job attribution: every source and fallback on a procfs fixture, the cache, for_gpu."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fleetwatch.agent.sources.jobs import (
    JobInfo,
    JobResolver,
    job_from_cgroup,
    job_from_environ,
    parse_environ,
    parse_stat_start_time_ticks,
)

FIXTURE_PROCFS = Path(__file__).resolve().parent.parent / "fixtures" / "proc-jobs"
KUBE_POD = "pod:6f0a3b2c-9d4e-4c1a-8b7f-2e5d1c0a9f34"
KUBE_CGROUP = (FIXTURE_PROCFS / "5200" / "cgroup").read_text()
PLAIN_CGROUP = "0::/user.slice/user-1001.slice/session-3.scope\n"


class RecordingResolver(JobResolver):
    """A resolver that records every procfs read and can fail or intercept chosen ones."""

    def __init__(self, procfs_root: str | Path, **kwargs: int) -> None:
        super().__init__(str(procfs_root), **kwargs)
        self.reads: list[str] = []
        self.failures: dict[str, OSError] = {}  # file name ("environ", ...) -> error to raise
        self.after_read: Callable[[str], None] | None = None

    def _read_file(self, path: str) -> bytes:
        name = os.path.basename(path)
        self.reads.append(name)
        if name in self.failures:
            raise self.failures[name]
        data = super()._read_file(path)
        if self.after_read is not None:
            self.after_read(name)
        return data

    def reads_of(self, name: str) -> int:
        return self.reads.count(name)


def stat_line(pid: int, start_time_ticks: int, comm: str = "pt_main_thread") -> str:
    """The fixture's real stat line with its pid, comm and start time (field 22) replaced."""
    template = (FIXTURE_PROCFS / "4101" / "stat").read_text()
    fields = template.rpartition(")")[2].split()
    fields[19] = str(start_time_ticks)
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def make_proc(
    root: Path,
    pid: int,
    *,
    start_time_ticks: int = 1000,
    environ: dict[str, str] | None = None,
    cgroup: str | None = None,
) -> None:
    """One /proc/<pid> with a stat and, when given, an environ and a cgroup file."""
    directory = root / str(pid)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stat").write_text(stat_line(pid, start_time_ticks))
    for name in ("environ", "cgroup"):
        (directory / name).unlink(missing_ok=True)
    if environ is not None:
        (directory / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items()))
    if cgroup is not None:
        (directory / "cgroup").write_text(cgroup)


@pytest.fixture
def procfs(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE_PROCFS, root)
    return root


# --- every source, on the committed fixture -------------------------------------------------


@pytest.mark.parametrize(
    ("pid", "expected"),
    [
        # Slurm job: SLURM_JOB_ID + SLURM_PROCID from environ.
        (4101, JobInfo(job="4242", rank=3, scheduler="slurm")),
        (4102, JobInfo(job="4242", rank=1, scheduler="slurm")),
        # torchrun worker in a pod, environ unreadable: the pod from the cgroup v2 systemd path.
        (5200, JobInfo(job=KUBE_POD, rank=None, scheduler="kubernetes")),
        # cgroup v1 Slurm task, environ missing: the job from /slurm/uid_<u>/job_<id>/...
        (6300, JobInfo(job="51077", rank=None, scheduler="slurm")),
        # Plain process: nothing names a job.
        (7400, None),
        # Bare-metal torchrun: TORCHELASTIC_RUN_ID is the job, RANK the rank.
        (8500, JobInfo(job="llama-ft-0412", rank=5, scheduler="env")),
    ],
)
def test_fixture_processes_resolve_to_their_jobs(pid: int, expected: JobInfo | None) -> None:
    assert JobResolver(str(FIXTURE_PROCFS)).for_pid(pid) == expected


def test_vanished_pid_is_none() -> None:
    assert JobResolver(str(FIXTURE_PROCFS)).for_pid(999_999) is None


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied"),
        ProcessLookupError(3, "No such process"),
        FileNotFoundError(2, "No such file or directory"),
    ],
)
def test_unreadable_environ_falls_back_to_cgroup(error: OSError) -> None:
    resolver = RecordingResolver(FIXTURE_PROCFS)
    resolver.failures["environ"] = error
    # 4101's environ names rank 3; its cgroup names the job only.
    assert resolver.for_pid(4101) == JobInfo(job="4242", rank=None, scheduler="slurm")
    assert resolver.reads_of("cgroup") == 1


def test_unreadable_environ_and_cgroup_is_none_not_an_error() -> None:
    resolver = RecordingResolver(FIXTURE_PROCFS)
    resolver.failures["environ"] = PermissionError(13, "Permission denied")
    resolver.failures["cgroup"] = PermissionError(13, "Permission denied")
    assert resolver.for_pid(4101) is None


def test_environ_job_wins_without_reading_the_cgroup() -> None:
    resolver = RecordingResolver(FIXTURE_PROCFS)
    assert resolver.for_pid(4101) == JobInfo(job="4242", rank=3, scheduler="slurm")
    assert resolver.reads_of("cgroup") == 0


def test_pod_job_takes_rank_from_a_readable_environ(procfs: Path) -> None:
    # torchrun in a pod without --rdzv-id: TORCHELASTIC_RUN_ID is the default "none", which names
    # no job, so the pod does, and RANK still gives the rank.
    make_proc(
        procfs, 5201, environ={"TORCHELASTIC_RUN_ID": "none", "RANK": "11", "LOCAL_RANK": "3"}, cgroup=KUBE_CGROUP
    )
    assert JobResolver(str(procfs)).for_pid(5201) == JobInfo(job=KUBE_POD, rank=11, scheduler="kubernetes")


def test_rank_without_any_job_is_reported_alone(procfs: Path) -> None:
    make_proc(procfs, 5202, environ={"TORCHELASTIC_RUN_ID": "none", "RANK": "2"}, cgroup=PLAIN_CGROUP)
    assert JobResolver(str(procfs)).for_pid(5202) == JobInfo(job=None, rank=2, scheduler="env")


def test_stat_with_odd_command_name_still_gives_the_start_time(procfs: Path) -> None:
    (procfs / "4101" / "stat").write_text(stat_line(4101, 81234567, comm="a) (b c"))
    assert JobResolver(str(procfs)).for_pid(4101) == JobInfo(job="4242", rank=3, scheduler="slurm")


def test_malformed_stat_is_treated_as_gone(procfs: Path) -> None:
    (procfs / "4101" / "stat").write_text("4101 (python3) S 1 2\n")
    assert JobResolver(str(procfs)).for_pid(4101) is None


# --- environment rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_JOB_ID": "77", "SLURM_PROCID": "4", "RANK": "9"}, JobInfo("77", 4, "slurm")),
        # Older Slurm alias.
        ({"SLURM_JOBID": "78", "SLURM_PROCID": "0"}, JobInfo("78", 0, "slurm")),
        # No SLURM_PROCID: torch's RANK, then Open MPI's, then PMI's.
        ({"SLURM_JOB_ID": "79", "RANK": "6", "OMPI_COMM_WORLD_RANK": "1"}, JobInfo("79", 6, "slurm")),
        ({"SLURM_JOB_ID": "80", "OMPI_COMM_WORLD_RANK": "12", "PMI_RANK": "1"}, JobInfo("80", 12, "slurm")),
        ({"SLURM_JOB_ID": "81", "PMI_RANK": "7"}, JobInfo("81", 7, "slurm")),
        ({"SLURM_JOB_ID": "82"}, JobInfo("82", None, "slurm")),
        # srun launching torchrun (one task per node): SLURM_PROCID is the node's task, RANK the worker.
        (
            {"SLURM_JOB_ID": "83", "SLURM_PROCID": "1", "TORCHELASTIC_RUN_ID": "83", "RANK": "13"},
            JobInfo("83", 13, "slurm"),
        ),
        # A malformed rank is skipped in favour of the next source.
        ({"SLURM_JOB_ID": "84", "SLURM_PROCID": "x", "RANK": "2"}, JobInfo("84", 2, "slurm")),
        ({"SLURM_JOB_ID": "85", "SLURM_PROCID": "-1"}, JobInfo("85", None, "slurm")),
        ({"TORCHELASTIC_RUN_ID": "ft-1", "RANK": "3"}, JobInfo("ft-1", 3, "env")),
        ({"TORCHELASTIC_RUN_ID": "ft-2", "PMI_RANK": "4"}, JobInfo("ft-2", 4, "env")),
        ({"TORCHELASTIC_RUN_ID": "none", "RANK": "3"}, JobInfo(None, 3, "env")),
        ({"TORCHELASTIC_RUN_ID": "none"}, None),
        ({"SLURM_JOB_ID": "", "PATH": "/usr/bin"}, None),
        ({}, None),
    ],
)
def test_job_from_environ(env: dict[str, str], expected: JobInfo | None) -> None:
    assert job_from_environ(env) == expected


def test_parse_environ_splits_on_nul_and_keeps_equals_in_values() -> None:
    raw = b"A=1\0OPTS=--x=y\0EMPTY=\0\xff=bad\0NOEQUALS\0"
    assert parse_environ(raw) == {"A": "1", "OPTS": "--x=y", "EMPTY": "", "\udcff": "bad"}


def test_parse_stat_start_time() -> None:
    line = (FIXTURE_PROCFS / "6300" / "stat").read_text()
    assert parse_stat_start_time_ticks(line) == 70123456
    assert parse_stat_start_time_ticks("garbage") is None


# --- cgroup paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        # Kubernetes, cgroup v2, systemd driver, containerd (burstable, besteffort, guaranteed).
        (KUBE_CGROUP, (KUBE_POD, "kubernetes")),
        (
            "0::/kubepods.slice/kubepods-besteffort.slice/"
            "kubepods-besteffort-pod729d2f46_480d_4796_a76c_e227e2671d31.slice/"
            "cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n",
            ("pod:729d2f46-480d-4796-a76c-e227e2671d31", "kubernetes"),
        ),
        (
            "0::/kubepods.slice/kubepods-podd80f4a0e_576f_47a8_a0cf_69dc23dc1980.slice/crio-0bc5eac79e3a.scope\n",
            ("pod:d80f4a0e-576f-47a8-a0cf-69dc23dc1980", "kubernetes"),
        ),
        # Kubernetes, cgroup v1, cgroupfs driver (every controller line names the pod).
        (
            "11:devices:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/"
            "34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376\n"
            "10:perf_event:/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/"
            "34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376\n1:name=systemd:/\n",
            ("pod:74c13223-5a00-11e9-b385-42010a80018d", "kubernetes"),
        ),
        # Guaranteed pod under cgroupfs, a static pod (hash UID, no dashes).
        (
            "0::/kubepods/pod2f6e7f3c-1b2a-4c5d-9e8f-0a1b2c3d4e5f/abc\n",
            ("pod:2f6e7f3c-1b2a-4c5d-9e8f-0a1b2c3d4e5f", "kubernetes"),
        ),
        (
            "0::/kubepods/burstable/pod6b4d3d6cd15d5a1d1b0d1c2e3f4a5b6c/abc\n",
            ("pod:6b4d3d6cd15d5a1d1b0d1c2e3f4a5b6c", "kubernetes"),
        ),
        # kind nests the tree under kubelet.slice; cgroup v1 systemd driver with docker.
        (
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            "kubelet-kubepods-besteffort-pod1c178021_5860_4495_a1ab_f9ac17877672.slice/cri-containerd-ab.scope\n",
            ("pod:1c178021-5860-4495-a1ab-f9ac17877672", "kubernetes"),
        ),
        (
            "4:pids:/kubepods.slice/kubepods-burstable.slice/"
            "kubepods-burstable-pod1c178021_5860_4495_a1ab_f9ac17877672.slice/docker-2403fae93d37.scope\n",
            ("pod:1c178021-5860-4495-a1ab-f9ac17877672", "kubernetes"),
        ),
        # The pod's own slice (a process in the pod cgroup rather than a container).
        (
            "0::/kubepods.slice/kubepods-burstable.slice/"
            "kubepods-burstable-pod0b7632a2_a56e_4278_987a_22de18008dbe.slice\n",
            ("pod:0b7632a2-a56e-4278-987a-22de18008dbe", "kubernetes"),
        ),
        # Slurm, cgroup v2 (single and multiple slurmd), v1 (step and interactive), extern step.
        ("0::/system.slice/slurmstepd.scope/job_1392969/step_0/user/task_0\n", ("1392969", "slurm")),
        ("0::/system.slice/gpu07_slurmstepd.scope/job_101/step_batch/user/task_special\n", ("101", "slurm")),
        ("10:devices:/slurm/uid_2101171/job_280678/step_interactive/task_0\n", ("280678", "slurm")),
        ("4:memory:/slurm_gpu07/uid_1000/job_12/step_3/task_1\n", ("12", "slurm")),
        ("0::/system.slice/slurmstepd.scope/job_42/step_extern/user\n", ("42", "slurm")),
        # Inside a cgroup namespace the slurm-named parent can be out of view.
        ("0::/job_43/step_0/user/task_2\n", ("43", "slurm")),
        # slurmd running in a pod (Slinky): the Slurm job is the narrower identity.
        (
            "0::/kubepods.slice/kubepods-burstable.slice/"
            "kubepods-burstable-pod0b7632a2_a56e_4278_987a_22de18008dbe.slice/cri-containerd-ab.scope/"
            "system.slice/slurmstepd.scope/job_55/step_0/user/task_0\n",
            ("55", "slurm"),
        ),
        # Not jobs: the slurmstepd daemon itself, a login session, services, this machine's shape.
        ("0::/system.slice/slurmstepd.scope/system\n", None),
        ("0::/system.slice/slurmd.service\n", None),
        (PLAIN_CGROUP, None),
        ("0::/kubepods.slice/kubepods-burstable.slice\n", None),
        ("9:name=systemd:/\n4:memory:/process_api/cba2c19f9b6370161b141c936698be54\n0::/\n", None),
        ("", None),
        ("not a cgroup file\n", None),
    ],
)
def test_job_from_cgroup(cgroup: str, expected: tuple[str, str] | None) -> None:
    assert job_from_cgroup(cgroup) == expected


# --- the cache --------------------------------------------------------------------------------


def test_cache_hit_reads_only_the_stat() -> None:
    resolver = RecordingResolver(FIXTURE_PROCFS)
    first = resolver.for_pid(4101)
    assert resolver.reads_of("environ") == 1
    resolver.reads.clear()
    for _ in range(3):
        assert resolver.for_pid(4101) == first
    assert resolver.reads == ["stat"] * 3


def test_cache_keeps_negative_answers() -> None:
    resolver = RecordingResolver(FIXTURE_PROCFS)
    assert resolver.for_pid(7400) is None
    resolver.reads.clear()
    assert resolver.for_pid(7400) is None
    assert resolver.reads == ["stat"]


def test_pid_reuse_invalidates_the_cached_answer(procfs: Path) -> None:
    make_proc(procfs, 6000, start_time_ticks=5000, environ={"SLURM_JOB_ID": "1", "SLURM_PROCID": "0"})
    resolver = RecordingResolver(procfs)
    assert resolver.for_pid(6000) == JobInfo("1", 0, "slurm")
    # The process exits and the kernel hands its pid to a process of another job.
    make_proc(procfs, 6000, start_time_ticks=9000, environ={"SLURM_JOB_ID": "2", "SLURM_PROCID": "5"})
    resolver.reads.clear()
    assert resolver.for_pid(6000) == JobInfo("2", 5, "slurm")
    assert resolver.reads_of("environ") == 1


def test_pid_gone_drops_its_cache_entry(procfs: Path) -> None:
    resolver = JobResolver(str(procfs))
    assert resolver.for_pid(4101) is not None
    shutil.rmtree(procfs / "4101")
    assert resolver.for_pid(4101) is None
    assert len(resolver) == 0


def test_pid_reused_while_being_read_is_not_cached(procfs: Path) -> None:
    resolver = RecordingResolver(procfs)

    def reuse_pid_after_environ(name: str) -> None:
        if name == "environ":
            make_proc(procfs, 4101, start_time_ticks=1, environ={"SLURM_JOB_ID": "other"})

    resolver.after_read = reuse_pid_after_environ
    assert resolver.for_pid(4101) is None
    assert len(resolver) == 0
    resolver.after_read = None
    assert resolver.for_pid(4101) == JobInfo("other", None, "slurm")


def test_cache_is_bounded_least_recently_used_first(procfs: Path) -> None:
    resolver = RecordingResolver(procfs, max_cached_pids=2)
    resolver.for_pid(4101)
    resolver.for_pid(4102)
    resolver.for_pid(4101)  # 4101 is now the most recently used
    resolver.for_pid(8500)  # evicts 4102
    assert len(resolver) == 2
    assert resolver.evictions_total == 1
    resolver.reads.clear()
    resolver.for_pid(4101)
    resolver.for_pid(8500)
    assert resolver.reads_of("environ") == 0
    resolver.for_pid(4102)
    assert resolver.reads_of("environ") == 1


def test_forget_missing_drops_pids_not_alive() -> None:
    resolver = JobResolver(str(FIXTURE_PROCFS))
    for pid in (4101, 4102, 5200, 7400):
        resolver.for_pid(pid)
    resolver.forget_missing([4102, 7400, 12345])
    assert len(resolver) == 2
    resolver.forget_missing([])
    assert len(resolver) == 0


def test_max_cached_pids_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_cached_pids"):
        JobResolver(max_cached_pids=0)


# --- for_gpu ----------------------------------------------------------------------------------


def test_for_gpu_picks_the_majority_job_and_its_lowest_rank(procfs: Path) -> None:
    # Two ranks of Slurm job 4242 and one pod process share the GPU; the pod process has rank 0,
    # which belongs to another job and must not be taken.
    make_proc(procfs, 3000, environ={"TORCHELASTIC_RUN_ID": "none", "RANK": "0"}, cgroup=KUBE_CGROUP)
    resolver = JobResolver(str(procfs))
    assert resolver.for_gpu([4101, 3000, 4102]) == JobInfo("4242", 1, "slurm")


def test_for_gpu_tie_goes_to_the_job_with_the_lowest_pid() -> None:
    resolver = JobResolver(str(FIXTURE_PROCFS))
    assert resolver.for_gpu([8500, 5200]) == JobInfo(KUBE_POD, None, "kubernetes")
    assert resolver.for_gpu([8500, 4102]) == JobInfo("4242", 1, "slurm")


def test_for_gpu_ignores_unknown_vanished_and_duplicate_pids() -> None:
    resolver = JobResolver(str(FIXTURE_PROCFS))
    assert resolver.for_gpu([7400, 999_999, 6300, 6300]) == JobInfo("51077", None, "slurm")


def test_for_gpu_job_without_ranks_anywhere(procfs: Path) -> None:
    make_proc(procfs, 3001, cgroup=KUBE_CGROUP)
    resolver = JobResolver(str(procfs))
    assert resolver.for_gpu([5200, 3001]) == JobInfo(KUBE_POD, None, "kubernetes")


def test_for_gpu_rank_only_when_no_job(procfs: Path) -> None:
    make_proc(procfs, 3002, environ={"RANK": "4"}, cgroup=PLAIN_CGROUP)
    make_proc(procfs, 3003, environ={"RANK": "2"}, cgroup=PLAIN_CGROUP)
    resolver = JobResolver(str(procfs))
    assert resolver.for_gpu([3002, 3003, 7400]) == JobInfo(None, 2, "env")


def test_for_gpu_nothing_known_is_none() -> None:
    resolver = JobResolver(str(FIXTURE_PROCFS))
    assert resolver.for_gpu([7400, 999_999]) is None
    assert resolver.for_gpu([]) is None


# --- this machine's /proc ---------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux procfs")
def test_real_process_environ_on_this_machine() -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SLURM_JOB_ID": "777", "SLURM_PROCID": "2"}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        resolver = JobResolver()
        deadline = time.monotonic() + 5.0
        info = resolver.for_pid(child.pid)
        # Right after fork the child may still carry our environment until it execs.
        while info != JobInfo("777", 2, "slurm") and time.monotonic() < deadline:
            resolver.forget_missing([])
            time.sleep(0.01)
            info = resolver.for_pid(child.pid)
        assert info == JobInfo("777", 2, "slurm")
    finally:
        child.kill()
        child.wait()
    assert resolver.for_pid(child.pid) is None
    assert len(resolver) == 0
