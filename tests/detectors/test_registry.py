"""The detector registry: explicit, importable without side effects, ids well formed."""

import re

from fleetwatch import detectors
from fleetwatch.detectors import DETECTORS, default_detectors, detector_ids
from fleetwatch.detectors.engine import Tracker
from fleetwatch.detectors.model import Window


def test_registry_lists_every_detector_module_of_the_package():
    import importlib
    import pkgutil

    found = set()
    for module in pkgutil.iter_modules(detectors.__path__):
        for value in vars(importlib.import_module(f"fleetwatch.detectors.{module.name}")).values():
            if (
                isinstance(value, type)
                and value.__module__.endswith(module.name)
                and hasattr(value, "detect")
                and isinstance(getattr(value, "id", None), str)
            ):
                found.add(value)
    assert found == set(DETECTORS), "a detector module is not registered in detectors/__init__.py"
    assert {
        "xid",
        "ecc",
        "row_remap",
        "retired_pages",
        "pcie",
        "nvlink",
        "thermal",
        "power",
        "clocks",
        "gpu_lost",
        "node_silent",
        "infiniband",
        "straggler.steps",
        "straggler.stage",
        "straggler.telemetry",
    } == set(detector_ids())
    assert [d.id for d in default_detectors()] == detector_ids()
    assert isinstance(DETECTORS, tuple)


def test_ids_are_unique_dotted_lower_case():
    ids = detector_ids()
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*", i) for i in ids)


def test_every_detector_runs_on_an_empty_window():
    window = Window(now=0.0, gpu={}, host={}, events=[], steps=[], nodes={}, watching_since=0.0)
    for detector in default_detectors():
        assert detector.window_seconds >= 0
        assert detector.detect(window) == []
    Tracker(default_detectors())


def test_default_instances_are_fresh_each_call():
    first, second = default_detectors(), default_detectors()
    assert all(a is not b for a, b in zip(first, second))
    assert detectors.__doc__


def test_readme_detector_table_is_the_registry():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("## Detectors") :]
    table = table[: table.index("\n## ", 3)]
    listed = re.findall(r"^\| `([a-z_.]+)` \|", table, flags=re.M)
    assert listed == detector_ids(), "README's detector table drifted from detectors/__init__.py"
