"""What a built wheel installs: one top-level name, and dependencies by role (README, Installing)."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the venv's setuptools builds it, so the test needs no index.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("fleetwatch-*.whl")
    return path


def _dist_info(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [m for m in archive.namelist() if m.endswith(f".dist-info/{name}")]
        return archive.read(member).decode()


def test_the_wheel_installs_only_the_fleetwatch_name(wheel):
    assert _dist_info(wheel, "top_level.txt").split() == ["fleetwatch"]
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
        names = set(archive.namelist())
    assert tops == {"fleetwatch"}
    # The data files ride along: the XID catalog, the proto, the migrations.
    assert "fleetwatch/xid_catalog.csv" in names
    assert "fleetwatch/v1/telemetry.proto" in names
    assert any(n.startswith("fleetwatch/collector/storage/migrations/versions/") for n in names)
    # The fleet page (collector/page.py) and the vendored uPlot it loads, with its licence.
    static = "fleetwatch/collector/static/"
    assert {f"{static}index.html", f"{static}fleet.js", f"{static}vendor/uplot/uPlot.esm.js"} <= names
    assert {f"{static}vendor/uplot/LICENSE", f"{static}vendor/uplot/VENDORED.md"} <= names


def _requirements(wheel: Path) -> dict[str, set[str]]:
    """Requires-Dist names by extra ("" for the bare install)."""
    by_extra: dict[str, set[str]] = {}
    for line in _dist_info(wheel, "METADATA").splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec, _, marker = line.removeprefix("Requires-Dist:").partition(";")
        extra = marker.split("==")[1].strip().strip("\"'") if "extra" in marker else ""
        name = spec.strip().split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
        by_extra.setdefault(extra, set()).add(name)
    return by_extra


def test_dependencies_come_by_role(wheel):
    requires = _requirements(wheel)
    assert requires.get("", set()) == set()  # the step reporter needs nothing
    assert {"nvidia-ml-py", "psutil", "grpcio", "protobuf", "prometheus-client"} <= requires["agent"]
    assert not {"sqlalchemy", "psycopg", "alembic", "aiohttp"} & requires["agent"]
    assert {"sqlalchemy", "alembic", "psycopg", "aiohttp", "grpcio"} <= requires["collector"]
    assert requires["agent"] | requires["collector"] <= requires["all"]


def test_a_training_image_gets_the_step_reporter_from_the_bare_wheel(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True, timeout=300)
    # From another directory, so the checkout cannot stand in for the installed wheel.
    code = "from fleetwatch.stepreport import StepReporter; import sys; print(sorted(sys.modules))"
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "sqlalchemy" not in out.stdout and "grpc" not in out.stdout
    # What `pip install 'fleetwatch[agent]'` would install, resolved without installing it.
    report = tmp_path / "report.json"
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            f"{wheel}[agent]",
        ],
        check=True,
        timeout=300,
    )
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"nvidia-ml-py", "grpcio", "psutil"} <= names
    assert "sqlalchemy" not in names and "psycopg" not in names
