"""The writer of many tensors (issue 18): the header made in pieces joins to the reference's one
``json.dumps``, small tensors gathered into one buffer per write give the same bytes as each
tensor's own, and a save of thousands of tensors of several dtypes, small and large, is the
reference's file byte for byte."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from anyckpt_safetensors import codec
from anyckpt_safetensors import format as sformat
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

import anyckpt.sync
from anyckpt.codecs.dtypes import to_little_endian

st_numpy = pytest.importorskip("safetensors.numpy")  # the reference, as an oracle

NAMES = st.text(
    st.characters(codec="utf-8") | st.sampled_from('"\\\x00\x1f\x7f/\u00e9\u4e2d\U0001f600 .'),
    min_size=1,
    max_size=6,
).filter(lambda name: name != codec.METADATA_KEY)
DTYPES = list(codec.DTYPES.values())


def _reference_header(
    shapes: dict[str, tuple[np.dtype, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[str]]:
    """The header as the writer made it before it made it in pieces: one dict, one
    ``json.dumps``, padded."""
    order = sorted(
        shapes, key=lambda n: (-codec.rank(codec.dtype_code(shapes[n][0])), n.encode("utf-8"))
    )
    header: dict[str, Any] = {}
    if metadata:
        header[codec.METADATA_KEY] = dict(metadata)
    offset = 0
    for name in order:
        dtype, shape = shapes[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": codec.dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text, order


@settings(max_examples=200, deadline=None)
@given(
    shapes=st.dictionaries(
        NAMES,
        st.tuples(
            st.sampled_from(DTYPES), array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
        ),
        max_size=12,
    ),
    metadata=st.none() | st.dictionaries(NAMES, NAMES, max_size=3),
    step=st.integers(1, 5),
    kinds=st.integers(1, 3),
)
def test_header_pieces_join_to_one_json_dumps(
    shapes: dict[str, tuple[np.dtype, tuple[int, ...]]],
    metadata: dict[str, str] | None,
    step: int,
    kinds: int,
) -> None:
    want, want_order = _reference_header(shapes, metadata)
    order = codec.data_order(shapes, (dtype for dtype, _ in shapes.values()))
    assert order == want_order
    checked = codec.checked_metadata(metadata)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(codec, "_KINDS", kinds)  # the (dtype, shape) texts dropped and made again
        pieces = list(codec.header_pieces(order, shapes.__getitem__, checked, step))
    text = b"".join(pieces)
    assert codec.header_head(len(text)) + text + b" " * codec.header_padding(len(text)) == want
    assert codec.encode_header(shapes, metadata) == (want, want_order)
    # "{", the metadata, a piece per step of entries, "}": never the whole header at once.
    assert len(pieces) == 2 + bool(checked) + -(-len(order) // step)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6))
    raw = draw(st.binary(min_size=math.prod(shape) * dtype.itemsize, max_size=4096))
    out = np.frombuffer(raw[: math.prod(shape) * dtype.itemsize], np.uint8).copy()
    if dtype == np.bool_:
        out &= 1
    value = out.view(dtype).reshape(shape)
    if dtype.itemsize > 1 and draw(st.booleans()):  # the same values, stored big-endian
        value = value.astype(dtype.newbyteorder(">"))
    if value.ndim == 2 and draw(st.booleans()):
        value = value[:, ::2]  # not contiguous
    return value


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(arrays(), max_size=20),
    small=st.integers(0, 48),
    gather=st.integers(1, 64),
    count=st.integers(1, 4),
)
def test_gathered_small_tensors_are_each_tensors_bytes(
    values: list[np.ndarray], small: int, gather: int, count: int
) -> None:
    tensors = {f"t{i:02d}": v for i, v in enumerate(values)}
    order = sorted(tensors)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sformat, "_SMALL_BYTES", small)
        patch.setattr(sformat, "_GATHER_BYTES", gather)
        patch.setattr(sformat, "_GATHER_TENSORS", count)
        written = [bytes(piece) for piece in sformat._data(tensors, order)]
    want = b"".join(to_little_endian(tensors[k]).tobytes() for k in order)
    assert b"".join(written) == want
    assert all(written)  # nothing empty is written
    assert len(written) <= sum(1 for v in values if v.nbytes)


def test_a_save_of_many_tensors_is_the_references_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    tensors: dict[str, np.ndarray] = {}
    for i in range(2 * sformat._GATHER_TENSORS + 11):  # windows full by count
        kind = i % 5
        if kind == 0:
            tensors[f"a/{i:05d}"] = rng.standard_normal(3).astype(ml_dtypes.bfloat16)
        elif kind == 1:
            tensors[f"b/{i:05d}"] = rng.random(5) > 0.5
        else:
            tensors[f"c/{i:05d}"] = rng.standard_normal((2, 2), np.float32)
    tensors["big"] = rng.standard_normal(sformat._SMALL_BYTES // 4 + 1, np.float32)
    tensors["wide"] = rng.standard_normal(300_000, np.float32)  # windows full by bytes
    tensors["scalar"] = np.array(1.5, np.float32)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    metadata = {"format": "np"}
    (path,) = anyckpt.sync.save(
        tmp_path / "m", tensors, format="safetensors", options={"metadata": metadata}
    )
    assert Path(path).read_bytes() == st_numpy.save(tensors, metadata=metadata)
    loaded = anyckpt.sync.load(tmp_path / "m")
    for key, value in tensors.items():
        assert loaded[key].tobytes() == value.tobytes(), key
