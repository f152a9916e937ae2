"""Compressed column blocks: a span of a node's samples (or their 1-minute rollups) as one zstd blob.

A block is a matrix: one row per sample time, one column per series field (all GPUs of a node in
one block, each GPU's fields its own columns), a presence bit per cell (a field a GPU does not
report is absent, never 0). The whole matrix is prepared with numpy so that zstd finds the
redundancy telemetry has, with no per-value Python:

- a column whose values are decimals of at most MAX_DECIMALS places (whole numbers, NVML's watts
  from milliwatts, joules from millijoules) is stored as scaled integers; any other as the integers
  of its IEEE-754 bit patterns (close for slowly changing values);
- every column, and the times (as bit patterns), as first differences down the rows, so a steady
  column is zeros and a counter its increments; absent cells repeat the value above, adding zeros;
- the bytes transposed into byte planes per column (Blosc's shuffle), so the zero high bytes of
  small differences sit together.

Column ids: a metric's id is its field number in telemetry.proto (stable by protobuf's rules)
times STATS plus a statistic code (RAW for samples; COUNT, MIN, MAX, MEAN, LAST for rollups), plus
SERIES_STRIDE times the series' slot in the block (a GPU index, an InfiniBand port's place in the
block's port list). Whole numbers round-trip exactly up to 2**53, beyond any real NVML counter.

Layout before compression (little-endian): magic b"FWB1", u32 rows, u32 columns, u32 text bytes;
u32 ids; i1 decimals per column (-1: bit patterns); the text (JSON: per-row strings such as a
GPU's uuid, job and rank, as runs); the presence bits (rows x columns, packed); the time planes;
the value planes, column by column.
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

# zstd level 3 is its default: most of the ratio of higher levels at a fraction of their CPU.
ZSTD_LEVEL = 3
# Batch bodies are compressed on the ingest path and wait only a minute for compaction: the fastest
# level (dense bodies shrink to about a third; zstd's benchmarks put level 1 at 500 MB/s a core).
BODY_ZSTD_LEVEL = 1
_ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_DECIMALS = 3  # NVML's finest unit is milli- (mW, mJ): three decimals of the canonical unit
MAGIC = b"FWB1"

STATS = 8  # statistic codes per field number
RAW, COUNT, MIN, MAX, MEAN, LAST = 0, 1, 2, 3, 4, 5
ROLLUP_STATS = (COUNT, MIN, MAX, MEAN, LAST)
SERIES_STRIDE = 4096  # > any field number (<= 511 by protobuf practice here) * STATS
ROLLUP_SECONDS = 60.0

_HEADER = struct.Struct("<4sIII")
# Integers a float64 holds exactly: a decimal scaled beyond this is stored by its bit pattern.
_EXACT_INTEGER = 2.0**53

# A zstd (de)compressor object must not be used by two threads at once: one of each per thread.
_codecs = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_codecs, "compressor"):
        _codecs.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return _codecs.compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_codecs, "decompressor"):
        _codecs.decompressor = zstandard.ZstdDecompressor()
    return _codecs.decompressor


def _body_compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_codecs, "body_compressor"):
        _codecs.body_compressor = zstandard.ZstdCompressor(level=BODY_ZSTD_LEVEL)
    return _codecs.body_compressor


def compress_body(body: bytes) -> bytes:
    """A batch's serialized message as the batches table keeps it until compaction: a zstd frame."""
    return _body_compressor().compress(body)


def body_message(stored: bytes) -> bytes:
    """The serialized message of a stored batch body: a zstd frame (since 0.2) or, as fleetwatch
    0.1.0 and the first 0.2 builds wrote it, the message itself (which never starts with the
    frame's magic: a Batch's first byte is a field tag, and no Batch field has tag 0x28)."""
    if stored[:4] == _ZSTD_FRAME_MAGIC:
        return _decompressor().decompress(stored)
    return stored


class ChunkError(ValueError):
    """A blob that is not a block this version can read."""


def column_id(field_number: int, stat: int = RAW, slot: int = 0) -> int:
    return slot * SERIES_STRIDE + field_number * STATS + stat


def split_column_id(cid: int) -> tuple[int, int, int]:
    """(slot, field number, stat) of a column id."""
    slot, rest = divmod(int(cid), SERIES_STRIDE)
    number, stat = divmod(rest, STATS)
    return slot, number, stat


@dataclass(slots=True)
class Block:
    """Rows at times `t` (ascending) x columns `ids`; `values` float64, `present` says which cells hold one."""

    t: np.ndarray  # (rows,) float64
    ids: np.ndarray  # (columns,) int64
    values: np.ndarray  # (rows, columns) float64; absent cells hold anything
    present: np.ndarray  # (rows, columns) bool
    text: dict[str, Any] = field(default_factory=dict)  # JSON-able per-block extras (uuids, port names)

    def __len__(self) -> int:
        return len(self.t)

    def column(self, cid: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(times, values) of the present cells of column `cid`, or None when the block lacks it."""
        where = np.flatnonzero(self.ids == cid)
        if not len(where):
            return None
        j = int(where[0])
        mask = self.present[:, j]
        return self.t[mask], self.values[mask, j]

    def select(self, keep: np.ndarray) -> Block:
        """The columns where `keep` (bool per column) is set."""
        return Block(self.t, self.ids[keep], self.values[:, keep], self.present[:, keep], self.text)


def _forward_filled(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Absent cells take the nearest present value above them (0 before the first)."""
    rows = np.arange(len(values))[:, None]
    source = np.where(present, rows, -1)
    np.maximum.accumulate(source, axis=0, out=source)
    filled = np.take_along_axis(values, np.maximum(source, 0), axis=0)
    return np.where(source >= 0, filled, 0.0)


def _column_decimals(values: np.ndarray) -> np.ndarray:
    """Per column, the fewest decimals (0..MAX_DECIMALS) that give its values back exactly, else -1."""
    decimals = np.full(values.shape[1], -1, dtype=np.int8)
    # -0.0 would come back as 0.0 from an integer: such a column keeps its bit patterns.
    undecided = np.isfinite(values).all(axis=0) & ~((values == 0) & np.signbit(values)).any(axis=0)
    for places in range(MAX_DECIMALS + 1):
        if not undecided.any():
            break
        scale = 10.0**places
        candidate = values[:, undecided]
        with np.errstate(over="ignore", invalid="ignore"):  # huge values overflow to inf: not exact, so not chosen
            scaled = np.round(candidate * scale)
        exact = (scaled / scale == candidate).all(axis=0) & (np.abs(scaled) < _EXACT_INTEGER).all(axis=0)
        columns = np.flatnonzero(undecided)[exact]
        decimals[columns] = places
        undecided[columns] = False
    return decimals


def _delta_rows(matrix: np.ndarray) -> np.ndarray:
    out = np.empty_like(matrix)
    out[:1] = matrix[:1]
    np.subtract(matrix[1:], matrix[:-1], out=out[1:])  # int64 wraps, and the cumsum wraps back
    return out


def _planes(matrix: np.ndarray) -> bytes:
    """int64 (rows, columns) as byte planes, column by column: (columns, 8, rows) bytes."""
    rows, columns = matrix.shape
    return matrix.astype("<i8", copy=False).view(np.uint8).reshape(rows, columns, 8).transpose(1, 2, 0).tobytes()


def _from_planes(data: bytes | memoryview, rows: int, columns: int) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8, count=rows * columns * 8).reshape(columns, 8, rows)
    return np.ascontiguousarray(planes.transpose(2, 0, 1)).view("<i8").reshape(rows, columns)


def encode_block(block: Block) -> bytes:
    """One compressed blob of `block` (rows sorted by time)."""
    rows, columns = block.values.shape
    if block.present.shape != (rows, columns) or len(block.t) != rows or len(block.ids) != columns:
        raise ValueError(f"block shapes disagree: t {block.t.shape}, values {block.values.shape}")
    filled = _forward_filled(block.values, block.present) if rows and columns else block.values
    decimals = _column_decimals(filled) if rows else np.full(columns, -1, np.int8)
    as_int = np.empty((rows, columns), dtype=np.int64)
    scaled_columns = decimals >= 0
    if scaled_columns.any():
        scales = 10.0 ** decimals[scaled_columns].astype(np.float64)
        as_int[:, scaled_columns] = np.round(filled[:, scaled_columns] * scales)
    if (~scaled_columns).any():
        as_int[:, ~scaled_columns] = np.ascontiguousarray(filled[:, ~scaled_columns]).view(np.int64)
    text = json.dumps(block.text, separators=(",", ":")).encode() if block.text else b""
    times = np.ascontiguousarray(block.t, dtype="<f8").view("<i8").reshape(rows, 1)
    raw = b"".join(
        [
            _HEADER.pack(MAGIC, rows, columns, len(text)),
            block.ids.astype("<u4").tobytes(),
            decimals.astype("i1").tobytes(),
            text,
            np.packbits(block.present, axis=None).tobytes(),
            _planes(_delta_rows(times)),
            _planes(_delta_rows(as_int)),
        ]
    )
    return _compressor().compress(raw)


def decode_block(blob: bytes) -> Block:
    """The block in `blob`; ChunkError for anything that is not a whole block of this format."""
    try:
        raw = memoryview(_decompressor().decompress(blob))
        magic, rows, columns, text_length = _HEADER.unpack_from(raw)
    except (zstandard.ZstdError, struct.error) as exc:
        raise ChunkError(f"not a fleetwatch block: {exc}") from None
    if magic != MAGIC:
        raise ChunkError(f"not a fleetwatch block (magic {bytes(magic)!r})")
    cells = rows * columns
    size = _HEADER.size + 5 * columns + text_length + (cells + 7) // 8 + 8 * rows + 8 * cells
    if len(raw) != size:
        raise ChunkError(f"a block of {rows} x {columns} takes {size} bytes, this one has {len(raw)}")
    try:
        return _decode_layout(raw, rows, columns, text_length)
    except ValueError as exc:  # text that is not JSON, counts that do not fit
        raise ChunkError(f"corrupt fleetwatch block: {exc}") from None


def _decode_layout(raw: memoryview, rows: int, columns: int, text_length: int) -> Block:
    offset = _HEADER.size
    ids = np.frombuffer(raw, dtype="<u4", count=columns, offset=offset).astype(np.int64)
    offset += 4 * columns
    decimals = np.frombuffer(raw, dtype="i1", count=columns, offset=offset)
    offset += columns
    text = json.loads(bytes(raw[offset : offset + text_length])) if text_length else {}
    offset += text_length
    cells = rows * columns
    present = np.unpackbits(np.frombuffer(raw, np.uint8, (cells + 7) // 8, offset), count=cells).astype(bool)
    offset += (cells + 7) // 8
    t = _from_planes(raw[offset : offset + rows * 8], rows, 1).cumsum(axis=0).view("<f8").reshape(rows)
    offset += rows * 8
    as_int = _from_planes(raw[offset : offset + cells * 8], rows, columns).cumsum(axis=0)
    values = np.empty((rows, columns), dtype=np.float64)
    scaled_columns = decimals >= 0
    if scaled_columns.any():
        values[:, scaled_columns] = as_int[:, scaled_columns] / 10.0 ** decimals[scaled_columns].astype(np.float64)
    if (~scaled_columns).any():
        values[:, ~scaled_columns] = np.ascontiguousarray(as_int[:, ~scaled_columns]).view(np.float64)
    return Block(t=t, ids=ids, values=values, present=present.reshape(rows, columns), text=text)


def rollup(block: Block, bucket_seconds: float = ROLLUP_SECONDS) -> Block:
    """Per `bucket_seconds` bucket (row time = bucket start): count, min, max, mean, last of each column.

    A RAW column becomes five; a block of rollups (its columns COUNT, MIN, ...) is re-bucketed,
    counts adding up, means weighted by them, the last taken from the latest row. Rows need not
    be unique in time (late data rolled up apart), only sorted. Cells of a bucket without any
    value stay absent.
    """
    rows = len(block)
    stats = block.ids % STATS
    if not rows:
        return Block(np.empty(0), np.empty(0, np.int64), np.empty((0, 0)), np.empty((0, 0), bool))
    buckets = np.floor(block.t / bucket_seconds) * bucket_seconds
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    raw_columns = np.flatnonzero(stats == RAW)
    count_columns = np.flatnonzero(stats == COUNT)
    if len(raw_columns):
        present = block.present[:, raw_columns]
        counts = present.astype(np.float64)
        values = block.values[:, raw_columns]
        mins = maxs = means = lasts = values
        bases = block.ids[raw_columns]
    else:
        bases = block.ids[count_columns] - COUNT

        def stat_of(code: int) -> np.ndarray:
            index = {int(c): j for j, c in enumerate(block.ids)}
            return block.values[:, [index[int(b) + code] for b in bases]]

        present = block.present[:, count_columns]
        counts = np.where(present, block.values[:, count_columns], 0.0)
        mins, maxs, means, lasts = stat_of(MIN), stat_of(MAX), stat_of(MEAN), stat_of(LAST)
    bucket_counts = np.add.reduceat(counts, starts, axis=0)
    bucket_min = np.minimum.reduceat(np.where(present, mins, np.inf), starts, axis=0)
    bucket_max = np.maximum.reduceat(np.where(present, maxs, -np.inf), starts, axis=0)
    with np.errstate(invalid="ignore", over="ignore"):  # absent cells may hold anything, inf included
        sums = np.add.reduceat(np.where(present, means * counts, 0.0), starts, axis=0)
    ends = np.r_[starts[1:], rows] - 1
    bucket_last = _forward_filled(lasts, present)[ends]
    has = bucket_counts > 0
    safe = np.where(has, bucket_counts, 1.0)
    parts = {
        COUNT: bucket_counts,
        MIN: np.where(has, bucket_min, 0.0),
        MAX: np.where(has, bucket_max, 0.0),
        MEAN: sums / safe,
        LAST: bucket_last,
    }
    ids = np.concatenate([bases + code for code in ROLLUP_STATS])
    out_values = np.concatenate([parts[code] for code in ROLLUP_STATS], axis=1)
    out_present = np.concatenate([has] * len(ROLLUP_STATS), axis=1)
    order = np.argsort(ids, kind="stable")
    return Block(buckets[starts], ids[order], out_values[:, order], out_present[:, order], block.text)


def concat_blocks(blocks: list[Block]) -> Block:
    """Blocks stacked by time (stable for equal times), columns the union of theirs."""
    blocks = [b for b in blocks if len(b)]
    if not blocks:
        return Block(np.empty(0), np.empty(0, np.int64), np.empty((0, 0)), np.empty((0, 0), bool))
    if len(blocks) == 1:
        return blocks[0]
    ids = np.unique(np.concatenate([b.ids for b in blocks]))
    rows = sum(len(b) for b in blocks)
    values = np.zeros((rows, len(ids)))
    present = np.zeros((rows, len(ids)), dtype=bool)
    t = np.empty(rows)
    row = 0
    for b in blocks:
        where = np.searchsorted(ids, b.ids)
        t[row : row + len(b)] = b.t
        values[row : row + len(b), where] = b.values
        present[row : row + len(b), where] = b.present
        row += len(b)
    order = np.argsort(t, kind="stable")
    return Block(t[order], ids, values[order], present[order], blocks[-1].text)
