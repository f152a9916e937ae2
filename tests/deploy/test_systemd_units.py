"""deploy/systemd against systemd itself, the README's install, pyproject's scripts and the daemons' settings.

systemd-analyze (Debian's `systemd` package, which `.ci/run` installs) checks the units offline:
`verify` in a throwaway root that holds the units, the targets they name and stubs of their
ExecStart binaries, and `security --offline` for the sandbox's exposure score. A missing
systemd-analyze skips these tests on a developer's machine and fails them under CI.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fleetwatch.agent.config import AgentConfig
from fleetwatch.collector.config import CollectorConfig

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = ROOT / "deploy" / "systemd"
AGENT = "fleetwatch-agent.service"
COLLECTOR = "fleetwatch-collector.service"
UNITS = (AGENT, COLLECTOR)
# Drop-ins shipped next to the units, by the unit they extend.
DROP_INS = {AGENT: sorted((SYSTEMD_DIR / f"{AGENT}.d").glob("*.conf"))}
K8S_DROP_IN = SYSTEMD_DIR / f"{AGENT}.d" / "kubelet-pod-resources.conf"
INSTALL_BIN = "/opt/fleetwatch/bin"
# /proc/devices names of the NVIDIA driver's device groups NVML opens: "nvidia" (the open driver) or
# "nvidia-frontend" (older ones) for nvidiactl and nvidia0.., nvidia-uvm, nvidia-caps (MIG).
NVIDIA_DEVICE_GROUPS = ("nvidia", "nvidia-frontend", "nvidia-uvm", "nvidia-caps")
# systemd-analyze security's words, best first (src/analyze/analyze-security.c badness_table).
EXPOSURE_LEVELS = ("PERFECT", "SAFE", "OK", "MEDIUM", "EXPOSED", "UNSAFE", "DANGEROUS")
# --offline and --root for `security` came in systemd 250.
MIN_SYSTEMD = 250


@functools.cache
def _version_line(path: str) -> str:
    result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False, timeout=30)
    return (result.stdout.splitlines() or [""])[0]


def systemd_analyze() -> str:
    """systemd-analyze new enough for offline checks; skips (fails under CI) without it."""
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze not installed (apt-get install systemd; .ci/run does)"
    else:
        match = re.match(r"systemd (\d+)", _version_line(path))
        if match and int(match.group(1)) >= MIN_SYSTEMD:
            return path
        reason = f"systemd-analyze is older than {MIN_SYSTEMD} (no security --offline): {_version_line(path)!r}"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------------
# Unit files as systemd reads them


def parse_unit(*texts: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values]}} of a unit and its drop-ins, in order; an empty value resets the list."""
    sections: dict[str, dict[str, list[str]]] = {}
    for text in texts:
        section = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                sections.setdefault(section, {})
                continue
            assert section is not None, f"line outside a section: {raw!r}"
            assert not line.endswith("\\"), f"continued lines are not parsed here: {raw!r}"
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {raw!r}"
            values = sections[section].setdefault(key.strip(), [])
            if value.strip():
                values.append(value.strip())
            else:
                values.clear()
    return sections


def unit_texts(name: str, drop_ins: bool = True) -> list[str]:
    paths = [SYSTEMD_DIR / name, *(DROP_INS.get(name, []) if drop_ins else [])]
    return [path.read_text() for path in paths]


def service(name: str, drop_ins: bool = True) -> dict[str, list[str]]:
    return parse_unit(*unit_texts(name, drop_ins))["Service"]


def last(directives: dict[str, list[str]], key: str, default: str = "") -> str:
    return directives.get(key, [default])[-1] if directives.get(key) else default


def words(directives: dict[str, list[str]], key: str) -> set[str]:
    return {word for value in directives.get(key, []) for word in value.split()}


def is_yes(directives: dict[str, list[str]], key: str) -> bool:
    return last(directives, key).lower() in ("yes", "true", "1", "on", "strict", "full")


def exec_start(name: str) -> list[str]:
    (line,) = service(name)["ExecStart"]
    return shlex.split(line)


# ---------------------------------------------------------------------------------------------
# systemd-analyze in a throwaway root


def _system_unit_dir() -> Path:
    for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if (Path(candidate) / "sysinit.target").is_file():
            return Path(candidate)
    pytest.fail("systemd-analyze is installed but sysinit.target is not: no systemd unit directory")


def make_root(base: Path, units: dict[str, str], drop_ins: dict[str, dict[str, str]] | None = None) -> Path:
    """A root with systemd's targets, `units` (name: text), their drop-ins and stub ExecStart binaries."""
    root = base / "root"
    unit_dir = root / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    # verify loads the whole start-up transaction (sysinit.target, basic.target, ...) from the root.
    targets = root / "usr" / "lib" / "systemd" / "system"
    targets.mkdir(parents=True)
    for target in _system_unit_dir().glob("*.target"):
        if target.is_file():
            shutil.copyfile(target, targets / target.name)
    for name, text in units.items():
        (unit_dir / name).write_text(text)
        for key, values in parse_unit(text).get("Service", {}).items():
            if key.startswith("Exec"):
                for value in values:
                    binary = root / shlex.split(value.lstrip("-+!@:"))[0].lstrip("/")
                    binary.parent.mkdir(parents=True, exist_ok=True)
                    binary.write_text("#!/bin/sh\nexit 0\n")
                    binary.chmod(0o755)
    for name, files in (drop_ins or {}).items():
        directory = unit_dir / f"{name}.d"
        directory.mkdir()
        for file_name, text in files.items():
            (directory / file_name).write_text(text)
    return root


def shipped_root(base: Path, drop_ins: bool = True) -> Path:
    return make_root(
        base,
        {name: (SYSTEMD_DIR / name).read_text() for name in UNITS},
        {AGENT: {path.name: path.read_text() for path in DROP_INS[AGENT]}} if drop_ins else None,
    )


def verify(root: Path, unit: str) -> list[str]:
    """What `systemd-analyze verify` objects to: its output lines, and its exit status when not 0.

    verify exits 0 after warnings such as "Unknown key ..., ignoring" or "Failed to parse ...,
    ignoring", so every line it prints counts: with the root holding nothing but these units and
    systemd's own targets, a clean unit prints none.
    """
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--generators=no", f"--root={root}", unit],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}")
    return problems


def exposure(root: Path, unit: str) -> tuple[float, str, str]:
    """(score, level word, the whole table) from `systemd-analyze security --offline=true`."""
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", f"--root={root}", "--no-pager", unit],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) ([A-Z]+)", result.stdout)
    assert match, f"no exposure line (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    return float(match.group(1)), match.group(2), result.stdout


@pytest.fixture(scope="module")
def units_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    systemd_analyze()
    return shipped_root(tmp_path_factory.mktemp("units"))


# ---------------------------------------------------------------------------------------------
# systemd's own checks


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_passes(units_root: Path, unit: str) -> None:
    assert verify(units_root, unit) == []


def test_verify_passes_without_the_kubernetes_drop_in(tmp_path: Path) -> None:
    systemd_analyze()
    assert verify(shipped_root(tmp_path, drop_ins=False), AGENT) == []


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("FooBar=1", "Unknown key 'FooBar'"),
        ("ProtectSystem=sometimes", "protect system"),
        ("DeviceAllow=char-nvidia* rwz", "Invalid device rights"),
        ("SystemCallFilter=@sytem-service", "Unknown system call group"),
    ],
)
def test_verify_catches_a_broken_agent_unit(tmp_path: Path, bad_line: str, expected: str) -> None:
    """The check above can fail: a bad directive, which verify only warns about, is reported."""
    systemd_analyze()
    text = (SYSTEMD_DIR / AGENT).read_text().replace("[Service]\n", f"[Service]\n{bad_line}\n", 1)
    problems = verify(make_root(tmp_path, {AGENT: text}), AGENT)
    assert any(expected in line for line in problems), problems


def test_verify_catches_a_broken_drop_in(tmp_path: Path) -> None:
    systemd_analyze()
    root = make_root(tmp_path, {AGENT: (SYSTEMD_DIR / AGENT).read_text()}, {AGENT: {"x.conf": "[Service]\nFooBar=1\n"}})
    assert any("Unknown key 'FooBar'" in line for line in verify(root, AGENT))


def test_verify_catches_a_missing_binary(tmp_path: Path) -> None:
    systemd_analyze()
    root = make_root(tmp_path, {AGENT: (SYSTEMD_DIR / AGENT).read_text()})
    (root / exec_start(AGENT)[0].lstrip("/")).unlink()
    assert any("is not executable" in line for line in verify(root, AGENT))


def test_agent_exposure_is_medium_or_better(units_root: Path, tmp_path: Path) -> None:
    for root in (units_root, shipped_root(tmp_path, drop_ins=False)):
        score, level, table = exposure(root, AGENT)
        print(f"{AGENT} ({'with' if root == units_root else 'without'} drop-ins): {score} {level}")
        assert EXPOSURE_LEVELS.index(level) <= EXPOSURE_LEVELS.index("MEDIUM"), table


def test_collector_exposure_is_ok_or_better(units_root: Path) -> None:
    score, level, table = exposure(units_root, COLLECTOR)
    print(f"{COLLECTOR}: {score} {level}")
    assert EXPOSURE_LEVELS.index(level) <= EXPOSURE_LEVELS.index("OK"), table


def test_exposure_check_can_fail(tmp_path: Path) -> None:
    """A unit with no sandbox (the agent's ExecStart and nothing else) reads as exposed."""
    systemd_analyze()
    bare = f"[Service]\nType=notify\nExecStart={shlex.join(exec_start(AGENT))}\n"
    score, level, _ = exposure(make_root(tmp_path, {AGENT: bare}), AGENT)
    assert EXPOSURE_LEVELS.index(level) > EXPOSURE_LEVELS.index("MEDIUM"), (score, level)


def test_a_missing_systemd_analyze_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="systemd-analyze not installed"):
        systemd_analyze()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        systemd_analyze()


# ---------------------------------------------------------------------------------------------
# The units against pyproject, the daemons' command lines and the README


def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def help_text(script: str) -> str:
    """`<script> --help`, run through its entry point with this interpreter."""
    module, _, function = pyproject()["project"]["scripts"][script].partition(":")
    code = f"import sys; from {module} import {function}; sys.argv[0] = {script!r}; sys.exit({function}())"
    result = subprocess.run(
        [sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())  # argparse wraps "env NAME" across lines


@pytest.mark.parametrize("unit", UNITS)
def test_exec_start_runs_a_console_script_from_the_venv(unit: str) -> None:
    argv = exec_start(unit)
    binary = Path(argv[0])
    assert str(binary.parent) == INSTALL_BIN
    assert binary.name in pyproject()["project"]["scripts"]
    assert f"fleetwatch-{'agent' if unit == AGENT else 'collector'}" == binary.name


@pytest.mark.parametrize("unit", UNITS)
def test_exec_start_flags_and_environment_are_the_daemons_own(unit: str) -> None:
    argv = exec_start(unit)
    text = help_text(Path(argv[0]).name)
    for flag in (arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")):
        assert re.search(rf"(^|[\s\[]){re.escape(flag)}(?![\w-])", text), f"{unit}: {flag} is not in --help"
    for assignment in service(unit).get("Environment", []):
        for name in (item.split("=", 1)[0] for item in shlex.split(assignment)):
            assert f"env {name}]" in text, f"{unit}: {name} is no setting of the daemon"


@pytest.mark.parametrize(("unit", "config"), [(AGENT, "agent.toml"), (COLLECTOR, "collector.toml")])
def test_config_file_is_where_the_readme_installs_it(unit: str, config: str) -> None:
    argv = exec_start(unit)
    path = argv[argv.index("--config") + 1]
    assert f"deploy/config/{config} {path}" in readme_install_block()
    assert (ROOT / "deploy" / "config" / config).is_file()


def test_both_units_share_one_dynamic_user_and_state_directory() -> None:
    """On a host that runs both daemons, /var/lib/fleetwatch must not flip between two owners."""
    agent, collector = service(AGENT), service(COLLECTOR)
    for key in ("DynamicUser", "User", "Group", "StateDirectory", "StateDirectoryMode"):
        assert last(agent, key) == last(collector, key) != "", key


def test_notify_units_are_served_by_daemons_that_notify() -> None:
    """Type=notify and WatchdogSec= only work because both daemons send READY=1 and WATCHDOG=1."""
    sources = {
        AGENT: "\n".join(p.read_text() for p in (ROOT / "agent").rglob("*.py")),
        COLLECTOR: "\n".join(p.read_text() for p in (ROOT / "collector").rglob("*.py")),
    }
    for unit, source in sources.items():
        directives = service(unit)
        assert last(directives, "Type") == "notify" and last(directives, "NotifyAccess") == "main"
        assert '"READY=1"' in source, unit
        if last(directives, "WatchdogSec"):
            assert '"WATCHDOG=1"' in source, unit


# ---------------------------------------------------------------------------------------------
# What the agent reads and writes, against its sandbox


def _defaults(config: type) -> dict[str, object]:
    values = {}
    for field in dataclasses.fields(config):
        if field.default is not dataclasses.MISSING:
            value = field.default
            values[field.name] = value.reveal() if hasattr(value, "reveal") else value
    return values


def agent_settings() -> list[dict[str, object]]:
    """The agent's defaults, and the same overlaid with the shipped deploy/config/agent.toml."""
    defaults = _defaults(AgentConfig)
    with (ROOT / "deploy" / "config" / "agent.toml").open("rb") as f:
        shipped = {**defaults, **tomllib.load(f)}
    return [defaults, shipped]


def writable(directives: dict[str, list[str]], path: str) -> bool:
    """Whether ProtectSystem=strict leaves `path` writable: under a State/RuntimeDirectory or ReadWritePaths."""
    allowed = [f"/var/lib/{d}" for d in words(directives, "StateDirectory")]
    allowed += [f"/run/{d}" for d in words(directives, "RuntimeDirectory")]
    allowed += [p.lstrip("-") for p in words(directives, "ReadWritePaths")]
    return any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed)


def hidden(directives: dict[str, list[str]], path: str) -> bool:
    covering = words(directives, "InaccessiblePaths") | {
        p.split(":")[0] for p in words(directives, "TemporaryFileSystem")
    }
    return any(path == c.lstrip("-") or path.startswith(c.lstrip("-").rstrip("/") + "/") for c in covering)


def device_rights(directives: dict[str, list[str]], node: str | None = None, group: str | None = None) -> str:
    """The access DeviceAllow= grants a device node path, or a /proc/devices group (globs matched)."""
    rights = ""
    for value in directives.get("DeviceAllow", []):
        spec, _, access = value.partition(" ")
        if (node and spec == node) or (group and spec.startswith("char-") and fnmatch.fnmatch(group, spec[5:])):
            rights += access.strip()
    return rights


def test_agent_may_write_its_spool_and_step_socket_directory() -> None:
    directives = service(AGENT)
    assert last(directives, "ProtectSystem") == "strict"
    for settings in agent_settings():
        assert writable(directives, str(settings["spool_dir"])), settings["spool_dir"]
        socket_dir = os.path.dirname(str(settings["step_socket"]))
        assert writable(directives, socket_dir), settings["step_socket"]
    # Training jobs of any user must reach the socket: the runtime directory is searchable by all.
    assert int(last(directives, "RuntimeDirectoryMode", "0755"), 8) & 0o001
    assert "/run/fleetwatch" in [f"/run/{d}" for d in words(directives, "RuntimeDirectory")]


def test_agent_may_read_kmsg_and_open_the_nvidia_devices() -> None:
    directives = service(AGENT)
    assert not is_yes(directives, "PrivateDevices")
    assert not is_yes(directives, "ProtectKernelLogs"), "ProtectKernelLogs hides /dev/kmsg"
    assert last(directives, "DevicePolicy") in ("closed", "strict"), "devices are allow-listed"
    for settings in agent_settings():
        assert "r" in device_rights(directives, node=str(settings["kmsg_path"]))
    for group in NVIDIA_DEVICE_GROUPS:
        assert {"r", "w"} <= set(device_rights(directives, group=group)), group
    assert "CAP_SYSLOG" in words(directives, "AmbientCapabilities"), "kernel.dmesg_restrict=1 needs it"


def test_agent_may_read_proc_sysfs_and_other_users_environ() -> None:
    directives = service(AGENT)
    assert last(directives, "ProtectProc", "default") == "default", "job attribution reads others' processes"
    assert last(directives, "ProcSubset", "all") == "all", "the host source reads /proc/stat, meminfo, net/dev"
    for settings in agent_settings():
        for key in ("procfs_root", "sysfs_root"):
            assert not hidden(directives, str(settings[key])), key
    ambient, bounding = words(directives, "AmbientCapabilities"), words(directives, "CapabilityBoundingSet")
    # /proc/<pid>/environ is 0400 of its owner (DAC) behind a ptrace-read check: both are needed.
    assert {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"} <= ambient <= bounding
    # ...and the capabilities only open files: ptrace() and the process_vm_* calls stay filtered.
    filters = directives["SystemCallFilter"]
    assert filters[0] == "@system-service"
    assert {"process_vm_readv", "process_vm_writev"} <= {w for f in filters[1:] for w in f.lstrip("~").split()}


def test_agent_capabilities_are_exactly_the_documented_ones() -> None:
    """A misspelt capability passes verify silently; so does one too many."""
    base = service(AGENT, drop_ins=False)
    expected = {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYSLOG", "CAP_PERFMON"}
    assert words(base, "AmbientCapabilities") == words(base, "CapabilityBoundingSet") == expected
    assert is_yes(base, "DynamicUser") and last(base, "User") not in ("", "root")
    assert is_yes(base, "NoNewPrivileges")
    with_k8s = service(AGENT)
    assert (
        words(with_k8s, "AmbientCapabilities")
        == words(with_k8s, "CapabilityBoundingSet")
        == expected | {"CAP_DAC_OVERRIDE"}
    )
    collector = service(COLLECTOR)
    assert words(collector, "CapabilityBoundingSet") == words(collector, "AmbientCapabilities") == set()


def test_kubernetes_drop_in_reaches_the_pod_resources_socket() -> None:
    assert K8S_DROP_IN in DROP_INS[AGENT]
    directives = service(AGENT)
    for settings in agent_settings():
        socket = str(settings["pod_resources_socket"])
        assert socket.startswith("/var/lib/kubelet/pod-resources/"), socket
        assert not hidden(directives, socket)
    # Root's 0755 socket: connect() needs write permission, which only CAP_DAC_OVERRIDE gives.
    assert "CAP_DAC_OVERRIDE" in words(directives, "AmbientCapabilities")
    assert "AF_UNIX" in words(directives, "RestrictAddressFamilies")


def test_agent_may_reach_the_collector_and_serve_metrics() -> None:
    directives = service(AGENT)
    assert not is_yes(directives, "PrivateNetwork")
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= words(directives, "RestrictAddressFamilies")
    assert not directives.get("IPAddressDeny"), "the collector and Prometheus may be anywhere"
    for settings in agent_settings():
        port = int(str(settings["metrics_listen"]).rsplit(":", 1)[1])
        assert port >= 1024 or "CAP_NET_BIND_SERVICE" in words(directives, "AmbientCapabilities")


def test_collector_may_write_its_database_and_read_its_key() -> None:
    directives = service(COLLECTOR)
    database = str(_defaults(CollectorConfig)["database_url"])
    assert database.startswith("sqlite:///")
    assert writable(directives, os.path.dirname(database.removeprefix("sqlite:///")))
    credentials = {value.split(":", 1)[0] for value in directives.get("LoadCredential", [])}
    for assignment in directives.get("Environment", []):
        for item in shlex.split(assignment):
            if "%d/" in item:
                assert item.split("%d/", 1)[1] in credentials, item


# ---------------------------------------------------------------------------------------------
# The README's install


def readme_install_block() -> str:
    """The first sh block of the README's "Running it on a cluster" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Running it on a cluster\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no sh block in 'Running it on a cluster'"
    return match.group(1)


def test_readme_installs_into_the_venv_the_units_run_from() -> None:
    block = readme_install_block()
    venv = str(Path(INSTALL_BIN).parent)
    assert f"python3 -m venv {venv}\n" in block
    installs = [line.split("#")[0].strip() for line in block.splitlines() if re.search(r"\bpip3? install\b", line)]
    assert installs
    extras = set()
    for command in installs:
        argv = shlex.split(command)
        assert argv[:2] == [f"{INSTALL_BIN}/pip", "install"], f"not the venv's pip: {command}"
        spec = re.fullmatch(r"\.\[([a-z,]+)\]", argv[-1])
        assert spec, f"not an install of this checkout with extras: {command}"
        extras |= set(spec.group(1).split(","))
    assert {"agent", "collector"} <= extras <= set(pyproject()["project"]["optional-dependencies"])
    for unit in UNITS:
        assert str(Path(exec_start(unit)[0]).parent) == INSTALL_BIN


def test_readme_copies_files_that_exist() -> None:
    block = readme_install_block()
    named = set(re.findall(r"\bdeploy/[\w./-]+", block))
    assert {f"deploy/systemd/{unit}" for unit in UNITS} <= named
    assert str(K8S_DROP_IN.relative_to(ROOT)) in named
    for path in named:
        assert (ROOT / path).is_file(), path
