"""decode_batch (codecs/bundle_batch.py) against decode_entry, entry by entry: same values, same
errors, for canonical entries, protobuf-only entries, and damaged bytes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyckpt.codecs import DecodeError
from anyckpt.codecs.bundle import BundleEntry, EntryRecord, decode_entry, encode_entry
from anyckpt.codecs.bundle_batch import decode_batch

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U32 = st.integers(0, (1 << 32) - 1)
NUMBER = st.sampled_from(
    [0, 1, 127, 128, 255, 16383, 16384, 1 << 21, 1 << 28, 1 << 35]
) | st.integers(0, (1 << 63) - 1)
SHAPE = st.lists(st.sampled_from([0, 1, 3, 127, 128, 256, 1 << 20, 1 << 40]), max_size=4).map(tuple)
EXTENTS = st.lists(
    st.lists(st.tuples(st.integers(0, 300), st.integers(-1, 300)), min_size=1, max_size=3).map(
        tuple
    ),
    max_size=2,
).map(tuple)


@st.composite
def entries(draw: st.DrawFn) -> BundleEntry:
    slices = draw(EXTENTS) if draw(st.integers(0, 9)) == 0 else ()
    return BundleEntry(
        dtype=draw(st.sampled_from([1, 2, 3, 7, 9, 14, 19, 127, 128, 300])),
        shape=draw(SHAPE),
        shard_id=draw(st.sampled_from([0, 0, 0, 1, 5, 1 << 20]) | st.integers(0, (1 << 31) - 1)),
        offset=draw(NUMBER),
        size=draw(NUMBER),
        crc32c=draw(U32),
        slices=slices,
    )


def as_record(entry: BundleEntry) -> EntryRecord:
    return EntryRecord(
        entry.dtype,
        entry.shape,
        entry.shard_id,
        entry.offset,
        entry.size,
        entry.crc32c,
        entry.slices,
    )


def expected(values: list[bytes]) -> list[EntryRecord] | str:
    """decode_entry of each value, or the message of the first error."""
    try:
        return [as_record(decode_entry(value)) for value in values]
    except DecodeError as exc:
        return str(exc)


def check(values: list[bytes]) -> None:
    want = expected(values)
    if isinstance(want, str):
        with pytest.raises(DecodeError) as exc:
            decode_batch(values)
        assert str(exc.value) == want
        return
    batch = decode_batch(values)
    assert batch.records == want
    assert [tuple(r) for r in batch.records] == [tuple(r) for r in want]
    # The columns agree with the records of the entries decoded together.
    for i, record in enumerate(batch.records):
        head = int(batch.head_ids[i])
        if head >= 0:
            assert batch.heads[head] == (record.dtype, record.shape)
            assert int(batch.sizes[i]) == record.size
            assert int(batch.shard_ids[i]) == record.shard_id
            assert not record.slices


@FAST
@given(st.lists(entries(), max_size=40))
def test_decode_batch_matches_decode_entry(items: list[BundleEntry]) -> None:
    check([encode_entry(e) for e in items])


@FAST
@given(
    items=st.lists(entries(), min_size=1, max_size=20),
    damage=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["flip", "cut", "insert"]), st.binary()),
        min_size=1,
        max_size=4,
    ),
)
def test_decode_batch_matches_decode_entry_on_damaged_values(
    items: list[BundleEntry], damage: list[tuple[int, str, bytes]]
) -> None:
    values = [bytearray(encode_entry(e)) for e in items]
    for where, kind, extra in damage:
        value = values[where % len(values)]
        pos = where % (len(value) + 1)
        if kind == "flip" and value:
            value[pos % len(value)] ^= 1 << (where % 8)
        elif kind == "cut":
            del value[pos:]
        else:
            value[pos:pos] = extra[:4]
    check([bytes(v) for v in values])


@FAST
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_decode_batch_matches_decode_entry_on_arbitrary_bytes(values: list[bytes]) -> None:
    check(values)


def test_many_entries_share_a_head() -> None:
    items = [
        BundleEntry(1, (256,), 0, 1024 * i, 1024, (i * 2654435761) % (1 << 32)) for i in range(5000)
    ]
    values = [encode_entry(e) for e in items]
    batch = decode_batch(values)
    assert batch.heads == [(1, (256,))]
    assert (batch.head_ids == 0).all()
    assert batch.records == [as_record(e) for e in items]
    assert decode_batch([]).records == []
