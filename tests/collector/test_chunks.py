"""Compressed column blocks (fleetwatch.collector.storage.chunks): exact round trips, real compression,
rollups against a naive computation, and clean refusals of blobs that are not blocks."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetwatch.collector.storage.chunks import (
    COUNT,
    LAST,
    MAGIC,
    MAX,
    MEAN,
    MIN,
    RAW,
    ROLLUP_SECONDS,
    ROLLUP_STATS,
    SERIES_STRIDE,
    STATS,
    Block,
    ChunkError,
    column_id,
    concat_blocks,
    decode_block,
    encode_block,
    rollup,
    split_column_id,
)

PROPERTY = settings(max_examples=200, deadline=None)


# -- helpers --------------------------------------------------------------------------------------


def make_block(
    t: list[float] | np.ndarray,
    ids: list[int] | np.ndarray,
    values: list[list[float]] | np.ndarray,
    present: list[list[bool]] | np.ndarray | None = None,
    text: dict[str, Any] | None = None,
) -> Block:
    t_arr = np.asarray(t, dtype=np.float64).reshape(-1)
    ids_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    vals = np.asarray(values, dtype=np.float64).reshape(len(t_arr), len(ids_arr))
    pres = np.ones(vals.shape, bool) if present is None else np.asarray(present, dtype=bool).reshape(vals.shape)
    return Block(t_arr, ids_arr, vals, pres, dict(text or {}))


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64).view(np.int64)


def assert_same_block(got: Block, want: Block) -> None:
    """Same rows, columns, presence, text, and bit-identical times and present values."""
    assert got.t.dtype == np.float64
    assert got.values.dtype == np.float64
    assert got.present.dtype == np.bool_
    assert got.t.shape == want.t.shape
    assert got.values.shape == want.values.shape
    assert got.present.shape == want.present.shape
    np.testing.assert_array_equal(bits(got.t), bits(want.t))
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.present, want.present)
    np.testing.assert_array_equal(bits(got.values)[want.present], bits(want.values)[want.present])
    assert got.text == want.text


def roundtrip(block: Block) -> Block:
    blob = encode_block(block)
    assert isinstance(blob, bytes)
    return decode_block(blob)


def cell(block: Block, t: float, cid: int) -> float | None:
    """The value of column `cid` at the row at time `t`, or None when absent."""
    rows = np.flatnonzero(block.t == t)
    assert len(rows) == 1, f"expected one row at {t}, got {len(rows)}"
    cols = np.flatnonzero(block.ids == cid)
    assert len(cols) == 1, f"expected one column {cid}, got {len(cols)}"
    r, c = int(rows[0]), int(cols[0])
    return float(block.values[r, c]) if block.present[r, c] else None


# -- column ids -----------------------------------------------------------------------------------


@PROPERTY
@given(
    slot=st.integers(0, 1000),
    number=st.integers(0, SERIES_STRIDE // STATS - 1),
    stat=st.integers(0, STATS - 1),
)
def test_column_id_splits_back(slot: int, number: int, stat: int) -> None:
    cid = column_id(number, stat, slot)
    assert split_column_id(cid) == (slot, number, stat)
    assert split_column_id(np.int64(cid)) == (slot, number, stat)


def test_column_id_defaults_and_layout() -> None:
    assert column_id(5) == 5 * STATS + RAW
    assert column_id(5, MEAN) == 5 * STATS + MEAN
    assert column_id(5, RAW, 3) == 3 * SERIES_STRIDE + 5 * STATS
    # Rollup statistics of one field are consecutive ids after its RAW id, inside one field's stride.
    assert [column_id(7, s) - column_id(7) for s in ROLLUP_STATS] == [COUNT, MIN, MAX, MEAN, LAST]
    assert max(ROLLUP_STATS) < STATS


# -- round trip: explicit cases -------------------------------------------------------------------


def test_roundtrip_simple_block() -> None:
    block = make_block(
        [100.0, 110.0, 120.0],
        [column_id(5), column_id(8), column_id(10)],
        [[45.0, 300.123, 1000.0], [46.0, 301.5, 1003.011], [46.0, 299.999, 1006.022]],
        text={"runs": {"0": [[0, "GPU-abc", "job-1", 0]]}, "ports": [["mlx5_0", 1]]},
    )
    assert_same_block(roundtrip(block), block)


def test_decoded_arrays_have_documented_types() -> None:
    block = make_block([1.0, 2.0], [column_id(1), column_id(2)], [[1.0, 2.5], [3.0, 4.25]])
    got = roundtrip(block)
    assert got.ids.dtype == np.int64
    assert got.t.shape == (2,)
    assert got.values.shape == (2, 2)
    assert got.present.shape == (2, 2)
    assert got.text == {}
    assert len(got) == 2


SPECIAL_FLOATS = [
    5e-324,  # smallest subnormal
    -5e-324,
    2.2250738585072014e-308,  # smallest normal
    1e-300,
    1.7976931348623157e308,  # largest finite
    -1.7976931348623157e308,
    1e300,
    -1e300,
    1e20,
    float(2**53),
    float(2**53 - 1),
    -float(2**53),
    float(2**53 + 2),
    float(2**63),
    1.8446744073709552e19,  # NVML's all-ones as a float
    0.1 + 0.2,
    math.pi,
    -math.e,
    1 / 3,
    123456.789,
    0.001,
    -0.001,
    0.0005,  # four decimals
    1.0000000000000002,
]


@pytest.mark.parametrize("value", SPECIAL_FLOATS, ids=repr)
def test_roundtrip_special_value_alone_and_among_decimals(value: float) -> None:
    # Alone (a constant column), beside a decimal, beside a non-decimal, and beside a whole number.
    t = [0.0, 1.0, 2.0]
    columns = [
        [value, value, value],
        [1.5, value, 2.25],
        [0.1 + 0.2, value, math.pi],
        [7.0, 8.0, value],
    ]
    block = make_block(t, [column_id(n) for n in range(1, 5)], np.array(columns).T)
    assert_same_block(roundtrip(block), block)


@pytest.mark.parametrize("places", [0, 1, 2, 3])
def test_roundtrip_decimals(places: int) -> None:
    rng = np.random.default_rng(places)
    ks = rng.integers(-(10**12), 10**12, size=50)
    values = [int(k) / 10**places for k in ks]
    block = make_block(np.arange(50.0), [column_id(8)], np.array(values).reshape(50, 1))
    assert_same_block(roundtrip(block), block)


def test_roundtrip_whole_numbers_up_to_2_pow_53() -> None:
    values = [0.0, 1.0, -1.0, 2.0**52, 2.0**53 - 1, 2.0**53, -(2.0**53), 2.0**53 - 2, 12345678901234.0]
    block = make_block(np.arange(len(values), dtype=float), [column_id(23)], np.array(values).reshape(-1, 1))
    assert_same_block(roundtrip(block), block)


def test_roundtrip_monotonic_counter_and_negative_numbers() -> None:
    counter = np.cumsum(np.arange(100, dtype=float) * 17.0)
    negative = -np.linspace(0.5, 1e6, 100)
    block = make_block(np.arange(100.0) * 10, [column_id(10), column_id(17)], np.column_stack([counter, negative]))
    assert_same_block(roundtrip(block), block)


def test_roundtrip_nan_and_infinities_keep_their_bits() -> None:
    quiet_nan_with_payload = np.array([0x7FF8_0000_0000_1234], dtype=np.int64).view(np.float64)[0]
    values = np.array([[math.nan, math.inf], [-math.inf, 1.0], [quiet_nan_with_payload, -0.0], [2.5, math.nan]])
    block = make_block([1.0, 2.0, 3.0, 4.0], [column_id(1), column_id(2)], values)
    assert_same_block(roundtrip(block), block)


def test_roundtrip_negative_zero_in_a_bit_pattern_column() -> None:
    # A column that is not decimals (0.1 + 0.2) is stored by bit pattern: -0.0 keeps its sign.
    block = make_block([1.0, 2.0, 3.0], [column_id(1)], [[0.1 + 0.2], [-0.0], [0.0]])
    got = roundtrip(block)
    assert_same_block(got, block)
    assert np.signbit(got.values[1, 0])
    assert not np.signbit(got.values[2, 0])


def test_negative_zero_in_a_decimal_column_keeps_its_value() -> None:
    # Whatever its sign, the value is still zero (what == and every statistic see).
    block = make_block([1.0, 2.0], [column_id(1)], [[-0.0], [1.5]])
    got = roundtrip(block)
    assert got.values[0, 0] == 0.0
    assert got.values[1, 0] == 1.5


@pytest.mark.parametrize(
    "column", [[-0.0, 1.5], [-0.0, -0.0], [3.0, -0.0]], ids=["then-decimal", "constant", "after-whole"]
)
def test_negative_zero_roundtrips_bit_for_bit_in_decimal_columns(column: list[float]) -> None:
    block = make_block([1.0, 2.0], [column_id(1)], np.array(column).reshape(2, 1))
    got = roundtrip(block)
    np.testing.assert_array_equal(bits(got.values), bits(block.values))


def test_roundtrip_constant_columns() -> None:
    block = make_block(
        np.arange(30.0),
        [column_id(4), column_id(9), column_id(35), column_id(12)],
        np.tile([85899345920.0, 700.0, 18.0, 1980.5], (30, 1)),
    )
    got = roundtrip(block)
    assert_same_block(got, block)


def test_roundtrip_single_row() -> None:
    block = make_block([1_700_000_000.123456], [column_id(1), column_id(2)], [[math.pi, 42.0]], [[True, False]])
    assert_same_block(roundtrip(block), block)


def test_roundtrip_zero_rows() -> None:
    block = make_block(np.empty(0), [column_id(1), column_id(2), column_id(3)], np.empty((0, 3)))
    got = roundtrip(block)
    assert_same_block(got, block)
    assert len(got) == 0


def test_roundtrip_zero_columns() -> None:
    block = make_block([1.0, 2.0, 2.0, 3.5], np.empty(0), np.empty((4, 0)), text={"ports": [["mlx5_0", 1]]})
    got = roundtrip(block)
    assert_same_block(got, block)
    assert got.values.shape == (4, 0)


def test_roundtrip_zero_rows_and_zero_columns() -> None:
    block = make_block(np.empty(0), np.empty(0), np.empty((0, 0)))
    assert_same_block(roundtrip(block), block)


def test_roundtrip_presence_mask_and_garbage_in_absent_cells() -> None:
    # Absent cells may hold anything (NaN, huge, non-decimals): presence and present values are kept.
    present = np.array(
        [
            [True, False, False, True],
            [False, False, True, True],
            [True, False, False, False],
            [False, False, True, True],
            [True, False, True, False],
        ]
    )
    values = np.array(
        [
            [1.5, math.nan, 1e300, 0.25],
            [math.nan, math.inf, 7.0, 0.5],
            [2.5, 0.1 + 0.2, -1e308, 1.0 / 3.0],
            [1e308, 5.0, 8.0, 0.75],
            [3.5, -math.inf, 9.0, math.nan],
        ]
    )
    block = make_block([10.0, 20.0, 30.0, 40.0, 50.0], [column_id(n) for n in (1, 2, 3, 4)], values, present)
    got = roundtrip(block)
    assert_same_block(got, block)
    # A column absent everywhere stays absent everywhere (never 0).
    assert not got.present[:, 1].any()
    assert got.column(column_id(2)) is not None
    times, vals = got.column(column_id(2))
    assert len(times) == 0 and len(vals) == 0


def test_roundtrip_absent_first_rows_are_not_zero() -> None:
    block = make_block([1.0, 2.0, 3.0], [column_id(5)], [[0.0], [0.0], [71.0]], [[False], [False], [True]])
    got = roundtrip(block)
    times, vals = got.column(column_id(5))
    assert times.tolist() == [3.0]
    assert vals.tolist() == [71.0]


def test_roundtrip_repeated_and_sub_microsecond_timestamps() -> None:
    t0 = 1_700_000_000.0
    times = [
        t0,
        t0,
        np.nextafter(t0, np.inf),
        t0 + 1e-7,
        t0 + 1e-7,
        t0 + 0.123456789,
        t0 + 10.000000001,
        t0 + 10.000000001,
    ]
    times = sorted(times)
    block = make_block(times, [column_id(1)], np.arange(len(times), dtype=float).reshape(-1, 1))
    got = roundtrip(block)
    assert_same_block(got, block)
    assert got.t.tolist() == times


def test_roundtrip_unusual_times() -> None:
    times = [-1e300, -1.5, -0.0, 0.0, 5e-324, 1e-300, 1.0, 1e300, 1.7976931348623157e308]
    block = make_block(times, [column_id(1)], np.ones((len(times), 1)))
    assert_same_block(roundtrip(block), block)


def test_roundtrip_large_column_ids_and_unordered_ids() -> None:
    ids = [column_id(40, LAST, 63), column_id(1, RAW, 0), column_id(39, MEAN, 17), 2**32 - 1]
    block = make_block([1.0, 2.0], ids, [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    got = roundtrip(block)
    assert got.ids.tolist() == ids
    assert_same_block(got, block)


def test_roundtrip_text_json() -> None:
    text = {
        "runs": {"0": [[0, "GPU-1", "job-ä", None], [3, "GPU-1", "job-b", 7]], "12": [[1, None, None, 0]]},
        "ports": [["mlx5_0", 1], ["ibp12s0", 2]],
    }
    block = make_block([1.0, 2.0, 3.0, 4.0], [column_id(1)], np.zeros((4, 1)), text=text)
    assert roundtrip(block).text == text


def test_encode_is_deterministic() -> None:
    block = make_block([1.0, 2.0], [column_id(1)], [[1.0], [2.0]])
    assert encode_block(block) == encode_block(block)


@pytest.mark.parametrize(
    "block",
    [
        Block(np.arange(3.0), np.arange(2), np.zeros((3, 2)), np.ones((2, 3), bool)),
        Block(np.arange(2.0), np.arange(2), np.zeros((3, 2)), np.ones((3, 2), bool)),
        Block(np.arange(3.0), np.arange(3), np.zeros((3, 2)), np.ones((3, 2), bool)),
    ],
    ids=["present-transposed", "times-short", "ids-long"],
)
def test_encode_refuses_shapes_that_disagree(block: Block) -> None:
    with pytest.raises(ValueError):
        encode_block(block)


# -- round trip: properties -----------------------------------------------------------------------


ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
FINITE_TIME = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)


@st.composite
def column_values(draw: st.DrawFn, rows: int) -> list[float]:
    kind = draw(st.sampled_from(["any", "decimal", "whole", "constant", "special", "counter", "mixed"]))
    if kind == "any":
        return draw(st.lists(ANY_FLOAT, min_size=rows, max_size=rows))
    if kind == "decimal":
        places = draw(st.integers(0, 3))
        ks = draw(st.lists(st.integers(-(10**12), 10**12), min_size=rows, max_size=rows))
        return [k / 10**places for k in ks]
    if kind == "whole":
        return [float(k) for k in draw(st.lists(st.integers(-(2**53), 2**53), min_size=rows, max_size=rows))]
    if kind == "constant":
        return [draw(ANY_FLOAT)] * rows
    if kind == "special":
        return draw(st.lists(st.sampled_from(SPECIAL_FLOATS), min_size=rows, max_size=rows))
    if kind == "counter":
        steps = draw(st.lists(st.integers(0, 10**6), min_size=rows, max_size=rows))
        start = draw(st.integers(0, 2**40))
        return [float(v) for v in np.cumsum([start, *steps])[1:]]
    return draw(
        st.lists(
            st.one_of(ANY_FLOAT, st.sampled_from(SPECIAL_FLOATS), st.integers(-1000, 1000).map(lambda k: k / 8)),
            min_size=rows,
            max_size=rows,
        )
    )


@st.composite
def raw_blocks(draw: st.DrawFn) -> Block:
    rows = draw(st.integers(0, 12))
    columns = draw(st.integers(0, 6))
    t0 = draw(FINITE_TIME)
    steps = draw(
        st.lists(
            st.one_of(
                st.just(0.0),
                st.sampled_from([1e-7, 0.001, 0.5, 1.0, 10.0]),
                st.floats(min_value=0, max_value=1e6, allow_nan=False),
            ),
            min_size=rows,
            max_size=rows,
        )
    )
    t = np.sort(t0 + np.cumsum(steps)) if rows else np.empty(0)
    ids = draw(st.lists(st.integers(0, 2**32 - 1), min_size=columns, max_size=columns, unique=True))
    values = np.zeros((rows, columns))
    present = np.zeros((rows, columns), bool)
    for j in range(columns):
        values[:, j] = draw(column_values(rows))
        mode = draw(st.sampled_from(["all", "none", "random"]))
        if mode == "all":
            present[:, j] = True
        elif mode == "random":
            present[:, j] = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    # What absent cells hold must not matter.
    garbage = draw(st.sampled_from([0.0, math.nan, 1e300, 0.1 + 0.2]))
    values[~present] = garbage
    text = draw(st.sampled_from([{}, {"ports": [["mlx5_0", 1]]}, {"runs": {"0": [[0, "GPU-x", None, None]]}}]))
    return Block(t, np.asarray(ids, dtype=np.int64), values, present, text)


@PROPERTY
@given(block=raw_blocks())
def test_roundtrip_property(block: Block) -> None:
    once = roundtrip(block)
    assert_same_block(once, block)
    # Decoding what was decoded and encoded again changes nothing, to the byte (absent cells come
    # back forward-filled, which the encoder does itself).
    twice = roundtrip(once)
    assert_same_block(twice, once)
    assert encode_block(twice) == encode_block(once)


# -- corrupt blobs --------------------------------------------------------------------------------


def _valid_blob() -> bytes:
    return encode_block(
        make_block(
            [1.0, 2.0, 3.0],
            [column_id(5), column_id(8)],
            [[45.0, 300.5], [46.0, 0.1 + 0.2], [47.0, 301.25]],
            [[True, True], [True, False], [True, True]],
            text={"runs": {"0": [[0, "GPU-a", "job", 1]]}},
        )
    )


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"garbage",
        b"\x00" * 100,
        MAGIC,
        b"FWB1" + b"\x00" * 12,  # the uncompressed layout is not a zstd frame
        bytes(range(256)),
    ],
    ids=["empty", "garbage", "zeros", "bare-magic", "uncompressed-header", "bytes"],
)
def test_decode_garbage_raises_chunk_error(blob: bytes) -> None:
    with pytest.raises(ChunkError):
        decode_block(blob)


def test_chunk_error_is_a_value_error() -> None:
    assert issubclass(ChunkError, ValueError)


def test_decode_truncated_blob_raises_chunk_error() -> None:
    blob = _valid_blob()
    for n in range(len(blob)):
        with pytest.raises(ChunkError):
            decode_block(blob[:n])


def test_decode_wrong_magic_raises_chunk_error() -> None:
    raw = zstandard.ZstdDecompressor().decompress(_valid_blob())
    assert raw[:4] == MAGIC
    for magic in (b"FWB0", b"FWB2", b"\x00\x00\x00\x00", b"fwb1"):
        with pytest.raises(ChunkError, match="magic"):
            decode_block(zstandard.ZstdCompressor().compress(magic + raw[4:]))


def test_decode_frame_shorter_than_header_raises_chunk_error() -> None:
    raw = zstandard.ZstdDecompressor().decompress(_valid_blob())
    for n in range(16):
        with pytest.raises(ChunkError):
            decode_block(zstandard.ZstdCompressor().compress(raw[:n]))


def test_decode_truncated_layout_inside_valid_frame_raises_chunk_error() -> None:
    raw = zstandard.ZstdDecompressor().decompress(_valid_blob())
    for n in range(16, len(raw)):
        with pytest.raises(ChunkError):
            decode_block(zstandard.ZstdCompressor().compress(raw[:n]))


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("<4sIII", MAGIC, 1000, 5, 0),
        struct.pack("<4sIII", MAGIC, 0, 0, 5) + b"{{{{{",
    ],
    ids=["rows-beyond-data", "text-not-json"],
)
def test_decode_inconsistent_layout_raises_chunk_error(raw: bytes) -> None:
    with pytest.raises(ChunkError):
        decode_block(zstandard.ZstdCompressor().compress(raw))


# -- compression ----------------------------------------------------------------------------------

GPUS = 8
FIELDS_PER_GPU = 35  # 8 x 35 = 280 columns


def telemetry_block(rows: int = 60, seed: int = 7) -> Block:
    """A minute of an 8-GPU node at 1 s: what NVML reports, shaped as the store keeps it."""
    rng = np.random.default_rng(seed)
    t = 1_700_000_000.0 + np.arange(rows) * 1.0 + rng.uniform(0, 0.002, rows)  # sampling jitter
    t.sort()
    columns: list[int] = []
    data: list[np.ndarray] = []
    present_cols: list[np.ndarray] = []
    for gpu in range(GPUS):
        fields: list[np.ndarray] = []
        # Drifting integer temperatures.
        fields.append(60.0 + np.cumsum(rng.integers(-1, 2, rows)))  # temp_gpu
        fields.append(70.0 + np.cumsum(rng.integers(-1, 2, rows)))  # temp_mem
        # Power in watts from milliwatts: three decimals.
        fields.append(np.round(rng.uniform(250, 700, rows), 3))
        # Energy counter in joules from millijoules: increasing, three decimals.
        fields.append(np.round(1e7 + np.cumsum(rng.uniform(250, 700, rows)), 3))
        # Utilisation: integer percents.
        fields.append(rng.integers(90, 101, rows).astype(float))
        fields.append(rng.integers(30, 60, rows).astype(float))
        # Memory used: a few steps.
        fields.append(np.where(np.arange(rows) < rows // 2, 60e9, 61.5e9))
        # Clocks: mostly constant, a throttle dip.
        sm = np.full(rows, 1980.0)
        sm[rows // 3 : rows // 3 + 4] = 1410.0
        fields.append(sm)
        # PCIe throughput: full-precision floats (bytes over a measured interval).
        fields.append(rng.uniform(1e9, 2e9, rows))
        # Monotonic counters: NVLink CRC errors, PCIe replays (rare increments).
        fields.append(1000.0 + np.cumsum(rng.random(rows) < 0.05))
        fields.append(20.0 + np.cumsum(rng.random(rows) < 0.02))
        # The rest: constant (limits, maxima, link widths, ECC totals, flags).
        while len(fields) < FIELDS_PER_GPU:
            fields.append(np.full(rows, float(rng.choice([0, 1, 4, 16, 18, 700, 1980, 85899345920, 92.0]))))
        for number, column in enumerate(fields, start=1):
            columns.append(column_id(number, RAW, gpu))
            data.append(column)
            present_cols.append(np.ones(rows, bool))
    # One GPU does not report fan speed, and one field is missing for a few samples.
    present = np.column_stack(present_cols)
    present[:, columns.index(column_id(FIELDS_PER_GPU, RAW, 3))] = False
    present[10:13, columns.index(column_id(2, RAW, 5))] = False
    text = {"runs": {str(g): [[0, f"GPU-{g:08x}-0000-0000-0000-000000000000", "job-42", g]] for g in range(GPUS)}}
    return Block(t, np.asarray(columns, np.int64), np.column_stack(data), present, text)


def test_telemetry_compresses_below_one_and_a_half_bytes_per_value() -> None:
    block = telemetry_block()
    assert block.values.shape == (60, 280)
    blob = encode_block(block)
    present_values = int(block.present.sum())
    assert present_values > 60 * 270
    assert len(blob) / present_values < 1.5
    # And it is all still there.
    assert_same_block(decode_block(blob), block)


def test_compression_beats_plain_zstd_of_the_matrix() -> None:
    block = telemetry_block()
    plain = zstandard.ZstdCompressor(level=3).compress(block.values.tobytes() + block.t.tobytes())
    assert len(encode_block(block)) < len(plain) / 2


# -- rollup ---------------------------------------------------------------------------------------


def naive_rollup(block: Block, bucket: float) -> dict[float, dict[int, tuple[int, float, float, float, float]]]:
    """bucket start -> RAW column id -> (count, min, max, mean, last), present cells only, pure Python."""
    out: dict[float, dict[int, list[float]]] = {}
    for r in range(len(block)):
        start = math.floor(float(block.t[r]) / bucket) * bucket
        row = out.setdefault(float(start), {})
        for j, cid in enumerate(block.ids.tolist()):
            if not block.present[r, j]:
                continue
            row.setdefault(cid, []).append(float(block.values[r, j]))
    return {
        start: {cid: (len(v), min(v), max(v), math.fsum(v) / len(v), v[-1]) for cid, v in per.items()}
        for start, per in out.items()
    }


def assert_rollup_matches(got: Block, raw: Block, bucket: float) -> None:
    want = naive_rollup(raw, bucket)
    assert got.t.tolist() == sorted(want)
    assert len(set(got.t.tolist())) == len(got)
    raw_ids = sorted(raw.ids.tolist())
    assert got.ids.tolist() == sorted(b + s for b in raw_ids for s in ROLLUP_STATS)
    for start in want:
        for base in raw_ids:
            stats = want[start].get(base)
            cells = {s: cell(got, start, base + s) for s in ROLLUP_STATS}
            if stats is None:
                assert cells == dict.fromkeys(ROLLUP_STATS), f"bucket {start} column {base}: {cells}"
                continue
            count, lo, hi, mean, last = stats
            assert cells[COUNT] == count
            assert cells[MIN] == lo
            assert cells[MAX] == hi
            assert cells[MEAN] == pytest.approx(mean, rel=1e-9, abs=1e-9)
            assert cells[LAST] == last


@st.composite
def rollup_inputs(draw: st.DrawFn, span: float = 600.0, max_rows: int = 40) -> Block:
    """A random RAW block: the shape and kinds drawn by Hypothesis, the cells from a seeded generator."""
    rows = draw(st.integers(1, max_rows))
    columns = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Quarter seconds: bucket boundaries are exact, and times repeat now and then.
    t = np.sort(rng.integers(0, int(span * 4) + 1, rows)).astype(float) / 4.0
    numbers = rng.choice(np.arange(1, 41), size=columns, replace=False)
    slots = rng.integers(0, 8, columns)
    ids = np.asarray([column_id(int(n), RAW, int(s)) for n, s in zip(numbers, slots)], dtype=np.int64)
    kind = draw(st.sampled_from(["integers", "floats", "mixed"]))
    whole = rng.integers(-1000, 1001, (rows, columns)).astype(float)
    fractional = rng.uniform(-1e6, 1e6, (rows, columns))
    values = {
        "integers": whole,
        "floats": fractional,
        "mixed": np.where(rng.random((rows, columns)) < 0.5, whole, fractional),
    }[kind]
    density = draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
    present = rng.random((rows, columns)) < density
    if draw(st.booleans()):
        present[:, 0] = True
    values[~present] = draw(st.sampled_from([0.0, math.nan, 1e300]))
    return Block(t, ids, values, present, {"ports": [["mlx5_0", 1]]})


@PROPERTY
@given(block=rollup_inputs(), bucket=st.sampled_from([1.0, 7.5, 60.0, 60.0, 300.0, 3600.0]))
def test_rollup_matches_naive(block: Block, bucket: float) -> None:
    got = rollup(block, bucket)
    assert_rollup_matches(got, block, bucket)
    assert got.text == block.text
    # Rollups are blocks like any other: they are stored as exactly.
    assert_same_block(roundtrip(got), got)


def test_rollup_default_bucket_is_a_minute() -> None:
    assert ROLLUP_SECONDS == 60.0
    block = make_block([0.0, 59.75, 60.0, 125.0], [column_id(5)], [[1.0], [3.0], [10.0], [20.0]])
    got = rollup(block)
    assert got.t.tolist() == [0.0, 60.0, 120.0]
    assert [cell(got, 0.0, column_id(5, s)) for s in ROLLUP_STATS] == [2.0, 1.0, 3.0, 2.0, 3.0]
    assert [cell(got, 60.0, column_id(5, s)) for s in ROLLUP_STATS] == [1.0, 10.0, 10.0, 10.0, 10.0]
    assert [cell(got, 120.0, column_id(5, s)) for s in ROLLUP_STATS] == [1.0, 20.0, 20.0, 20.0, 20.0]


def test_rollup_last_is_latest_present_value_not_latest_row() -> None:
    block = make_block(
        [0.0, 10.0, 20.0, 30.0],
        [column_id(5), column_id(8)],
        [[1.0, 100.0], [2.0, 200.0], [3.0, 0.0], [0.0, 0.0]],
        [[True, True], [True, True], [True, False], [False, False]],
    )
    got = rollup(block)
    assert cell(got, 0.0, column_id(5, LAST)) == 3.0
    assert cell(got, 0.0, column_id(8, LAST)) == 200.0


def test_rollup_bucket_without_values_is_absent_not_zero() -> None:
    # Column 8 has values in the first minute only; in the second its cells stay absent.
    block = make_block(
        [0.0, 30.0, 60.0, 90.0],
        [column_id(5), column_id(8)],
        [[1.0, 7.0], [2.0, 9.0], [3.0, 0.0], [4.0, 0.0]],
        [[True, True], [True, True], [True, False], [True, False]],
    )
    got = rollup(block)
    for s in ROLLUP_STATS:
        assert cell(got, 60.0, column_id(8, s)) is None
        assert cell(got, 0.0, column_id(8, s)) is not None
    assert cell(got, 0.0, column_id(8, LAST)) == 9.0


def test_rollup_negative_and_fractional_times() -> None:
    block = make_block([-90.0, -60.5, -0.25, 0.0, 0.5], [column_id(1)], [[1.0], [2.0], [3.0], [4.0], [5.0]])
    got = rollup(block)
    assert got.t.tolist() == [-120.0, -60.0, 0.0]
    assert_rollup_matches(got, block, 60.0)


def test_rollup_of_empty_block_is_empty() -> None:
    block = make_block(np.empty(0), [column_id(1)], np.empty((0, 1)))
    got = rollup(block)
    assert len(got) == 0
    assert len(roundtrip(got)) == 0


def test_rollup_of_rollups_to_a_coarser_bucket_explicit() -> None:
    # Two hours of one column at 30 s, one value missing now and then.
    t = np.arange(0.0, 7200.0, 30.0)
    values = np.sin(t / 100.0) * 50 + 100
    present = (np.arange(len(t)) % 7) != 3
    raw = make_block(t, [column_id(8)], values.reshape(-1, 1), present.reshape(-1, 1))
    direct = rollup(raw, 3600.0)
    staged = rollup(rollup(raw, 60.0), 3600.0)
    assert_rollups_equal(staged, direct)
    assert_rollup_matches(staged, raw, 3600.0)


def assert_rollups_equal(got: Block, want: Block) -> None:
    np.testing.assert_array_equal(got.t, want.t)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.present, want.present)
    stats = got.ids % STATS
    exact = np.isin(stats, [COUNT, MIN, MAX, LAST])
    p = want.present
    np.testing.assert_array_equal(got.values[:, exact][p[:, exact]], want.values[:, exact][p[:, exact]])
    means = stats == MEAN
    np.testing.assert_allclose(
        got.values[:, means][p[:, means]], want.values[:, means][p[:, means]], rtol=1e-9, atol=1e-9
    )


@PROPERTY
@given(block=rollup_inputs(span=4 * 3600.0, max_rows=60))
def test_rollup_of_rollups_equals_direct_rollup(block: Block) -> None:
    direct = rollup(block, 3600.0)
    staged = rollup(rollup(block, 60.0), 3600.0)
    assert_rollups_equal(staged, direct)
    # Through storage too, as compaction does it.
    stored = rollup(roundtrip(rollup(roundtrip(block), 60.0)), 3600.0)
    assert_rollups_equal(stored, direct)


@PROPERTY
@given(first=rollup_inputs(), late=rollup_inputs())
def test_concat_of_overlapping_rollups_then_rollup_merges_them(first: Block, late: Block) -> None:
    # Late data for minutes already rolled up is rolled up apart; a reader concatenates and re-buckets.
    a, b = rollup(first, 60.0), rollup(late, 60.0)
    merged = rollup(concat_blocks([a, b]), 60.0)
    assert len(set(merged.t.tolist())) == len(merged), "one row per minute after the merge"
    want_a, want_b = naive_rollup(first, 60.0), naive_rollup(late, 60.0)
    starts = sorted(set(want_a) | set(want_b))
    assert merged.t.tolist() == starts
    bases = sorted(set(first.ids.tolist()) | set(late.ids.tolist()))
    assert merged.ids.tolist() == sorted(c + s for c in bases for s in ROLLUP_STATS)
    for start in starts:
        for base in bases:
            sa = want_a.get(start, {}).get(base)
            sb = want_b.get(start, {}).get(base)
            cells = {s: cell(merged, start, base + s) for s in ROLLUP_STATS}
            if sa is None and sb is None:
                assert cells == dict.fromkeys(ROLLUP_STATS)
                continue
            parts = [p for p in (sa, sb) if p is not None]
            count = sum(p[0] for p in parts)
            assert cells[COUNT] == count
            assert cells[MIN] == min(p[1] for p in parts)
            assert cells[MAX] == max(p[2] for p in parts)
            assert cells[MEAN] == pytest.approx(sum(p[0] * p[3] for p in parts) / count, rel=1e-9, abs=1e-9)
            # Equal bucket times keep concat order: the late block's last wins where it has one.
            assert cells[LAST] == (sb if sb is not None else sa)[4]


def test_concat_of_overlapping_rollups_equals_rollup_of_all_raw_data() -> None:
    ids = [column_id(5)]
    first = make_block([0.0, 20.0, 40.0, 70.0], ids, [[1.0], [2.0], [3.0], [4.0]])
    late = make_block([50.0, 55.0, 65.0], ids, [[10.0], [-5.0], [8.0]])
    merged = rollup(concat_blocks([rollup(first), rollup(late)]))
    everything = make_block(
        [0.0, 20.0, 40.0, 50.0, 55.0, 65.0, 70.0], ids, [[1.0], [2.0], [3.0], [10.0], [-5.0], [8.0], [4.0]]
    )
    direct = rollup(everything)
    np.testing.assert_array_equal(merged.t, direct.t)
    for start in (0.0, 60.0):
        for s in (COUNT, MIN, MAX):
            assert cell(merged, start, column_id(5, s)) == cell(direct, start, column_id(5, s))
        assert cell(merged, start, column_id(5, MEAN)) == pytest.approx(cell(direct, start, column_id(5, MEAN)))
    # The late rows of each minute are also the latest here, so LAST agrees with the raw data's.
    assert cell(merged, 0.0, column_id(5, LAST)) == -5.0
    # Minute 60: the late block's 65.0 row comes before the first block's 70.0 row in time, but the
    # rollups no longer know that; concat order decides (the late block's value).
    assert cell(merged, 60.0, column_id(5, LAST)) == 8.0


# -- concat_blocks, Block helpers -----------------------------------------------------------------


def test_concat_blocks_unions_columns_and_sorts_stably() -> None:
    a = make_block([0.0, 10.0, 20.0], [column_id(1), column_id(2)], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], text={"a": 1})
    b = make_block([5.0, 10.0], [column_id(2), column_id(3)], [[7.0, 8.0], [9.0, 10.0]], text={"b": 2})
    got = concat_blocks([a, b])
    assert got.t.tolist() == [0.0, 5.0, 10.0, 10.0, 20.0]
    assert got.ids.tolist() == [column_id(1), column_id(2), column_id(3)]
    nan = math.nan
    want = np.array([[1.0, 2.0, nan], [nan, 7.0, 8.0], [3.0, 4.0, nan], [nan, 9.0, 10.0], [5.0, 6.0, nan]])
    np.testing.assert_array_equal(got.present, ~np.isnan(want))
    np.testing.assert_array_equal(got.values[got.present], want[~np.isnan(want)])
    assert got.text == {"b": 2}  # the last block's text


def test_concat_blocks_edge_cases() -> None:
    empty = make_block(np.empty(0), [column_id(1)], np.empty((0, 1)))
    assert len(concat_blocks([])) == 0
    assert len(concat_blocks([empty, empty])) == 0
    one = make_block([1.0], [column_id(1)], [[2.0]])
    assert concat_blocks([empty, one, empty]) is one


def test_block_column_and_select() -> None:
    block = make_block(
        [1.0, 2.0, 3.0],
        [column_id(1), column_id(2)],
        [[10.0, 20.0], [11.0, 21.0], [12.0, 22.0]],
        [[True, False], [False, True], [True, True]],
    )
    times, vals = block.column(column_id(1))
    assert times.tolist() == [1.0, 3.0] and vals.tolist() == [10.0, 12.0]
    assert block.column(column_id(3)) is None
    picked = block.select(np.array([False, True]))
    assert picked.ids.tolist() == [column_id(2)]
    times, vals = picked.column(column_id(2))
    assert times.tolist() == [2.0, 3.0] and vals.tolist() == [21.0, 22.0]
