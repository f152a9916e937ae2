"""Runbook pages: one per registered detector, served where alerts' runbook_url points."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetwatch.collector.runbooks import runbook_page
from fleetwatch.detectors import default_detectors
from tests.collector.test_collector_app import get
from tests.collector.test_webhook_fidelity import start

DETECTOR_IDS = sorted(d.id for d in default_detectors())


@pytest.mark.parametrize("detector", DETECTOR_IDS)
def test_every_detector_has_a_runbook_page(detector: str) -> None:
    page = runbook_page(detector)
    assert page is not None, f"docs/runbooks/{detector}.md is missing"
    assert page.startswith(f"# {detector}: ")
    for section in ("## What fired", "## Evidence", "## First steps", "## Silencing while you work"):
        assert section in page, (detector, section)


@pytest.mark.parametrize("name", ["nope", "../README", "xid/../../x", "", "XID"])
def test_no_page_for_what_is_not_a_detector(name: str) -> None:
    assert runbook_page(name) is None


async def test_the_collector_serves_them_without_a_token(tmp_path: Path) -> None:
    app = await start(tmp_path, api_read_token="read-token-1", api_admin_token="admin-token-2")
    try:
        page = await get(f"http://127.0.0.1:{app.http_port}/runbooks/thermal")
    finally:
        await app.stop(grace_seconds=0.2)
    assert page.startswith("# thermal: ")
