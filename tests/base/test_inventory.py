"""Naming the board: inventories as nvidia-smi prints them, and findings filled from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetwatch.inventory import (
    Board,
    Inventory,
    InventoryError,
    boards_from_kernel_log,
    make_board,
    normalize_pci_bus_id,
    parse_inventory,
)
from fleetwatch.records import Finding

NVIDIA_SMI = Path(__file__).parents[1] / "fixtures" / "nvidia-smi"
H100 = NVIDIA_SMI / "linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt"


def _section(path: Path, command: str) -> str:
    """The output of one command in an nvidia_gpu_exporter capture (between its header and the next)."""
    text = path.read_text()
    start = text.index(f"# $ {command}\n")
    body = text[text.index("#" * 80 + "\n", start) + 81 :]
    return body[: body.find("#" * 80)]


def test_nvidia_smi_q_of_a_real_h100() -> None:
    (board,) = parse_inventory(_section(H100, "nvidia-smi -q"))
    assert board == Board(
        index=0,
        uuid="GPU-00000000-0000-0000-0000-000000000000",  # masked in the capture
        pci_bus_id="0000:00:09.0",
        serial="0000000000000",
        model="NVIDIA H100 80GB HBM3",
    )


def test_query_gpu_csv_of_a_real_h100_with_its_many_columns() -> None:
    text = _section(H100, "nvidia-smi --query-gpu=" + _query_columns())
    (board,) = parse_inventory(text)
    # That query asks for no index column: the board is known by UUID and bus id.
    assert (board.uuid, board.pci_bus_id, board.serial, board.model) == (
        "GPU-00000000-0000-0000-0000-000000000000",
        "0000:00:09.0",
        "0000000000000",
        "NVIDIA H100 80GB HBM3",
    )


def _query_columns() -> str:
    text = H100.read_text()
    start = text.index("# $ nvidia-smi --query-gpu=") + len("# $ nvidia-smi --query-gpu=")
    return text[start : text.index("\n", start)]


def test_query_gpu_csv_with_and_without_header() -> None:
    with_header = (
        "index, uuid, pci.bus_id, serial, name\n"
        "0, GPU-2086cea6-1668-6969-eb8c-c4d96a0678a3, 00000000:18:00.0, 1654922012345, NVIDIA H100 80GB HBM3\n"
        "1, GPU-4e391288-897c-ba5d-6944-dfbea55ebcfa, 00000000:9B:00.0, [N/A], NVIDIA H100 80GB HBM3\n"
    )
    boards = parse_inventory(with_header)
    assert [(b.index, b.pci_bus_id, b.serial) for b in boards] == [
        (0, "0000:18:00.0", "1654922012345"),
        (1, "0000:9b:00.0", None),  # [N/A] is no serial
    ]
    no_header = "\n".join(with_header.splitlines()[1:])
    assert parse_inventory(no_header) == boards
    # Another column order, without a header: still told apart by what each holds.
    shuffled = "NVIDIA H100 80GB HBM3, 1654922012345, 00000000:18:00.0, GPU-2086cea6-1668-6969-eb8c-c4d96a0678a3, 0"
    assert parse_inventory(shuffled) == boards[:1]


def test_json_inventory_and_errors() -> None:
    items = [{"gpu": 3, "uuid": "GPU-1", "pci_bus_id": "PCI:0000:9B:00", "serial": "S3", "name": "H200"}]
    (board,) = parse_inventory(json.dumps({"gpus": items}))
    assert board == Board(3, "GPU-1", "0000:9b:00.0", "S3", "H200")
    with pytest.raises(InventoryError, match="JSON"):
        parse_inventory('{"gpus": 3}')
    with pytest.raises(InventoryError, match="no GPU with a UUID or PCI bus id"):
        parse_inventory("hello, world\n")
    with pytest.raises(InventoryError, match="empty"):
        parse_inventory("  \n")


def test_name_board_fills_what_the_finding_lacks_by_any_identity() -> None:
    inventory = Inventory(
        {"n1": [make_board(index=2, uuid="GPU-2", pci_bus_id="00000000:9B:00.0", serial="S2", model="H100")]}
    )
    by_bus = Finding("xid", "critical", "reboot", "XID 94", 1.0, node="n1", pci_bus_id="0000:9b:00.0", key="94")
    named = inventory.name_board(by_bus)
    assert (named.gpu, named.uuid, named.serial, named.model) == (2, "GPU-2", "S2", "H100")
    by_index = inventory.name_board(Finding("ecc", "critical", "reset_gpu", "DBE", 1.0, node="n1", gpu=2))
    assert (by_index.pci_bus_id, by_index.serial) == ("0000:9b:00.0", "S2")
    # Another node's board, or a node's own finding, is left as it was.
    other = Finding("xid", "critical", "reboot", "XID 94", 1.0, node="n2", gpu=2)
    assert inventory.name_board(other) == other
    silent = Finding("node_silent", "critical", "drain", "silent", 1.0, node="n1")
    assert inventory.name_board(silent) == silent


def test_boards_merge_by_bus_id_or_uuid_not_by_a_conflicting_index() -> None:
    inventory = Inventory()
    inventory.add("n1", make_board(uuid="GPU-A", pci_bus_id="0000:18:00"))  # from the kernel log
    inventory.add("n1", make_board(index=0, pci_bus_id="00000000:18:00.0", serial="S0"))  # nvidia-smi
    assert inventory.boards("n1") == [Board(0, "GPU-A", "0000:18:00.0", "S0", None)]
    inventory.add("n1", make_board(index=0, uuid="GPU-B", pci_bus_id="0000:19:00.0"))  # index clash
    assert len(inventory.boards("n1")) == 2


def test_kernel_log_names_each_bus_ids_uuid() -> None:
    lines = [
        "[   20.455718] NVRM: GPU at PCI:0000:08:00: GPU-2086cea6-1668-6969-eb8c-c4d96a0678a3",
        "Nov 29 11:28:11 zeus kernel: NVRM: GPU at PCI:0000:c1:00: GPU-<uuid redacted>",
    ]
    assert boards_from_kernel_log(lines) == [
        Board(uuid="GPU-2086cea6-1668-6969-eb8c-c4d96a0678a3", pci_bus_id="0000:08:00.0")
    ]


def test_normalize_pci_bus_id_spellings() -> None:
    assert normalize_pci_bus_id("PCI:0000:9B:00") == normalize_pci_bus_id("00000000:9b:00.0") == "0000:9b:00.0"
    with pytest.raises(ValueError):
        normalize_pci_bus_id("GPU-1")
