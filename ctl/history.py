"""`fleetwatchctl history`: flag parsing, the series API's query, and its table, CSV and JSON output.

Nothing here talks HTTP: main.py fetches `series_path(...)` and hands the response to a `format_*`
function. Parsers raise ValueError with a message that names the flag; main.py turns it into a CtlError.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import urllib.parse
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO, TypeGuard

BLOCKS = "▁▂▃▄▅▆▇█"
FLAT_BLOCK = BLOCKS[3]  # a series whose cells all hold one value draws at mid height
DEFAULT_WIDTH = 48
DEFAULT_SINCE_SECONDS = 3600.0
# Without evidence.span an alert's history runs from this long before it started to this long after it ended.
ALERT_LEAD_SECONDS = 600.0
ALERT_TRAIL_SECONDS = 300.0

DURATION_EXAMPLES = "e.g. 30s, 5m, 1h"
TIME_EXAMPLES = "Unix seconds, or ISO 8601 like 2025-12-06T05:00:00Z"
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(_NUMBER)
_DURATION = re.compile(rf"(?:{_NUMBER}[smhd])+")
_DURATION_PART = re.compile(rf"({_NUMBER})([smhd])")
SOURCE_LABELS = {"raw": "raw samples", "rollup": "1-minute rollups"}

Point = tuple[float, float]


# -- flags -------------------------------------------------------------------------------------


def parse_duration(text: str, flag: str) -> float:
    """Seconds in `text`: plain seconds (90, 2.5) or with units s, m, h, d, combinable (1h30m)."""
    s = text.strip().lower()
    if _PLAIN_NUMBER.fullmatch(s):
        seconds = float(s)
    elif _DURATION.fullmatch(s):
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(s))
    else:
        raise ValueError(f"{flag}: {text!r} is not a duration ({DURATION_EXAMPLES})")
    if seconds <= 0:
        raise ValueError(f"{flag}: {text!r} is not longer than zero")
    return seconds


def parse_time(text: str, flag: str, now: float) -> float:
    """Unix seconds in `text`: a number, "now", or ISO 8601 / RFC 3339 (a time without an offset is UTC)."""
    s = text.strip()
    if s.lower() == "now":
        return now
    if _PLAIN_NUMBER.fullmatch(s):
        return float(s)
    try:
        moment = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a time ({TIME_EXAMPLES})") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_fields(values: Iterable[str] | None) -> list[str]:
    """--field values, each one name or a comma list, in order and without repeats."""
    fields: list[str] = []
    for value in values or ():
        for name in value.split(","):
            name = name.strip()
            if name and name not in fields:
                fields.append(name)
    return fields


def time_window(*, since: float | None, start: float | None, end: float | None, now: float) -> tuple[float, float]:
    """[start, end] from --since or --start and --end; --end defaults to now, --since to an hour before --end."""
    stop = now if end is None else end
    begin = stop - (DEFAULT_SINCE_SECONDS if since is None else since) if start is None else start
    if begin >= stop:
        raise ValueError(f"--start ({format_time(begin)}) must be before --end ({format_time(stop)})")
    return begin, stop


def alert_window(alert: dict[str, Any], now: float) -> tuple[float, float]:
    """The telemetry span worth looking at for an alert: its evidence's span, else around its start and end.

    An open end (a firing alert, or span.end null) is now; the range never runs past now, where there
    is no data, and an instant (start == end) widens to the usual margins around it.
    """
    evidence = alert.get("evidence")
    span = evidence.get("span") if isinstance(evidence, dict) else None
    if isinstance(span, dict) and isinstance(span.get("start"), int | float):
        start = float(span["start"])
        end = now if span.get("end") is None else float(span["end"])
    else:
        start = float(alert["starts_at"]) - ALERT_LEAD_SECONDS
        end = (now if alert.get("ends_at") is None else float(alert["ends_at"])) + ALERT_TRAIL_SECONDS
    end = min(end, now)
    if end <= start:
        start, end = start - ALERT_LEAD_SECONDS, start + ALERT_TRAIL_SECONDS
    return start, end


def _decimal(x: float) -> str:
    """A number for the query string: no exponent, at most millisecond precision, no trailing zeros."""
    return f"{x:.3f}".rstrip("0").rstrip(".")


def series_path(node: str, gpu: int | None, fields: Sequence[str], start: float, end: float, step: float | None) -> str:
    """The series API's path and query for one node's host series (gpu None) or one GPU's."""
    params: list[tuple[str, str]] = [("node", node)]
    if gpu is not None:
        params.append(("gpu", str(gpu)))
    params += [("field", f) for f in fields]
    params += [("start", _decimal(start)), ("end", _decimal(end))]
    if step is not None:
        params.append(("step", _decimal(step)))
    return "/api/v1/series?" + urllib.parse.urlencode(params)


# -- numbers, times and sparklines -------------------------------------------------------------


def format_number(x: float) -> str:
    """Compact: integers without decimals, others with up to 3 decimals (3 significant digits below 1)."""
    if not math.isfinite(x):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    if abs(x) >= 1:
        return f"{x:.3f}".rstrip("0").rstrip(".")
    return f"{x:.3g}"


def format_duration(seconds: float) -> str:
    """A span for people: 1h, 1h30m, 90s as 1m30s, 2d; fractions of a second are dropped."""
    rest = round(seconds)
    if rest <= 0:
        return f"{format_number(seconds)}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def format_time(t: float) -> str:
    """Unix seconds as "YYYY-MM-DD HH:MM:SS UTC"."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_range(start: float, end: float) -> str:
    """A time range in UTC, the end's date left out when it is the start's."""
    a, b = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)
    tail = b.strftime("%H:%M:%S") if a.date() == b.date() else b.strftime("%Y-%m-%d %H:%M:%S")
    return f"{a.strftime('%Y-%m-%d %H:%M:%S')} to {tail} UTC"


def iso_time(t: float) -> str:
    """Unix seconds as ISO 8601 UTC with a Z: whole seconds, or milliseconds when t has a fraction."""
    spec = "seconds" if t == int(t) else "milliseconds"
    return datetime.fromtimestamp(t, UTC).isoformat(timespec=spec).replace("+00:00", "Z")


def sparkline(points: Iterable[Point], start: float, end: float, width: int = DEFAULT_WIDTH, cover: float = 0.0) -> str:
    """`width` cells over [start, end], each the mean of the points in it, drawn in 8 levels.

    The levels scale between the lowest and the highest cell mean; when they are equal every cell
    with data draws FLAT_BLOCK. A cell with no points is a space. A point stands for [t, t + cover)
    (a bucket's mean for its whole step, a sample until the next one) and counts in every cell that
    overlaps that; points before start or after end count in the first or last cell.
    """
    if width < 1:
        raise ValueError(f"a sparkline needs at least one cell, not {width}")
    sums = [0.0] * width
    counts = [0] * width
    span = end - start

    def cell(t: float) -> int:
        i = int((t - start) / span * width) if span > 0 else 0
        return min(max(i, 0), width - 1)

    for t, value in points:
        first = last = cell(t)
        if cover > 0 and span > 0:
            # The last cell that [t, t + cover) reaches into: one that starts at t + cover is not.
            last = min(max(math.ceil((t + cover - start) / span * width) - 1, first), width - 1)
        for i in range(first, last + 1):
            sums[i] += value
            counts[i] += 1
    means = [s / c if c else None for s, c in zip(sums, counts)]
    present = [m for m in means if m is not None]
    if not present:
        return " " * width
    lo, hi = min(present), max(present)
    out = []
    for m in means:
        if m is None:
            out.append(" ")
        elif hi == lo:
            out.append(FLAT_BLOCK)
        else:
            out.append(BLOCKS[min(7, max(0, round((m - lo) / (hi - lo) * 7)))])
    return "".join(out)


# -- the series API's response -----------------------------------------------------------------


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def series_points(series: dict[str, Any]) -> list[Point]:
    """A series' [t, value] points with a number for a value, oldest first."""
    return [
        (float(p[0]), float(p[1]))
        for p in series.get("points") or ()
        if isinstance(p, list | tuple) and len(p) >= 2 and _finite(p[0]) and _finite(p[1])
    ]


def _extremes(series: dict[str, Any], points: list[Point]) -> tuple[float, float]:
    """The lowest and highest value: from the buckets' "min" and "max" arrays when the series has them."""
    values = [v for _, v in points]
    lows = [float(v) for v in series.get("min") or () if _finite(v)]
    highs = [float(v) for v in series.get("max") or () if _finite(v)]
    return min(lows or values), max(highs or values)


def _cover(step: float | None, points: list[Point]) -> float:
    """How long one point stands for: the step, else the usual gap between raw samples."""
    if step:
        return step
    if len(points) < 2:
        return 0.0
    return statistics.median(b[0] - a[0] for a, b in zip(points, points[1:]))


def _all_series(response: dict[str, Any], fields: Sequence[str]) -> list[dict[str, Any]]:
    """The response's series in its order, then an empty one for each asked-for field it left out."""
    series = [s for s in response.get("series") or () if isinstance(s, dict) and "field" in s]
    answered = {s["field"] for s in series}
    return series + [{"field": f, "points": []} for f in fields if f not in answered]


def history_header(response: dict[str, Any], start: float, end: float, total_points: int) -> str:
    gpu = response.get("gpu")
    where = f"{response.get('node')} {'host' if gpu is None else f'gpu {gpu}'}"
    source = response.get("source")
    how = SOURCE_LABELS.get(str(source), str(source or "unknown source"))
    step = response.get("step")
    if _finite(step):
        how += f", {format_number(step)} s steps"
    count = f"{total_points} point{'' if total_points == 1 else 's'}"
    return f"{where}: {format_range(start, end)} ({format_duration(end - start)}), {how}, {count}"


def _axis(start: float, end: float, width: int) -> str:
    """The range's first and last time of day, at the sparkline's two ends (left out when it is too narrow)."""
    fmt = "%H:%M:%S" if end - start < 86400 else "%m-%d %H:%M"
    left = datetime.fromtimestamp(start, UTC).strftime(fmt)
    right = datetime.fromtimestamp(end, UTC).strftime(fmt)
    if len(left) + len(right) + 1 > width:
        return ""
    return left + right.rjust(width - len(left))


def format_history_table(
    response: dict[str, Any],
    out: TextIO,
    *,
    fields: Sequence[str] = (),
    width: int = DEFAULT_WIDTH,
    window: tuple[float, float] | None = None,
) -> None:
    """A header line, then per field its min, max, last value and a sparkline over the time range.

    The range is the response's start and end; `window` (what was asked for) stands in for either if missing.
    `fields` asked for but not in the response get a "no data" row.
    """
    asked = window or (math.nan, math.nan)
    start = float(response["start"]) if _finite(response.get("start")) else asked[0]
    end = float(response["end"]) if _finite(response.get("end")) else asked[1]
    if not (math.isfinite(start) and math.isfinite(end)):
        raise ValueError("the series response has no start and end, and no window was given")
    step = float(response["step"]) if _finite(response.get("step")) else None
    series = _all_series(response, fields)
    rows: list[tuple[str, str, str, str, str]] = []
    total = 0
    for s in series:
        points = series_points(s)
        total += len(points)
        if not points:
            rows.append((str(s["field"]), "-", "-", "-", "no data"))
            continue
        low, high = _extremes(s, points)
        line = sparkline(points, start, end, width, cover=_cover(step, points))
        rows.append((str(s["field"]), format_number(low), format_number(high), format_number(points[-1][1]), line))
    print(history_header(response, start, end, total), file=out)
    if not rows:
        print("no data in this range", file=out)
        return
    heads = ("FIELD", "MIN", "MAX", "LAST")
    widths = [max(len(heads[i]), *(len(r[i]) for r in rows)) for i in range(4)]

    def row_text(cells: Sequence[str], tail: str) -> str:
        text = f"{cells[0]:<{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:]))
        return f"{text}  {tail}".rstrip()

    print(row_text(heads, _axis(start, end, width)), file=out)
    for row in rows:
        print(row_text(row[:4], row[4]), file=out)


def _csv_number(x: float) -> str:
    return str(int(x)) if x == int(x) and abs(x) < 1e15 else repr(x)


def format_history_csv(response: dict[str, Any], out: TextIO, *, fields: Sequence[str] = ()) -> None:
    """time (ISO 8601 UTC), t (Unix seconds), then a column a field; a row per distinct time across the series."""
    series = _all_series(response, fields)
    names = [str(s["field"]) for s in series]
    table: dict[float, list[str]] = {}
    for column, s in enumerate(series):
        for t, value in series_points(s):
            table.setdefault(t, [""] * len(series))[column] = _csv_number(value)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["time", "t", *names])
    for t in sorted(table):
        writer.writerow([iso_time(t), _csv_number(t), *table[t]])


def format_history_json(response: dict[str, Any], out: TextIO) -> None:
    """The API's response as it came, as one JSON object on one line."""
    print(json.dumps(response), file=out)
