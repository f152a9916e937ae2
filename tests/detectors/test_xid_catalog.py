"""The packaged XID catalog: loading, lookups, the unknown-XID default and malformed files."""

import pytest

from fleetwatch.records import ACTIONS, SEVERITIES
from fleetwatch.xid_catalog import (
    UNKNOWN_ACTION,
    UNKNOWN_MEANING,
    UNKNOWN_SEVERITY,
    XidCatalogError,
    XidInfo,
    load_catalog,
    lookup,
    parse_catalog,
)

HEADER = "xid,meaning,severity,action,seen_as_fatal_by\n"


def test_packaged_catalog_loads_every_row_with_valid_grades():
    catalog = load_catalog()
    assert len(catalog) == 34
    for xid, info in catalog.items():
        assert info.xid == xid
        assert info.meaning
        assert info.severity in SEVERITIES
        assert info.action in ACTIONS
        assert set(info.fatal_by) <= {"gpud", "azure"}


def test_xid_79_is_critical_reboot_and_fatal_for_both_sources():
    assert lookup(79) == XidInfo(79, "GPU has fallen off the bus", "critical", "reboot", ("gpud", "azure"))


def test_application_xid_is_a_warning_to_check_the_app_and_fatal_for_nobody():
    info = lookup(13)
    assert (info.severity, info.action, info.fatal_by) == ("warning", "check_app", ())
    assert info.known


def test_other_grades_come_from_the_file():
    assert (lookup(45).severity, lookup(45).action) == ("info", "none")
    assert (lookup(63).severity, lookup(63).action) == ("warning", "reset_gpu")
    assert (lookup(64).severity, lookup(64).action) == ("critical", "inspect_hardware")
    assert (lookup(92).severity, lookup(92).action) == ("warning", "inspect_hardware")
    assert lookup(94).meaning.startswith("Contained ECC error (the affected application")


def test_unknown_xid_gets_the_documented_default():
    info = lookup(9999)
    assert info == XidInfo(9999, UNKNOWN_MEANING, UNKNOWN_SEVERITY, UNKNOWN_ACTION, ())
    assert (info.meaning, info.severity, info.action) == ("Unknown XID", "warning", "check_app")
    assert not info.known


def test_parse_splits_fatal_by_and_strips_spaces():
    catalog = parse_catalog(HEADER + "48,Double-bit ECC error,critical,reboot, gpud ; azure \n")
    assert catalog[48].fatal_by == ("gpud", "azure")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("x,Bad,critical,reboot,\n", "line 2: xid 'x' is not an integer"),
        ("1,A,critical,reboot,\n1,B,warning,none,\n", "line 3: XID 1 listed twice"),
        ("1,A,fatal,reboot,\n", "severity 'fatal'"),
        ("1,A,critical,pray,\n", "action 'pray'"),
    ],
)
def test_malformed_rows_are_rejected_with_the_line(body, message):
    with pytest.raises(XidCatalogError, match=message.replace("(", r"\(")):
        parse_catalog(HEADER + body)


def test_wrong_header_is_rejected():
    with pytest.raises(XidCatalogError, match="header"):
        parse_catalog("code,meaning,severity,action\n79,x,critical,reboot\n")
