"""Which board a finding is about: a node's GPUs by index, UUID, PCI bus id, serial and model.

An operator acting on an XID needs the board, not just an index: the PCI bus id to find it in the
chassis, the serial number for the RMA. Live, the collector knows every GPU from the agents'
Hellos (NVML); offline, `fleetwatchctl detect --inventory FILE` reads what `nvidia-smi` prints:

- ``nvidia-smi --query-gpu=index,uuid,pci.bus_id,serial,name --format=csv`` (any order and any
  other columns with the header; without it, ``noheader``, the columns are told apart by what
  they hold);
- ``nvidia-smi -q`` (one "GPU <bus id>" section a board, in index order);
- JSON: a list of objects (or ``{"gpus": [...]}``) with ``index``/``gpu``, ``uuid``,
  ``pci_bus_id``, ``serial`` and ``name``/``model``, as the collector's inventory prints them.

A kernel log itself names the UUID of each bus id it mentions ("NVRM: GPU at PCI:0000:c1:00:
GPU-..."), which `boards_from_kernel_log` reads.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from fleetwatch.records import Finding

# What nvidia-smi prints for a value it has not got.
_NOT_AVAILABLE = frozenset({"", "n/a", "[n/a]", "not available", "[not supported]", "not supported", "unknown"})
_UUID_RE = re.compile(r"^(?:GPU|MIG)-[0-9a-fA-F-]{8,}$")
_BUS_RE = re.compile(r"^(?:PCI:)?(?:[0-9a-fA-F]{1,8}:)?[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}(?:\.[0-7])?$")
# "NVRM: GPU at PCI:0000:c1:00: GPU-2086cea6-..." (the driver's line when it takes a board).
_KERNEL_GPU_AT_RE = re.compile(
    r"NVRM: GPU at (?:PCI:)?(?P<bus>(?:[0-9a-fA-F]{1,8}:)?[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}(?:\.[0-7])?): "
    r"(?P<uuid>GPU-[0-9a-fA-F-]{8,})"
)


class InventoryError(ValueError):
    """An inventory file that cannot be read as any of the shapes above."""


def normalize_pci_bus_id(bus_id: str) -> str:
    """A PCI bus id as the driver, NVML or a person writes it ("PCI:0000:9B:00", NVML's
    "00000000:9b:00.0", "9b:00.0") in one spelling: "0000:9b:00.0". ValueError if it is none."""
    text = bus_id.strip().lower()
    if text.startswith("pci:"):
        text = text[4:]
    parts = text.split(":")
    if len(parts) == 2:
        parts.insert(0, "0")
    if len(parts) != 3:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    domain, bus, device_function = parts
    device, _, function = device_function.partition(".")
    try:
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function or '0', 16):x}"
    except ValueError:
        raise ValueError(f"not a PCI bus id: {bus_id!r}") from None


@dataclass(frozen=True, slots=True)
class Board:
    """One GPU as the inventory knows it; None where unknown."""

    index: int | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None  # normalized: "0000:9b:00.0"
    serial: str | None = None
    model: str | None = None

    def merged(self, other: Board) -> Board:
        """This board with the fields it lacks taken from `other`."""
        return Board(
            index=self.index if self.index is not None else other.index,
            uuid=self.uuid or other.uuid,
            pci_bus_id=self.pci_bus_id or other.pci_bus_id,
            serial=self.serial or other.serial,
            model=self.model or other.model,
        )


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in _NOT_AVAILABLE else text


def _bus(value: Any) -> str | None:
    text = _clean(value)
    if text is None:
        return None
    try:
        return normalize_pci_bus_id(text)
    except ValueError:
        return None


def _index(value: Any) -> int | None:
    text = _clean(value)
    if text is None:
        return None
    try:
        index = int(text)
    except ValueError:
        return None
    return index if index >= 0 else None


def make_board(
    *, index: Any = None, uuid: Any = None, pci_bus_id: Any = None, serial: Any = None, model: Any = None
) -> Board:
    """A Board from loosely typed values (file fields, API JSON), each cleaned or dropped."""
    return Board(_index(index), _clean(uuid), _bus(pci_bus_id), _clean(serial), _clean(model))


class Inventory:
    """A fleet's boards by node, found by index, UUID or PCI bus id."""

    def __init__(self, boards: Mapping[str, Iterable[Board]] | None = None) -> None:
        self._boards: dict[str, list[Board]] = {}
        for node, node_boards in (boards or {}).items():
            for board in node_boards:
                self.add(node, board)

    def add(self, node: str, board: Board) -> None:
        """Adds a board, merging it into one already known by the same index, UUID or bus id."""
        known = self._boards.setdefault(node, [])
        for i, other in enumerate(known):
            if _same(board, other):
                known[i] = other.merged(board)
                return
        known.append(board)

    def boards(self, node: str) -> list[Board]:
        return list(self._boards.get(node, []))

    def __bool__(self) -> bool:
        return any(self._boards.values())

    def find(
        self, node: str | None, *, index: int | None = None, uuid: str | None = None, pci_bus_id: str | None = None
    ) -> Board | None:
        """The board that matches any of the identities given, or None."""
        if node is None:
            return None
        bus = _bus(pci_bus_id)
        for board in self._boards.get(node, []):
            if (
                (uuid is not None and board.uuid == uuid)
                or (bus is not None and board.pci_bus_id == bus)
                or (index is not None and board.index == index)
            ):
                return board
        return None

    def bus_to_index(self, node: str) -> dict[str, int]:
        return {b.pci_bus_id: b.index for b in self._boards.get(node, []) if b.pci_bus_id and b.index is not None}

    def name_board(self, finding: Finding) -> Finding:
        """The finding with its board's index, UUID, bus id, serial and model filled in where the
        inventory knows them (what the finding already says stands)."""
        if finding.gpu is None and finding.uuid is None and finding.pci_bus_id is None:
            return finding  # a node's or a job's finding: no board
        board = self.find(finding.node, index=finding.gpu, uuid=finding.uuid, pci_bus_id=finding.pci_bus_id)
        if board is None:
            return finding
        return replace(
            finding,
            gpu=finding.gpu if finding.gpu is not None else board.index,
            uuid=finding.uuid or board.uuid,
            pci_bus_id=finding.pci_bus_id or board.pci_bus_id,
            serial=finding.serial or board.serial,
            model=finding.model or board.model,
        )


def _same(a: Board, b: Board) -> bool:
    """One board, by UUID or bus id; by index only when neither side's UUIDs or bus ids disagree."""
    if a.uuid is not None and a.uuid == b.uuid:
        return True
    if a.pci_bus_id is not None and a.pci_bus_id == b.pci_bus_id:
        return True
    conflicting = (a.uuid and b.uuid) or (a.pci_bus_id and b.pci_bus_id)
    return a.index is not None and a.index == b.index and not conflicting


# -- reading inventory files --------------------------------------------------------------------

# nvidia-smi --query-gpu column names (and their header spellings) -> Board fields.
_CSV_COLUMNS = {
    "index": "index",
    "uuid": "uuid",
    "gpu_uuid": "uuid",
    "pci.bus_id": "pci_bus_id",
    "gpu_bus_id": "pci_bus_id",
    "pci_bus_id": "pci_bus_id",
    "serial": "serial",
    "gpu_serial": "serial",
    "name": "model",
    "gpu_name": "model",
    "model": "model",
}


def parse_inventory(text: str) -> list[Board]:
    """The boards of one node from an inventory file's text (JSON, nvidia-smi -q or --query-gpu CSV)."""
    stripped = text.strip()
    if not stripped:
        raise InventoryError("the inventory is empty")
    if stripped[0] in "[{":
        return _from_json(stripped)
    if re.search(r"^GPU [0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.\d\s*$", text, re.M):
        return _from_query(text)
    return _from_csv(stripped)


def _from_json(text: str) -> list[Board]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"not valid JSON: {exc}") from None
    items = value.get("gpus") if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise InventoryError('JSON inventory must be a list of GPU objects, or {"gpus": [...]}')
    boards = [
        make_board(
            index=item.get("index", item.get("gpu")),
            uuid=item.get("uuid"),
            pci_bus_id=item.get("pci_bus_id"),
            serial=item.get("serial"),
            model=item.get("model", item.get("name")),
        )
        for item in items
    ]
    return _checked(boards)


def _from_query(text: str) -> list[Board]:
    """nvidia-smi -q: a "GPU 00000000:9B:00.0" line opens each board's section, in index order."""
    boards: list[Board] = []
    fields: dict[str, str] = {}
    bus: str | None = None

    def close() -> None:
        if bus is not None:
            boards.append(
                make_board(
                    index=len(boards),
                    uuid=fields.get("gpu uuid"),
                    pci_bus_id=bus,
                    serial=fields.get("serial number"),
                    model=fields.get("product name"),
                )
            )

    for line in text.splitlines():
        if match := re.match(r"^GPU (?P<bus>[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.\d)\s*$", line):
            close()
            bus, fields = match["bus"], {}
            continue
        # Top-level keys of a section are indented 4 spaces; nested ones (Chassis Serial Number
        # under Platform Info) more, and must not shadow them.
        if bus is not None and (match := re.match(r"^ {4}(?P<key>\S[^:]*?)\s*: (?P<value>.*)$", line)):
            fields.setdefault(match["key"].strip().lower(), match["value"].strip())
    close()
    return _checked(boards)


def _from_csv(text: str) -> list[Board]:
    rows = [row for row in csv.reader(io.StringIO(text), skipinitialspace=True) if any(cell.strip() for cell in row)]
    header = [re.sub(r"\s*\[.*\]$", "", cell.strip()).lower() for cell in rows[0]]
    if any(name in _CSV_COLUMNS for name in header):
        columns = {i: _CSV_COLUMNS[name] for i, name in enumerate(header) if name in _CSV_COLUMNS}
        body = rows[1:]
        boards = [
            make_board(**{field: row[i] for i, field in columns.items() if i < len(row)})
            for row in body
            if len(row) >= len(header) // 2
        ]
        return _checked(boards)
    return _checked([_guess_row(row) for row in rows])


def _guess_row(row: list[str]) -> Board:
    """A --format=csv,noheader row: each cell placed by what it looks like."""
    values: dict[str, str] = {}
    for cell in (c.strip() for c in row):
        if cell.lower() in _NOT_AVAILABLE:
            continue
        if _UUID_RE.match(cell) and "uuid" not in values:
            values["uuid"] = cell
        elif _BUS_RE.match(cell) and "pci_bus_id" not in values:
            values["pci_bus_id"] = cell
        elif cell.isdigit() and len(cell) <= 3 and "index" not in values:
            values["index"] = cell
        elif cell.isdigit() and "serial" not in values:
            values["serial"] = cell
        elif cell and "model" not in values and not cell.isdigit():
            values["model"] = cell
    return make_board(**values)


def _checked(boards: list[Board]) -> list[Board]:
    useful = [b for b in boards if b.uuid or b.pci_bus_id]
    if not useful:
        raise InventoryError(
            "no GPU with a UUID or PCI bus id found (expected nvidia-smi -q, "
            "nvidia-smi --query-gpu=index,uuid,pci.bus_id,serial,name --format=csv, or JSON)"
        )
    return useful


def boards_from_kernel_log(lines: Iterable[str]) -> list[Board]:
    """The bus id -> UUID pairs a kernel log states when the driver takes each board."""
    found: dict[str, Board] = {}
    for chunk in lines:
        for line in chunk.splitlines():
            if match := _KERNEL_GPU_AT_RE.search(line):
                bus = _bus(match["bus"])
                if bus is not None:
                    found[bus] = Board(uuid=match["uuid"], pci_bus_id=bus)
    return list(found.values())
