"""The import contract: every layer of `fleetwatch` imports only downward (README, Layout).

The check walks the source of every module, function-level imports included, so a late import
cannot hide a wrong arrow; the folders come from pyproject's package-dir, as packaging maps them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which layers each layer may import (itself included). "base" is every module of the namespace
# root (records, names, config, helpers, the step reporter); "wire" is the generated contract.
ALLOWED: dict[str, frozenset[str]] = {
    "wire": frozenset({"wire"}),
    "base": frozenset({"base", "wire"}),
    "detectors": frozenset({"detectors", "base"}),
    "agent": frozenset({"agent", "base", "wire"}),
    "collector": frozenset({"collector", "detectors", "base", "wire"}),
    "sim": frozenset({"sim", "agent", "collector", "detectors", "base", "wire"}),
    "ctl": frozenset({"ctl", "sim", "agent", "collector", "detectors", "base", "wire"}),
}

# The one documented upward arrow: `fleetwatch-agent --simulate` samples the fake NVML, imported
# inside the function that builds the NVML module, so the daemon never loads it otherwise.
EXCEPTIONS: frozenset[tuple[str, str]] = frozenset({("fleetwatch.agent.main", "fleetwatch.sim")})

SUBPACKAGE_LAYERS = {
    "fleetwatch.v1": "wire",
    "fleetwatch.agent": "agent",
    "fleetwatch.collector": "collector",
    "fleetwatch.detectors": "detectors",
    "fleetwatch.sim": "sim",
    "fleetwatch.ctl": "ctl",
}


def layer_of(module: str) -> str | None:
    """The layer a fleetwatch module belongs to; None outside the namespace."""
    if module != "fleetwatch" and not module.startswith("fleetwatch."):
        return None
    for package, layer in SUBPACKAGE_LAYERS.items():
        if module == package or module.startswith(package + "."):
            return layer
    return "base"


@dataclass(frozen=True)
class ImportArrow:
    importer: str
    imported: str
    line: int
    at_module_level: bool


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the namespace and its file, from pyproject's package-dir mapping."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    package_dirs: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    packages: list[str] = pyproject["tool"]["setuptools"]["packages"]
    files: dict[str, Path] = {}
    for package in packages:
        # The nearest mapped ancestor gives the folder (fleetwatch.agent.sources -> agent/sources).
        mapped = max((p for p in package_dirs if package == p or package.startswith(p + ".")), key=len)
        folder = root / package_dirs[mapped] / package[len(mapped) :].lstrip(".").replace(".", "/")
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            files[name] = path
    return files


def imports_of(module: str, path: Path) -> list[ImportArrow]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` and try/except blocks are still module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(child) for child in ast.walk(node))
    arrows = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names = [base]
        for name in names:
            arrows.append(ImportArrow(module, name, node.lineno, id(node) in top_level))
    return arrows


def violations(root: Path) -> list[str]:
    found = []
    for module, path in module_files(root).items():
        source_layer = layer_of(module)
        assert source_layer is not None
        for arrow in imports_of(module, path):
            target_layer = layer_of(arrow.imported)
            if target_layer is None or target_layer in ALLOWED[source_layer]:
                continue
            excepted = any(
                arrow.importer == importer and layer_of(arrow.imported) == layer_of(imported)
                for importer, imported in EXCEPTIONS
            )
            if excepted and not arrow.at_module_level:
                continue
            found.append(
                f"{path.relative_to(root)}:{arrow.line}: {source_layer} imports {target_layer} "
                f"({arrow.importer} -> {arrow.imported})"
            )
    return found


def test_every_layer_imports_only_downward():
    assert violations(ROOT) == []


def test_the_contract_sees_every_module_of_every_layer():
    layers = {layer_of(module) for module in module_files(ROOT)}
    assert layers == set(ALLOWED)
    assert "fleetwatch.agent.sources.nvml" in module_files(ROOT)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("relative", "source", "expected"),
    [
        ("agent/runner.py", "from fleetwatch.collector.store import Store\n", "agent imports collector"),
        ("collector/app.py", "def f():\n    import fleetwatch.agent.spool\n", "collector imports agent"),
        ("detectors/xid.py", "from fleetwatch.v1 import telemetry_pb2\n", "detectors imports wire"),
        ("base/records.py", "from .detectors import model\n", "base imports detectors"),
        ("agent/main.py", "from fleetwatch.sim.node import SimNode\n", "agent imports sim"),
    ],
)
def test_a_wrong_arrow_fails_the_contract(tmp_path, relative, source, expected):
    root = _tree(tmp_path, {relative: source})
    found = violations(root)
    assert len(found) == 1 and expected in found[0]


def test_the_simulator_import_is_allowed_only_late(tmp_path):
    late = "def nvml():\n    from fleetwatch.sim.node import SimNode\n    return SimNode\n"
    assert violations(_tree(tmp_path, {"agent/main.py": late})) == []


def _loaded_after_import(module: str) -> list[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.split()


def test_the_agent_daemon_loads_no_simulator_and_no_collector():
    loaded = _loaded_after_import("fleetwatch.agent.main")
    assert [m for m in loaded if m.startswith(("fleetwatch.sim", "fleetwatch.collector"))] == []
    assert "sqlalchemy" not in loaded


def test_the_collector_daemon_loads_no_agent_and_no_simulator():
    loaded = _loaded_after_import("fleetwatch.collector.main")
    assert [m for m in loaded if m.startswith(("fleetwatch.sim", "fleetwatch.agent"))] == []
    assert "pynvml" not in loaded


def test_the_step_reporter_needs_only_the_standard_library():
    # Whatever the interpreter loads on its own (site hooks, the editable-install finder) aside.
    loaded = set(_loaded_after_import("fleetwatch.stepreport")) - set(_loaded_after_import("sys"))
    third_party = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names) - {"fleetwatch"}
    assert third_party == set()
