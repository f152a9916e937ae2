"""`fleetwatchctl history` and `alerts --id N [--history]` against a stand-in collector serving canned JSON.

The stand-in is a real HTTP server on loopback that records every path and query it is asked for, so the
tests see both sides: what fleetwatchctl asked the series API for, and what an operator reads.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fleetwatch.ctl.history import (
    BLOCKS,
    FLAT_BLOCK,
    alert_window,
    format_duration,
    format_number,
    parse_duration,
    parse_fields,
    parse_time,
    sparkline,
    time_window,
)
from fleetwatch.ctl.main import main

T0 = 1765000000.0  # 2025-12-06 05:46:40 UTC
SERIES_PATH = "/api/v1/series"


@dataclass
class FakeCollector:
    """Answers GET path (without its query) from `routes`: (status, JSON body); 404 for anything else."""

    url: str = ""
    routes: dict[str, tuple[int, Any]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def queries(self, path: str) -> list[dict[str, list[str]]]:
        """The parsed query strings of the requests for `path`, in order."""
        out = []
        for target in self.requests:
            parts = urllib.parse.urlsplit(target)
            if parts.path == path:
                out.append(urllib.parse.parse_qs(parts.query, keep_blank_values=True))
        return out


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    fake = FakeCollector()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake.requests.append(self.path)
            status, body = fake.routes.get(urllib.parse.urlsplit(self.path).path, (404, {"error": "no such route"}))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval: shutdown() waits for the loop to look, 0.5 s by default, in every test.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), name="fake-collector", daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLEETWATCH_TOKEN_FILE", "FLEETWATCH_CA_FILE", "FLEETWATCH_COLLECTOR_URL"):
        monkeypatch.delenv(name, raising=False)


def ctl(collector: FakeCollector, *args: str) -> int:
    return main(["--collector", collector.url, *args])


def clock_fall_response(gpu: int | None = 2) -> dict[str, Any]:
    """An hour of 1-minute rollups: the SM clock at 1980 MHz for 30 minutes, then throttled to 1200."""
    clock = [[T0 + 60 * i, 1980.0 if i < 30 else 1200.0] for i in range(60)]
    temp = [[T0 + 60 * i, 60.0 + i / 2] for i in range(60)]
    return {
        "node": "n01",
        "gpu": gpu,
        "start": T0,
        "end": T0 + 3600,
        "step": 60.0,
        "source": "rollup",
        "series": [
            {
                "field": "sm_clock_mhz",
                "points": clock,
                "min": [v - 15 if i == 45 else v for i, (_, v) in enumerate(clock)],
                "max": [v for _, v in clock],
            },
            {"field": "temperature_c", "points": temp},
            {"field": "xid_count", "points": []},
        ],
    }


def table_rows(out: str, width: int = 48) -> dict[str, list[str]]:
    """The table's rows by field name: [min, max, last, sparkline], or ["no data"]."""
    rows = {}
    for line in out.splitlines()[2:]:
        cells = line.split()
        if cells[1:] == ["-", "-", "-", "no", "data"]:
            rows[cells[0]] = ["no data"]
        else:
            rows[cells[0]] = [*cells[1:4], line[-width:]]
    return rows


# -- history: the table ------------------------------------------------------------------------


def test_history_table_shows_a_clock_fall_as_high_then_low_blocks(
    collector: FakeCollector, capsys: pytest.CaptureFixture[str]
) -> None:
    collector.routes[SERIES_PATH] = (200, clock_fall_response())
    assert ctl(collector, "history", "n01", "--gpu", "2", "--start", str(int(T0)), "--end", str(int(T0 + 3600))) == 0
    out = capsys.readouterr().out
    header, columns = out.splitlines()[:2]
    assert header == ("n01 gpu 2: 2025-12-06 05:46:40 to 06:46:40 UTC (1h), 1-minute rollups, 60 s steps, 120 points")
    assert columns.split()[:4] == ["FIELD", "MIN", "MAX", "LAST"]
    assert columns.endswith("05:46:40" + " " * 32 + "06:46:40")
    rows = table_rows(out)
    # MIN comes from the buckets' min array (one dipped to 1185), LAST is the newest mean.
    assert rows["sm_clock_mhz"][:3] == ["1185", "1980", "1200"]
    line = rows["sm_clock_mhz"][3]
    assert len(line) == 48 and set(line) <= set(BLOCKS)
    assert line[:24] == "█" * 24 and line[24:] == "▁" * 24
    assert rows["temperature_c"][:3] == ["60", "89.5", "89.5"]
    temp_line = rows["temperature_c"][3]
    assert temp_line[0] == "▁" and temp_line[-1] == "█"
    assert [BLOCKS.index(c) for c in temp_line] == sorted(BLOCKS.index(c) for c in temp_line)  # a steady rise
    assert rows["xid_count"] == ["no data"]


def test_history_sends_node_gpu_fields_range_and_step(collector: FakeCollector) -> None:
    collector.routes[SERIES_PATH] = (200, clock_fall_response())
    argv = ["history", "n01", "--gpu", "2", "--field", "sm_clock_mhz,temperature_c", "--field", "power_w"]
    assert ctl(collector, *argv, "--start", "2025-12-06T05:46:40Z", "--end", "1765003600.5", "--step", "5m") == 0
    (query,) = collector.queries(SERIES_PATH)
    assert query == {
        "node": ["n01"],
        "gpu": ["2"],
        "field": ["sm_clock_mhz", "temperature_c", "power_w"],
        "start": ["1765000000"],
        "end": ["1765003600.5"],
        "step": ["300"],
    }


@pytest.mark.parametrize(("since", "seconds"), [(None, 3600.0), ("15m", 900.0), ("90", 90.0), ("2d", 172800.0)])
def test_history_since_ends_now(collector: FakeCollector, since: str | None, seconds: float) -> None:
    collector.routes[SERIES_PATH] = (200, clock_fall_response(gpu=None))
    before = time.time()
    assert ctl(collector, "history", "n01", *(["--since", since] if since else [])) == 0
    after = time.time()
    (query,) = collector.queries(SERIES_PATH)
    assert set(query) == {"node", "start", "end"}  # no gpu: the host series; no field: all; no step: the server's
    start, end = float(query["start"][0]), float(query["end"][0])
    assert before - 0.001 <= end <= after + 0.001
    assert end - start == pytest.approx(seconds, abs=0.002)


def test_history_since_with_end_counts_back_from_end(collector: FakeCollector) -> None:
    collector.routes[SERIES_PATH] = (200, clock_fall_response())
    assert ctl(collector, "history", "n01", "--since", "1h30m", "--end", "2025-12-06T07:46:40+01:00") == 0
    (query,) = collector.queries(SERIES_PATH)
    assert (query["start"], query["end"]) == (["1764998200"], ["1765003600"])  # 06:46:40Z, 1h30m before


def test_history_host_series_raw_samples_header(collector: FakeCollector, capsys: pytest.CaptureFixture[str]) -> None:
    response = {
        "node": "n07",
        "gpu": None,
        "start": T0,
        "end": T0 + 600,
        "step": None,
        "source": "raw",
        "series": [{"field": "cpu_util_pct", "points": [[T0 + 10 * i, 12.5] for i in range(60)]}],
    }
    collector.routes[SERIES_PATH] = (200, response)
    assert ctl(collector, "history", "n07", "--since", "10m", "--width", "20") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "n07 host: 2025-12-06 05:46:40 to 05:56:40 UTC (10m), raw samples, 60 points"
    name, low, high, last, line = out[2].split()
    assert (name, low, high, last) == ("cpu_util_pct", "12.5", "12.5", "12.5")
    assert line == FLAT_BLOCK * 20  # flat: one level, every cell


def test_history_field_asked_for_but_not_answered_says_no_data(
    collector: FakeCollector, capsys: pytest.CaptureFixture[str]
) -> None:
    response = {**clock_fall_response(), "series": []}
    collector.routes[SERIES_PATH] = (200, response)
    assert ctl(collector, "history", "n01", "--gpu", "2", "--field", "power_w") == 0
    out = capsys.readouterr().out
    assert ", 0 points" in out.splitlines()[0]
    assert table_rows(out)["power_w"] == ["no data"]


def test_history_with_nothing_at_all(collector: FakeCollector, capsys: pytest.CaptureFixture[str]) -> None:
    collector.routes[SERIES_PATH] = (200, {**clock_fall_response(), "series": []})
    assert ctl(collector, "history", "n01") == 0
    assert capsys.readouterr().out.splitlines()[1] == "no data in this range"


# -- history: csv and json ---------------------------------------------------------------------


def test_history_csv_aligns_rows_by_time_with_empty_cells(
    collector: FakeCollector, capsys: pytest.CaptureFixture[str]
) -> None:
    response = {
        "node": "n01",
        "gpu": 0,
        "start": T0,
        "end": T0 + 60,
        "step": None,
        "source": "raw",
        "series": [
            {"field": "sm_clock_mhz", "points": [[T0, 1980.0], [T0 + 10, 1980.0], [T0 + 20, 1200.0]]},
            {"field": "power_w", "points": [[T0 + 10, 412.25], [T0 + 30.5, 398.0]]},
            {"field": "xid_count", "points": []},
        ],
    }
    collector.routes[SERIES_PATH] = (200, response)
    assert ctl(collector, "history", "n01", "--gpu", "0", "--format", "csv") == 0
    assert capsys.readouterr().out == (
        "time,t,sm_clock_mhz,power_w,xid_count\n"
        "2025-12-06T05:46:40Z,1765000000,1980,,\n"
        "2025-12-06T05:46:50Z,1765000010,1980,412.25,\n"
        "2025-12-06T05:47:00Z,1765000020,1200,,\n"
        "2025-12-06T05:47:10.500Z,1765000030.5,,398,\n"
    )


def test_history_json_is_the_response(collector: FakeCollector, capsys: pytest.CaptureFixture[str]) -> None:
    response = clock_fall_response()
    collector.routes[SERIES_PATH] = (200, response)
    assert ctl(collector, "history", "n01", "--gpu", "2", "--format", "json") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out) == response


# -- history: errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--step", "5x"], "--step: '5x' is not a duration (e.g. 30s, 5m, 1h)"),
        (["--since", "soon"], "--since: 'soon' is not a duration (e.g. 30s, 5m, 1h)"),
        (["--since", "0s"], "--since: '0s' is not longer than zero"),
        (["--start", "yesterday"], "--start: 'yesterday' is not a time (Unix seconds, or ISO 8601"),
        (["--end", "2025-13-01T00:00:00Z"], "--end: '2025-13-01T00:00:00Z' is not a time"),
        (
            ["--start", "1765003600", "--end", "1765000000"],
            "--start (2025-12-06 06:46:40 UTC) must be before --end (2025-12-06 05:46:40 UTC)",
        ),
        (["--width", "0"], "--width must be at least 1, got 0"),
        (["--gpu", "-1"], "--gpu must be 0 or more, got -1"),
    ],
)
def test_history_bad_flags_are_named_and_nothing_is_asked(
    collector: FakeCollector, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert ctl(collector, "history", "n01", *flags) == 1
    assert message in capsys.readouterr().err
    assert collector.requests == []


def test_history_since_and_start_together_is_a_usage_error(
    collector: FakeCollector, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ctl(collector, "history", "n01", "--since", "1h", "--start", "1765000000")
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("status", "error"), [(404, "unknown node 'n99'"), (400, "field: unknown field 'sm_clok_mhz'")]
)
def test_history_server_errors_are_shown(
    collector: FakeCollector, capsys: pytest.CaptureFixture[str], status: int, error: str
) -> None:
    collector.routes[SERIES_PATH] = (status, {"error": error})
    assert ctl(collector, "history", "n99", "--field", "sm_clok_mhz") == 1
    err = capsys.readouterr().err
    assert f"HTTP {status}: {error}" in err and err.startswith("fleetwatchctl: ")


def test_history_help_explains_the_flags() -> None:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as exit_info:
        main(["history", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(buffer.getvalue().split())
    for words in (
        "--since DURATION",
        "[default: 1h]",
        "--start TIME",
        "[default: now]",
        "[default: 48]",
        "[default: table]",
        "[default: the node's host series]",
    ):
        assert words in text


# -- alerts --id -------------------------------------------------------------------------------

ALERT = {
    "id": 7,
    "fingerprint": "f00d",
    "detector": "clock_throttle",
    "severity": "warning",
    "action": "drain",
    "node": "n01",
    "gpu": 2,
    "job": "llm-pretrain",
    "rank": 14,
    "key": "",
    "summary": "SM clock 1200 MHz, 39% below its 1980 MHz",
    "evidence": {"clock_mhz": 1200, "span": {"start": T0 + 600, "end": T0 + 2400}},
    "status": "resolved",
    "starts_at": T0 + 1800,
    "ends_at": T0 + 2100,
}


def test_alert_by_id_prints_its_row_and_evidence(collector: FakeCollector, capsys: pytest.CaptureFixture[str]) -> None:
    collector.routes["/api/v1/alerts/7"] = (200, ALERT)
    assert ctl(collector, "alerts", "--id", "7") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["STATUS", "SEVERITY"]
    assert out[1].split()[:6] == ["resolved", "warning", "clock_throttle", "n01", "2", "drain"]
    assert out[1].endswith(ALERT["summary"])
    assert out[2] == ("id 7, started 2025-12-06 06:16:40 UTC, ended 2025-12-06 06:21:40 UTC, job llm-pretrain rank 14")
    assert out[3] == "evidence:"
    assert json.loads("\n".join(out[4:])) == ALERT["evidence"]
    assert out[5] == '    "clock_mhz": 1200,'  # indented under its heading
    assert collector.requests == ["/api/v1/alerts/7"]


def test_alert_history_asks_for_the_evidence_span(collector: FakeCollector, capsys: pytest.CaptureFixture[str]) -> None:
    collector.routes["/api/v1/alerts/7"] = (200, ALERT)
    collector.routes[SERIES_PATH] = (200, clock_fall_response())
    assert ctl(collector, "alerts", "--id", "7", "--history", "--width", "24") == 0
    (query,) = collector.queries(SERIES_PATH)
    assert query == {"node": ["n01"], "gpu": ["2"], "start": ["1765000600"], "end": ["1765002400"]}
    out = capsys.readouterr().out
    assert "clock_throttle" in out and "evidence:" in out
    history = out[out.index("\n\nn01 gpu 2: ") + 2 :]
    rows = table_rows(history, width=24)
    assert rows["sm_clock_mhz"] == ["1185", "1980", "1200", "█" * 12 + "▁" * 12]


def test_alert_history_field_and_step_narrow_it(collector: FakeCollector) -> None:
    collector.routes["/api/v1/alerts/7"] = (200, ALERT)
    collector.routes[SERIES_PATH] = (200, clock_fall_response())
    assert ctl(collector, "alerts", "--id", "7", "--history", "--field", "sm_clock_mhz", "--step", "10s") == 0
    (query,) = collector.queries(SERIES_PATH)
    assert (query["field"], query["step"]) == (["sm_clock_mhz"], ["10"])


def test_alert_history_without_a_span_pads_its_start_and_end(collector: FakeCollector) -> None:
    alert = {**ALERT, "evidence": {"clock_mhz": 1200}}
    collector.routes["/api/v1/alerts/7"] = (200, alert)
    collector.routes[SERIES_PATH] = (200, clock_fall_response())
    assert ctl(collector, "alerts", "--id", "7", "--history") == 0
    (query,) = collector.queries(SERIES_PATH)
    assert (query["start"], query["end"]) == ([str(int(T0 + 1800 - 600))], [str(int(T0 + 2100 + 300))])


def test_firing_alert_history_runs_to_now(collector: FakeCollector) -> None:
    now = time.time()
    alert = {**ALERT, "status": "firing", "gpu": None, "starts_at": now - 120, "ends_at": None, "evidence": {}}
    collector.routes["/api/v1/alerts/7"] = (200, alert)
    collector.routes[SERIES_PATH] = (200, clock_fall_response(gpu=None))
    assert ctl(collector, "alerts", "--id", "7", "--history") == 0
    (query,) = collector.queries(SERIES_PATH)
    assert "gpu" not in query
    assert float(query["start"][0]) == pytest.approx(now - 720, abs=0.01)
    assert now <= float(query["end"][0]) <= time.time() + 0.001


def test_alert_json_with_history_is_two_json_lines(
    collector: FakeCollector, capsys: pytest.CaptureFixture[str]
) -> None:
    collector.routes["/api/v1/alerts/7"] = (200, ALERT)
    collector.routes[SERIES_PATH] = (200, clock_fall_response())
    assert ctl(collector, "alerts", "--id", "7", "--json") == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [ALERT]
    assert ctl(collector, "alerts", "--id", "7", "--json", "--history") == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [ALERT, clock_fall_response()]


def test_unknown_alert_is_a_clear_error(collector: FakeCollector, capsys: pytest.CaptureFixture[str]) -> None:
    collector.routes["/api/v1/alerts/99"] = (404, {"error": "no alert 99"})
    assert ctl(collector, "alerts", "--id", "99", "--history") == 1
    assert "/api/v1/alerts/99: HTTP 404: no alert 99" in capsys.readouterr().err
    assert collector.queries(SERIES_PATH) == []


def test_alert_without_a_node_has_no_history(collector: FakeCollector, capsys: pytest.CaptureFixture[str]) -> None:
    collector.routes["/api/v1/alerts/7"] = (200, {**ALERT, "node": None, "gpu": None})
    assert ctl(collector, "alerts", "--id", "7", "--history") == 1
    assert "alert 7 names no node" in capsys.readouterr().err


def test_history_flags_without_id_are_refused(collector: FakeCollector, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(collector, "alerts", "--history", "--field", "power_w") == 1
    assert "--history, --field need --id N" in capsys.readouterr().err
    assert collector.requests == []


def test_alerts_list_shows_each_alerts_times(collector: FakeCollector, capsys: pytest.CaptureFixture[str]) -> None:
    collector.routes["/api/v1/alerts"] = (200, {"alerts": [ALERT]})
    assert ctl(collector, "alerts") == 0
    out = capsys.readouterr().out.splitlines()
    assert collector.requests == ["/api/v1/alerts?status=firing&limit=200"]
    assert len(out) == 2
    assert out[1].startswith(
        "7      2025-12-06 06:16:40 2025-12-06 06:21:40 5m       resolved  warning   clock_throttle"
    )


# -- the parsers and the sparkline -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("45", 45.0),
        ("2.5", 2.5),
        ("1.5h", 5400.0),
        ("1h30m", 5400.0),
        (" 5M ", 300.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "--since") == seconds


@pytest.mark.parametrize("text", ["", "5x", "h", "-5m", "1e3", "inf", "nan", "5 m s", "1h30"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--step: .* is not a duration \(e\.g\. 30s, 5m, 1h\)$"):
        parse_duration(text, "--step")


def test_parse_duration_rejects_zero() -> None:
    with pytest.raises(ValueError, match="not longer than zero"):
        parse_duration("0m", "--step")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1765000000", 1765000000.0),
        ("1765000000.25", 1765000000.25),
        ("2025-12-06T05:46:40Z", 1765000000.0),
        ("2025-12-06T05:46:40+00:00", 1765000000.0),
        ("2025-12-06T06:46:40+01:00", 1765000000.0),
        ("2025-12-06T05:46:40", 1765000000.0),  # naive: UTC
        ("2025-12-06 05:46:40.5", 1765000000.5),
        ("2025-12-06", 1764979200.0),
        ("now", 42.0),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, "--start", now=42.0) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "12/06/2025", "2025-12-06T25:00:00Z", "-5"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--end: .* is not a time \(Unix seconds, or ISO 8601"):
        parse_time(text, "--end", now=0.0)


def test_parse_fields_splits_commas_and_drops_repeats() -> None:
    assert parse_fields(["a,b", " c ", "a", ",", "d,"]) == ["a", "b", "c", "d"]
    assert parse_fields(None) == []


def test_time_window() -> None:
    assert time_window(since=None, start=None, end=None, now=5000.0) == (1400.0, 5000.0)
    assert time_window(since=60.0, start=None, end=1000.0, now=5000.0) == (940.0, 1000.0)
    assert time_window(since=None, start=100.0, end=None, now=5000.0) == (100.0, 5000.0)
    with pytest.raises(ValueError, match="must be before --end"):
        time_window(since=None, start=6000.0, end=None, now=5000.0)


def test_alert_window() -> None:
    base = {"starts_at": 1000.0, "ends_at": 2000.0, "evidence": {}}
    assert alert_window(base, now=9000.0) == (400.0, 2300.0)
    assert alert_window({**base, "ends_at": None}, now=3000.0) == (400.0, 3000.0)
    assert alert_window({**base, "evidence": {"span": {"start": 900.0, "end": None}}}, now=3000.0) == (900.0, 3000.0)
    assert alert_window({**base, "evidence": {"span": {"start": 900.0, "end": 1500.0}}}, now=3000.0) == (900.0, 1500.0)
    assert alert_window({**base, "ends_at": 1000.0, "evidence": {"span": {"start": 1000.0, "end": 1000.0}}}, 9e3) == (
        400.0,
        1300.0,
    )


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (1980.0, "1980"),
        (0.0, "0"),
        (-3.0, "-3"),
        (71.25, "71.25"),
        (89.5, "89.5"),
        (1.23456, "1.235"),
        (0.5, "0.5"),
        (0.0012345, "0.00123"),
        (80e9, "80000000000"),
        (float("nan"), "nan"),
    ],
)
def test_format_number(x: float, text: str) -> None:
    assert format_number(x) == text


def test_format_duration() -> None:
    assert [format_duration(s) for s in (90, 900, 3600, 5400, 172800, 0.5)] == [
        "1m30s",
        "15m",
        "1h",
        "1h30m",
        "2d",
        "0.5s",
    ]


def test_sparkline_draws_a_fall_and_a_rise() -> None:
    fall = [(float(t), 1980.0 if t < 50 else 1200.0) for t in range(100)]
    assert sparkline(fall, 0.0, 100.0, 10) == "█████▁▁▁▁▁"
    rise = [(float(t), float(t)) for t in range(8)]
    assert sparkline(rise, 0.0, 8.0, 8) == BLOCKS


def test_sparkline_flat_series_is_one_level() -> None:
    assert sparkline([(float(t), 70.0) for t in range(100)], 0.0, 100.0, 12) == FLAT_BLOCK * 12


def test_sparkline_cells_without_points_are_spaces() -> None:
    points = [(0.0, 1.0), (1.0, 1.0), (8.0, 3.0), (9.0, 3.0)]
    assert sparkline(points, 0.0, 10.0, 10) == "▁▁      ██"
    assert sparkline([], 0.0, 10.0, 5) == " " * 5


def test_sparkline_means_cells_and_clamps_the_ends() -> None:
    # A point before start counts in the first cell (mean 5 there, below the second's 10) ...
    assert sparkline([(-5.0, 0.0), (1.0, 10.0), (6.0, 10.0), (7.0, 10.0)], 0.0, 10.0, 2) == "▁█"
    # ... and one after end in the last (mean 0 there, as in the first: flat).
    assert sparkline([(1.0, 0.0), (6.0, 10.0), (99.0, -10.0)], 0.0, 10.0, 2) == FLAT_BLOCK * 2


def test_sparkline_cover_spreads_a_point_over_its_step() -> None:
    # Points every 10 s over 40 cells of 2.5 s: alone they leave gaps, each covering its 10 s fills them.
    points = [(float(t), float(t)) for t in range(0, 100, 10)]
    assert " " in sparkline(points, 0.0, 100.0, 40)
    filled = sparkline(points, 0.0, 100.0, 40, cover=10.0)
    assert " " not in filled and filled[:4] == "▁▁▁▁" and filled[-4:] == "████"
    # A real gap (no sample from 30 s to 70 s) stays blank with the usual cover.
    gappy = [p for p in points if not 30 <= p[0] < 70]
    assert sparkline(gappy, 0.0, 100.0, 10, cover=10.0) == "▁▂▃    ▆▇█"


def test_sparkline_needs_a_cell() -> None:
    with pytest.raises(ValueError):
        sparkline([], 0.0, 1.0, 0)
