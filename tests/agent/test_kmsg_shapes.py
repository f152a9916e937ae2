"""Every shape a kernel log comes in: journalctl's output modes with and without the host name,
syslog files (traditional, RFC 3339, RFC 5424), and user-space lines quoting the driver refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fleetwatch.agent.sources.kmsg import parse_line

# A real XID 94 (NVIDIA's example line, kern_gpu_ga100.c; see tests/fixtures/kmsg/SOURCES.md).
TEXT = "NVRM: Xid (PCI:0000:00:08): 94, pid='<unknown>', name=<unknown>, Contained: SM (0x1). RST: No, D-RST: No"
UTC = datetime(2025, 4, 1, 12, 0, 0, 250000, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("line", "t"),
    [
        # journalctl -k (short) with the host, and with --no-hostname
        (f"Apr 01 12:00:00 gpu-node-17 kernel: {TEXT}", None),
        (f"Apr 01 12:00:00 kernel: {TEXT}", None),
        # short-precise
        (f"Apr 01 12:00:00.250000 gpu-node-17 kernel: {TEXT}", None),
        (f"Apr 01 12:00:00.250000 kernel: {TEXT}", None),
        # short-iso(-precise), and rsyslog's RFC 3339 file format (Debian's default since 12)
        (f"2025-04-01T12:00:00.250000+00:00 gpu-node-17 kernel: {TEXT}", UTC),
        (f"2025-04-01T12:00:00.250000+0000 kernel: {TEXT}", UTC),
        # short-unix
        (f"{UTC:.6f} gpu-node-17 kernel: {TEXT}", UTC),
        (f"{UTC:.6f} kernel: {TEXT}", UTC),
        # short-full
        (f"Tue 2025-04-01 12:00:00.250000 UTC gpu-node-17 kernel: {TEXT}", UTC),
        (f"Tue 2025-04-01 12:00:00.250000 UTC kernel: {TEXT}", UTC),
        # RFC 5424 (kern.warning: priority 4)
        (f"<4>1 2025-04-01T12:00:00.250000+00:00 gpu-node-17 kernel - - - {TEXT}", UTC),
        (f'<4>1 2025-04-01T12:00:00.25Z gpu-node-17 kernel - - [meta sequenceId="7"] {TEXT}', UTC),
        # a traditional syslog file that kept printk's stamp
        (f"Apr  1 12:00:00 gpu-node-17 kernel: [82659.755847] {TEXT}", None),
    ],
)
def test_every_shape_gives_the_xid_and_its_board(line: str, t: float | None) -> None:
    found = parse_line(line, year=2025)
    assert found is not None, line
    assert (found.xid, found.pci_bus_id) == (94, "0000:00:08.0")
    assert found.message.startswith("Contained: SM")
    if t is not None:
        assert found.t == pytest.approx(t)
    else:
        assert found.t is not None  # local time: the line's wall clock, read in this machine's zone


def test_short_monotonic_gives_seconds_since_boot() -> None:
    found = parse_line(f"[   20.455718] gpu-node-17 kernel: {TEXT}", boot_time=1_700_000_000.0)
    assert found is not None and found.since_boot_seconds == pytest.approx(20.455718)
    assert found.t == pytest.approx(1_700_000_020.455718)


@pytest.mark.parametrize(
    "line",
    [
        # A health checker quoting the driver's line is not the driver saying it.
        f"Apr 01 12:00:00 gpu-node-17 gpud[1234]: {TEXT}",
        f"Apr 01 12:00:00 gpud[1234]: {TEXT}",
        f"Tue 2025-04-01 12:00:00 UTC gpu-node-17 gpud[1234]: {TEXT}",
        f"<30>1 2025-04-01T12:00:00Z gpu-node-17 gpud 1234 - - {TEXT}",
        f"[   20.455718] gpu-node-17 gpud[1234]: {TEXT}",
        # A kernel-facility claim from user space in RFC 5424 (priority 14: user.info).
        f"<14>1 2025-04-01T12:00:00Z gpu-node-17 kernel - - - {TEXT}",
    ],
)
def test_user_space_lines_quoting_the_driver_are_not_xids(line: str) -> None:
    assert parse_line(line, year=2025) is None
