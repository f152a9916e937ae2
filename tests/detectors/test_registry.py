"""The detector registry: explicit, importable without side effects, ids well formed."""

import re

import detectors
from detectors import DETECTORS, default_detectors, detector_ids
from detectors.engine import Tracker
from detectors.model import Window


def test_registry_lists_this_packages_detectors():
    assert detector_ids() == ["xid", "gpu_lost", "thermal", "node_silent"]
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
