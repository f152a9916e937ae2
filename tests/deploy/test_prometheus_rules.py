"""The shipped Prometheus rules: valid, unit-tested with promtool, and firing in a real Prometheus.

Every alerting rule under deploy/prometheus/ must be exercised by a promtool test
(tests/deploy/prometheus/*.test.yml); a real Prometheus scraping a simulated agent fires the XID
rule on the agent's first XID.
"""

from __future__ import annotations

import csv
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.e2e_support import start_simulated_agent
from tests.services import binary, free_port, http_json, prometheus

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "deploy" / "prometheus").glob("*rules.yml"))
RULE_TESTS = sorted((Path(__file__).parent / "prometheus").glob("*.test.yml"))
SCRAPE_SECONDS = 1


def alert_names(path: Path) -> set[str]:
    return {rule["alert"] for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]}


@pytest.mark.parametrize("rules", RULES, ids=lambda p: p.name)
def test_promtool_checks_the_shipped_rules(rules: Path) -> None:
    result = subprocess.run([binary("promtool"), "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("tests", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(tests: Path) -> None:
    result = subprocess.run(
        [binary("promtool"), "test", "rules", tests.name], cwd=tests.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_shipped_alert_has_a_promtool_test() -> None:
    shipped = set().union(*(alert_names(path) for path in RULES))
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]  # a test that expects it to fire, not only to stay quiet
    }
    assert shipped - tested == set()


def test_fatal_xid_rule_follows_the_xid_catalog() -> None:
    with (ROOT / "base" / "xid_catalog.csv").open() as f:
        critical = {int(row["xid"]) for row in csv.DictReader(f) if row["severity"] == "critical"}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "gpu-rules.yml").read_text())
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"] if r["alert"] == "FleetwatchGpuFatalXid"]
    match = re.search(r'xid=~"([0-9|]+)"', expr)
    assert match is not None
    assert {int(x) for x in match.group(1).split("|")} == critical


def test_real_prometheus_fires_the_xid_rule_on_an_agents_first_xid(tmp_path: Path) -> None:
    metrics_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
                "rule_files": [str(ROOT / "deploy" / "prometheus" / "gpu-rules.yml")],
                "scrape_configs": [
                    {"job_name": "fleetwatch-agent", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
                ],
            }
        )
    )
    # XID 79 on GPU 1, 8 s after the agent starts: Prometheus has scraped the total at 0 by then.
    # nothing listens on the collector port: the agent spools and keeps serving /metrics
    agent = start_simulated_agent(
        tmp_path / "agent", "n01", free_port(), metrics_port, "--sim-gpus", "2", "--sim-faults", "xid:79@1+8"
    )
    try:
        with prometheus(config, tmp_path) as url:

            def query(expr: str) -> list[dict]:
                return http_json(f"{url}/api/v1/query?query={expr}")["data"]["result"]

            def xid_alerts() -> list[dict]:
                alerts = http_json(f"{url}/api/v1/alerts")["data"]["alerts"]
                return [a for a in alerts if a["labels"]["alertname"] == "FleetwatchGpuXid"]

            deadline = time.monotonic() + 60
            before_xid = None
            while time.monotonic() < deadline and not [a for a in xid_alerts() if a["state"] == "firing"]:
                if before_xid is None:
                    found = query('fleetwatch_gpu_xids_total{gpu="1"}')
                    if found and found[0]["value"][1] == "0":
                        before_xid = found
                time.sleep(0.5)
            firing = [a for a in xid_alerts() if a["state"] == "firing"]
            assert before_xid, "Prometheus never saw GPU 1's XID total at 0 before the XID"
            assert len(firing) == 1, (xid_alerts(), (tmp_path / "agent" / "agent.log").read_text()[-2000:])
            assert firing[0]["labels"]["node"] == "n01" and firing[0]["labels"]["gpu"] == "1"
            fatal = [a for a in http_json(f"{url}/api/v1/alerts")["data"]["alerts"] if a["labels"].get("xid") == "79"]
            assert fatal and fatal[0]["labels"]["alertname"] == "FleetwatchGpuFatalXid"
    finally:
        agent.terminate()
        agent.wait(timeout=10)


# promtool's complaints about the names copied from dcgm-exporter, kept as they are on purpose:
# dashboards and rules written for dcgm-exporter query exactly these.
KNOWN_DCGM_COMPLAINTS = {
    "label names should be written in 'snake_case' not 'camelCase'",  # UUID, modelName, Hostname
    "metric name should not include type 'counter'",  # DCGM_FI_DEV_PCIE_REPLAY_COUNTER
}


def promtool_complaints(exposition: str) -> list[tuple[str, str]]:
    result = subprocess.run(
        [binary("promtool"), "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return [tuple(line.split(" ", 1)) for line in lines]  # type: ignore[misc]


def test_promtool_check_metrics_finds_nothing_in_fleetwatchs_own_names() -> None:
    # The agent's whole output with --dcgm-names (the golden file of tests/agent/test_metrics.py).
    exposition = (ROOT / "tests" / "fixtures" / "metrics" / "agent-sim.prom").read_text()
    complaints = promtool_complaints(exposition)
    assert [c for c in complaints if not c[0].startswith("DCGM_")] == []
    assert {why for _, why in complaints} <= KNOWN_DCGM_COMPLAINTS


async def test_promtool_check_metrics_finds_nothing_in_the_collectors_metrics(tmp_path: Path) -> None:
    from tests.collector.test_collector_app import exchange, get
    from tests.collector.test_webhook_fidelity import start, xid_batch
    from tests.e2e.test_alertmanager import hello

    app = await start(
        tmp_path, alertmanager_urls=[f"http://127.0.0.1:{free_port()}"], webhook_urls=["http://127.0.0.1:9/h"]
    )
    try:
        await exchange(app.grpc_port, [hello("n01"), xid_batch("n01", 1, [(0, 48)])], expect=2)
        text = await get(f"http://127.0.0.1:{app.http_port}/metrics")
    finally:
        await app.stop(grace_seconds=0.2)
    assert "fleetwatch_alert_firing{" in text or "fleetwatch_alert_firing " in text
    assert promtool_complaints(text) == []
