"""Dashboards against a real Prometheus: every query returns data from simulated agents with faults.

Grafana is not packaged here, so what is tested is what a dashboard asks of Prometheus: a
collector and two simulated H100 nodes (one with a thermal slowdown and an XID 79) report to it,
Prometheus scrapes all three every second, and every PromQL expression of
deploy/grafana/fleetwatch.json and of DCGM's dashboard 12239 (tests/fixtures/dashboards) must
return at least one series. Grafana's variables are replaced as "All" would: .* for the
selectors, 5m for $__range, 1m for $__rate_interval.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.e2e_support import Collector, start_simulated_agent, wait_for
from tests.services import free_port, http_json, prometheus

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "fleetwatch.json"
DCGM_12239 = ROOT / "tests" / "fixtures" / "dashboards" / "dcgm-exporter-12239.promql"
SYSFS = ROOT / "tests" / "fixtures" / "sys"
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$node": ".*", "$gpu": ".*", "$Hostname": ".*"}
# Enough scrapes for rate() over 1m windows and for the faults' alerts to open.
WARM_SECONDS = 12


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"variable {variable['name']}", variable["query"]["query"]))
    return queries


def dcgm_queries() -> list[tuple[str, str]]:
    lines = [line for line in DCGM_12239.read_text().splitlines() if line and not line.startswith("#")]
    return [(f"12239 query {i}", line) for i, line in enumerate(lines)]


def start_agent(tmp_path: Path, node: str, grpc_port: int, metrics_port: int, faults: str) -> subprocess.Popen:
    extra = ["--sim-gpus", "4", "--batch-interval-seconds", "1", "--sysfs-root", str(SYSFS), "--dcgm-names"]
    if faults:
        extra += ["--sim-faults", faults]
    return start_simulated_agent(tmp_path / node, node, grpc_port, metrics_port, *extra)


@pytest.fixture(scope="module")
def fleet_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_path = tmp_path_factory.mktemp("dashboards")
    grpc_port, http_port = free_port(), free_port()
    collector = Collector(tmp_path / "c.db", grpc_port, http_port, tmp_path / "collector.log")
    metrics_ports = [free_port(), free_port()]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "fleetwatch-collector", "static_configs": [{"targets": [f"127.0.0.1:{http_port}"]}]},
                    {
                        "job_name": "fleetwatch-agent",
                        "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in metrics_ports]}],
                    },
                ],
            }
        )
    )
    collector.start()
    agents = [
        start_agent(tmp_path, "n01", grpc_port, metrics_ports[0], "thermal_slowdown@1+2/600,xid:79@3+6"),
        start_agent(tmp_path, "n02", grpc_port, metrics_ports[1], ""),
    ]
    try:
        with prometheus(config, tmp_path) as url:
            wait_for(lambda: collector.agents_connected() == 2, 30, "both agents connected")
            time.sleep(WARM_SECONDS)
            yield url
    finally:
        for agent in agents:
            agent.terminate()
            agent.wait(timeout=10)
        collector.stop()


def returns_data(url: str, expr: str) -> list[Any]:
    label_values = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr)
    if label_values:
        selector, label = label_values.groups()
        query = urllib.parse.urlencode({"match[]": selector})
        return http_json(f"{url}/api/v1/label/{label}/values?{query}")["data"]
    query = urllib.parse.urlencode({"query": expr})
    return http_json(f"{url}/api/v1/query?{query}")["data"]["result"]


def test_every_fleetwatch_dashboard_query_returns_data(fleet_prometheus: str) -> None:
    empty = [
        (title, expr) for title, expr in dashboard_queries() if not returns_data(fleet_prometheus, substitute(expr))
    ]
    assert empty == []


def test_every_query_of_dcgm_dashboard_12239_returns_data(fleet_prometheus: str) -> None:
    empty = [(title, expr) for title, expr in dcgm_queries() if not returns_data(fleet_prometheus, substitute(expr))]
    assert empty == []


def test_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
    titles = {panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"}
    assert titles == {"Fleet", "One GPU ($node GPU $gpu)", "InfiniBand"}


def test_dcgm_profiling_nvlink_and_xid_series_answer_as_dcgm_exporter_does(fleet_prometheus: str) -> None:
    # What other dcgm-exporter dashboards (the Helm chart's copy among them) plot beyond 12239.
    for expr in (
        'sum by (Hostname, gpu) (DCGM_FI_PROF_NVLINK_TX_BYTES{Hostname=~".*"})',
        'sum by (Hostname, gpu) (DCGM_FI_PROF_NVLINK_RX_BYTES{Hostname=~".*"})',
        "avg by (Hostname) (DCGM_FI_PROF_SM_ACTIVE)",
        "avg by (Hostname) (DCGM_FI_PROF_DRAM_ACTIVE)",
        "sum by (Hostname) (DCGM_FI_PROF_PCIE_TX_BYTES)",
    ):
        assert returns_data(fleet_prometheus, expr), expr
    # XID errors: there for every GPU before any XID; n01's GPU 3 shows its XID 79 with DCGM's labels.
    xids = returns_data(fleet_prometheus, "DCGM_FI_DEV_XID_ERRORS")
    by_gpu = {(s["metric"]["Hostname"], s["metric"]["gpu"]): s for s in xids}
    assert by_gpu[("n02", "0")]["value"][1] == "0" and by_gpu[("n02", "0")]["metric"]["err_code"] == "0"
    lost = by_gpu[("n01", "3")]  # fell off the bus: no samples, but its XID series stays
    assert lost["value"][1] == "79"
    assert lost["metric"]["err_code"] == "79" and lost["metric"]["err_msg"] == "GPU has fallen off the bus"
    assert all(s["metric"]["DCGM_FI_DRIVER_VERSION"] for s in xids)
