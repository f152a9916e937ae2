"""The XID catalog: what each NVIDIA XID code means, how severe it is and what to do about it."""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from fleetwatch.records import ACTIONS, SEVERITIES

CATALOG_RESOURCE = "xid_catalog.csv"

# An XID the catalog does not list: worth a look by whoever runs the job, not a page in the
# night (see XID_CATALOG_SOURCE.md).
UNKNOWN_MEANING = "Unknown XID"
UNKNOWN_SEVERITY = "warning"
UNKNOWN_ACTION = "check_app"


@dataclass(frozen=True, slots=True)
class XidInfo:
    xid: int
    meaning: str
    severity: str  # one of fleetwatch.records.SEVERITIES
    action: str  # one of fleetwatch.records.ACTIONS
    fatal_by: tuple[str, ...]  # health checkers that treat this XID as fatal ("gpud", "azure")

    @property
    def known(self) -> bool:
        return self.meaning != UNKNOWN_MEANING


class XidCatalogError(ValueError):
    """The catalog file is malformed (bad number, unknown severity or action, duplicate XID)."""


def parse_catalog(text: str) -> dict[int, XidInfo]:
    """Parses catalog CSV text (header `xid,meaning,severity,action,seen_as_fatal_by`)."""
    reader = csv.DictReader(io.StringIO(text))
    expected = ["xid", "meaning", "severity", "action", "seen_as_fatal_by"]
    if reader.fieldnames != expected:
        raise XidCatalogError(f"catalog header {reader.fieldnames!r}, expected {expected!r}")
    catalog: dict[int, XidInfo] = {}
    for row in reader:
        where = f"catalog line {reader.line_num}"
        try:
            xid = int(row["xid"])
        except (TypeError, ValueError):
            raise XidCatalogError(f"{where}: xid {row['xid']!r} is not an integer") from None
        if xid in catalog:
            raise XidCatalogError(f"{where}: XID {xid} listed twice")
        severity, action = row["severity"], row["action"]
        if severity not in SEVERITIES:
            raise XidCatalogError(f"{where}: severity {severity!r} not in {SEVERITIES}")
        if action not in ACTIONS:
            raise XidCatalogError(f"{where}: action {action!r} not in {ACTIONS}")
        fatal_by = tuple(s.strip() for s in (row["seen_as_fatal_by"] or "").split(";") if s.strip())
        catalog[xid] = XidInfo(xid, row["meaning"].strip(), severity, action, fatal_by)
    return catalog


@functools.cache
def load_catalog() -> Mapping[int, XidInfo]:
    """The packaged catalog (base/xid_catalog.csv, installed in the fleetwatch package), read once."""
    text = resources.files("fleetwatch").joinpath(CATALOG_RESOURCE).read_text(encoding="utf-8")
    return parse_catalog(text)


def unknown_xid(xid: int) -> XidInfo:
    """The documented default for an XID the catalog does not list."""
    return XidInfo(xid, UNKNOWN_MEANING, UNKNOWN_SEVERITY, UNKNOWN_ACTION, ())


def lookup(xid: int) -> XidInfo:
    """The catalog entry for `xid`, or the unknown-XID default."""
    info = load_catalog().get(xid)
    return info if info is not None else unknown_xid(xid)
