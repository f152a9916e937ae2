"""Suite-wide collection order: the end-to-end files first.

`make test` runs two pytest-xdist workers a file at a time (--dist loadfile), handing out files
in collection order. The end-to-end files (real collectors, agents, servers, a minute's receiver
outage) take up to 80 s each; collected last, as the tree orders them, they leave one worker
busy long after the other ran out of work. Started first, the many short files fill in around
them.
"""

from __future__ import annotations

import pytest

# The end-to-end files, the deploy files (real Prometheus, Chromium, kustomize) and the ingest fuzz
# (10,000 hostile messages, up to 2 minutes under load).
_FIRST = ("tests/e2e/", "tests/deploy/", "tests/collector/test_ingest_fuzz.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: 0 if item.nodeid.startswith(_FIRST) else 1)  # stable: file order kept within
